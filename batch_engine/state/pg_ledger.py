"""The run ledger on PostgreSQL: the SQLite ledger's tables and guarantees, in one database every worker shares.

- The run lease is a row taken under `SELECT … FOR UPDATE`: of two workers taking it at once, one gets it. Its
  holder is alive while its heartbeat is fresh (and, on the same host, its pid runs) *and* the database session
  that took it is still connected: a worker killed on another machine loses its session at once, so its run is
  taken over without waiting for the heartbeat to expire.
- A chunk intent and each send are committed with `synchronous_commit = on` before `batches.create` is called;
  the batch id the moment it returns. With the lease, no two workers create a chunk's batch twice.
- Finished rows are written per turn in one round trip (a pipelined `executemany`), never one per request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

import orjson

from batch_engine.models import TaskResult
from batch_engine.planning.outcome import FinishedRow
from batch_engine.state.ledger import ChunkRecord, ChunkStatus, Lease, RunRecord, RunStatus
from batch_engine.state.postgres import connect, migrate
from batch_engine.state.url import redact

if TYPE_CHECKING:
    import psycopg

COMPONENT = "ledger"
# Append only: a database migrated by an earlier version gets the ones it lacks, once.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE runs (
        run_key TEXT PRIMARY KEY,
        input_path TEXT NOT NULL,
        output_path TEXT NOT NULL,
        options BYTEA NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        status TEXT NOT NULL
    );
    CREATE TABLE chunks (
        run_key TEXT NOT NULL,
        chunk_key TEXT NOT NULL,
        task_indexes BYTEA NOT NULL,
        intent_at DOUBLE PRECISION NOT NULL,
        batch_id TEXT,
        created_at DOUBLE PRECISION,
        status TEXT NOT NULL,
        request_counts BYTEA,
        canceled_by_us BOOLEAN NOT NULL DEFAULT false,
        sent_at DOUBLE PRECISION,
        last_sent_at DOUBLE PRECISION,
        PRIMARY KEY (run_key, chunk_key)
    );
    CREATE INDEX chunks_by_batch ON chunks (batch_id);
    CREATE TABLE leases (
        run_key TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        -- The database session that holds the lease: while it is connected, its worker is.
        backend_pid INTEGER NOT NULL,
        backend_start TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE results (
        run_key TEXT NOT NULL,
        idx INTEGER NOT NULL,
        status TEXT NOT NULL,
        route TEXT,
        cost_usd DOUBLE PRECISION NOT NULL,
        recorded_at DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL,
        row BYTEA NOT NULL,
        PRIMARY KEY (run_key, idx)
    );
    """,
    """
    CREATE TABLE run_durations (
        run_key TEXT PRIMARY KEY,
        durations BYTEA NOT NULL
    );
    """,
)

_CHUNK = (
    "run_key, chunk_key, task_indexes, intent_at, batch_id, created_at, status, request_counts, canceled_by_us, "
    "sent_at, last_sent_at"
)
_RUN = "run_key, input_path, output_path, options, started_at, finished_at, status"
_LEASE = "run_key, owner, host, pid, heartbeat_at, expires_at"

# As the SQLite ledger: a later row replaces a stored one only if that one did not succeed and the later one was
# not sent fewer times.
_SAVE_RESULT = """
INSERT INTO results (run_key, idx, status, route, cost_usd, recorded_at, attempts, row)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (run_key, idx) DO UPDATE SET
    status = excluded.status, route = excluded.route, cost_usd = excluded.cost_usd,
    recorded_at = excluded.recorded_at, attempts = excluded.attempts, row = excluded.row
WHERE results.status <> 'succeeded' AND results.attempts <= excluded.attempts
"""

# A large block (a batch's results) is copied into a temporary table and merged by one INSERT … SELECT: the server
# then plans the upsert once, not once per row. Of two rows of one task in a block, the one that would win when
# written one after the other (a success, else the most attempts) is kept.
_COPY_FROM = 200
_RESULTS_IN = "CREATE TEMPORARY TABLE IF NOT EXISTS results_in (LIKE results INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
_COPY_RESULTS = "COPY results_in (run_key, idx, status, route, cost_usd, recorded_at, attempts, row) FROM STDIN"
_MERGE_RESULTS = """
INSERT INTO results (run_key, idx, status, route, cost_usd, recorded_at, attempts, row)
SELECT DISTINCT ON (idx) run_key, idx, status, route, cost_usd, recorded_at, attempts, row FROM results_in
ORDER BY idx, (status = 'succeeded') DESC, attempts DESC
ON CONFLICT (run_key, idx) DO UPDATE SET
    status = excluded.status, route = excluded.route, cost_usd = excluded.cost_usd,
    recorded_at = excluded.recorded_at, attempts = excluded.attempts, row = excluded.row
WHERE results.status <> 'succeeded' AND results.attempts <= excluded.attempts
"""

Row = tuple[Any, ...]


def _chunk(row: Row) -> ChunkRecord:
    return ChunkRecord(
        run_key=row[0],
        chunk_key=row[1],
        task_indexes=tuple(orjson.loads(row[2])),
        intent_at=row[3],
        batch_id=row[4],
        created_at=row[5],
        status=row[6],
        request_counts=orjson.loads(row[7]) if row[7] else None,
        canceled_by_us=bool(row[8]),
        sent_at=row[9],
        last_sent_at=row[10],
    )


def _run(row: Row) -> RunRecord:
    return RunRecord(row[0], row[1], row[2], orjson.loads(row[3]), row[4], row[5], row[6])


class PgLedger:
    """The run ledger of every run of every worker sharing one PostgreSQL database."""

    def __init__(self, conn: psycopg.Connection[Row], dsn: str) -> None:
        self._db = conn
        self._dsn = dsn

    @classmethod
    def connect(cls, dsn: str) -> PgLedger:
        conn = connect(dsn, "run ledger")
        try:
            migrate(conn, COMPONENT, MIGRATIONS)
        except BaseException:
            conn.close()
            raise
        return cls(conn, dsn)

    @property
    def where(self) -> str:
        return redact(self._dsn)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _one(self, query: str, args: Sequence[Any] = ()) -> Row | None:
        return self._db.execute(query.encode(), args).fetchone()

    def _all(self, query: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(query.encode(), args).fetchall()

    def _exec(self, query: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(query.encode(), args).rowcount

    @contextlib.contextmanager
    def _durable(self) -> Iterator[None]:
        """A write that must survive a power cut, not only a crash: what stops a second `batches.create`."""
        with self._db.transaction():
            self._db.execute("SET LOCAL synchronous_commit = on")
            yield

    # --- runs ------------------------------------------------------------------------------------------

    def begin(self, run_key: str, input_path: str, output_path: str, options: dict[str, Any], now: float) -> RunRecord:
        """The run's record, created on first sight; a re-run gets the original start time back."""
        with self._db.transaction():
            self._exec(
                "INSERT INTO runs VALUES (%s, %s, %s, %s, %s, NULL, 'running') ON CONFLICT (run_key) DO NOTHING",
                (run_key, input_path, output_path, orjson.dumps(options), now),
            )
            self._exec("UPDATE runs SET output_path = %s WHERE run_key = %s", (output_path, run_key))
        record = self.run(run_key)
        assert record is not None
        return record

    def run(self, run_key: str) -> RunRecord | None:
        row = self._one(f"SELECT {_RUN} FROM runs WHERE run_key = %s", (run_key,))
        return _run(row) if row else None

    def runs(self, status: RunStatus | None = None) -> list[RunRecord]:
        if status is None:
            rows = self._all(f"SELECT {_RUN} FROM runs ORDER BY started_at")
        else:
            rows = self._all(f"SELECT {_RUN} FROM runs WHERE status = %s ORDER BY started_at", (status,))
        return [_run(row) for row in rows]

    def has_work(self, run_key: str) -> bool:
        row = self._one(
            "SELECT EXISTS (SELECT 1 FROM chunks WHERE run_key = %s) "
            "OR EXISTS (SELECT 1 FROM results WHERE run_key = %s)",
            (run_key, run_key),
        )
        return bool(row and row[0])

    def supersede(self, old_key: str, new_key: str, unchanged: set[int], finished_at: float) -> list[str]:
        """Hand an unfinished run's work on unchanged tasks to the run that replaces it, in one transaction
        (as the SQLite ledger's `supersede`)."""
        moved: list[str] = []
        with self._db.transaction():
            with self._db.cursor() as cursor:
                cursor.executemany(
                    b"UPDATE results SET run_key = %s WHERE run_key = %s AND idx = %s",
                    [(new_key, old_key, index) for index in sorted(unchanged)],
                )
            for chunk in self.chunks(old_key):
                kept = [index for index in chunk.task_indexes if index in unchanged]
                if chunk.batch_id is None or not chunk.open:  # one with no unchanged row moves too (its usage)
                    continue
                self._exec(
                    "UPDATE chunks SET run_key = %s, chunk_key = %s, task_indexes = %s "
                    "WHERE run_key = %s AND chunk_key = %s",
                    (new_key, f"{chunk.chunk_key}@{old_key[:8]}", orjson.dumps(kept), old_key, chunk.chunk_key),
                )
                moved.append(chunk.batch_id)
            self._exec(
                "UPDATE runs SET status = 'superseded', finished_at = %s WHERE run_key = %s", (finished_at, old_key)
            )
        return moved

    def set_run_status(self, run_key: str, status: RunStatus, finished_at: float | None = None) -> None:
        self._exec("UPDATE runs SET status = %s, finished_at = %s WHERE run_key = %s", (status, finished_at, run_key))

    def keep_durations(self, run_key: str, durations: dict[str, Any]) -> dict[str, Any]:
        """As the SQLite ledger's: the durations first recorded for the run."""
        self._exec(
            "INSERT INTO run_durations VALUES (%s, %s) ON CONFLICT (run_key) DO NOTHING",
            (run_key, orjson.dumps(durations)),
        )
        row = self._one("SELECT durations FROM run_durations WHERE run_key = %s", (run_key,))
        assert row is not None
        kept: dict[str, Any] = orjson.loads(bytes(row[0]))
        return kept

    # --- leases ----------------------------------------------------------------------------------------

    def take_lease(self, lease: Lease, holder_alive: Callable[[Lease], bool]) -> Lease | None:
        """Take the run's lease, or return the live lease another owner holds.

        The lease row is locked (`FOR UPDATE`) for the decision: of two workers taking it at once, the second
        waits for the first to commit and then sees its lease.
        """
        with self._db.transaction():
            # The row must exist to be locked; a concurrent insert waits on the key, then inserts nothing.
            self._exec(
                "INSERT INTO leases SELECT %s, %s, %s, %s, %s, %s, pid, backend_start FROM pg_stat_activity "
                "WHERE pid = pg_backend_pid() ON CONFLICT (run_key) DO NOTHING",
                (lease.run_key, lease.owner, lease.host, lease.pid, lease.heartbeat_at, lease.expires_at),
            )
            row = self._one(
                f"SELECT {_LEASE}, backend_pid, backend_start FROM leases WHERE run_key = %s FOR UPDATE",
                (lease.run_key,),
            )
            assert row is not None
            held = Lease(*row[:6])
            if held.owner != lease.owner and self._alive(held, row[6], row[7], holder_alive):
                return held
            self._exec(
                "UPDATE leases SET owner = %s, host = %s, pid = %s, heartbeat_at = %s, expires_at = %s, "
                "backend_pid = pg_backend_pid(), "
                "backend_start = (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()) "
                "WHERE run_key = %s",
                (lease.owner, lease.host, lease.pid, lease.heartbeat_at, lease.expires_at, lease.run_key),
            )
        return None

    def _alive(
        self, held: Lease, backend_pid: int, backend_start: object, holder_alive: Callable[[Lease], bool]
    ) -> bool:
        if not holder_alive(held):
            return False
        row = self._one(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s AND backend_start = %s)",
            (backend_pid, backend_start),
        )
        return bool(row and row[0])

    def lease(self, run_key: str) -> Lease | None:
        row = self._one(f"SELECT {_LEASE} FROM leases WHERE run_key = %s", (run_key,))
        return Lease(*row) if row else None

    def lease_alive(self, held: Lease, holder_alive: Callable[[Lease], bool]) -> bool:
        """Whether the holder of `held` may still be working (heartbeat, pid, and its database session)."""
        row = self._one(
            "SELECT backend_pid, backend_start FROM leases WHERE run_key = %s AND owner = %s",
            (held.run_key, held.owner),
        )
        return row is not None and self._alive(held, row[0], row[1], holder_alive)

    def renew_lease(self, run_key: str, owner: str, now: float, expires_at: float) -> bool:
        """Move the lease's heartbeat on; False when `owner` no longer holds it (it was taken over)."""
        return (
            self._exec(
                "UPDATE leases SET heartbeat_at = %s, expires_at = %s WHERE run_key = %s AND owner = %s",
                (now, expires_at, run_key, owner),
            )
            > 0
        )

    def release_lease(self, run_key: str, owner: str) -> None:
        if not self._db.closed:
            self._exec("DELETE FROM leases WHERE run_key = %s AND owner = %s", (run_key, owner))

    # --- chunks ----------------------------------------------------------------------------------------

    def chunks(self, run_key: str) -> list[ChunkRecord]:
        rows = self._all(f"SELECT {_CHUNK} FROM chunks WHERE run_key = %s ORDER BY intent_at, chunk_key", (run_key,))
        return [_chunk(row) for row in rows]

    def chunk(self, run_key: str, chunk_key: str) -> ChunkRecord | None:
        row = self._one(f"SELECT {_CHUNK} FROM chunks WHERE run_key = %s AND chunk_key = %s", (run_key, chunk_key))
        return _chunk(row) if row else None

    def record_intent(self, run_key: str, chunk_key: str, task_indexes: Iterable[int], now: float) -> ChunkRecord:
        """Written (and durable) before `batches.create` is called for the chunk."""
        with self._durable():
            self._exec(
                "INSERT INTO chunks (run_key, chunk_key, task_indexes, intent_at, status) "
                "VALUES (%s, %s, %s, %s, 'intent') ON CONFLICT (run_key, chunk_key) DO NOTHING",
                (run_key, chunk_key, orjson.dumps(list(task_indexes)), now),
            )
        record = self.chunk(run_key, chunk_key)
        assert record is not None
        return record

    def record_send(self, run_key: str, chunk_key: str, now: float) -> None:
        """Written (durable) just before each `batches.create` of the chunk is sent."""
        with self._durable():
            self._exec(
                "UPDATE chunks SET sent_at = COALESCE(sent_at, %s), last_sent_at = %s "
                "WHERE run_key = %s AND chunk_key = %s",
                (now, now, run_key, chunk_key),
            )

    def record_batch(self, run_key: str, chunk_key: str, batch_id: str, created_at: float) -> None:
        """Written (durable) the moment `batches.create` returns."""
        with self._durable():
            self._exec(
                "UPDATE chunks SET batch_id = %s, created_at = %s, status = 'submitted' "
                "WHERE run_key = %s AND chunk_key = %s",
                (batch_id, created_at, run_key, chunk_key),
            )

    def update_chunk(
        self,
        run_key: str,
        chunk_key: str,
        *,
        status: ChunkStatus | None = None,
        request_counts: dict[str, int] | None = None,
        canceled_by_us: bool | None = None,
    ) -> None:
        sets: list[str] = []
        values: list[Any] = []
        if status is not None:
            sets.append("status = %s")
            values.append(status)
        if request_counts is not None:
            sets.append("request_counts = %s")
            values.append(orjson.dumps(request_counts))
        if canceled_by_us is not None:
            sets.append("canceled_by_us = %s")
            values.append(canceled_by_us)
        if sets:
            self._exec(
                f"UPDATE chunks SET {', '.join(sets)} WHERE run_key = %s AND chunk_key = %s",
                (*values, run_key, chunk_key),
            )

    def chunk_by_batch(self, batch_id: str) -> ChunkRecord | None:
        row = self._one(f"SELECT {_CHUNK} FROM chunks WHERE batch_id = %s", (batch_id,))
        return _chunk(row) if row else None

    def known_batch_ids(self) -> set[str]:
        return {row[0] for row in self._all("SELECT batch_id FROM chunks WHERE batch_id IS NOT NULL")}

    # --- results ---------------------------------------------------------------------------------------

    def save_results(self, run_key: str, results: Iterable[FinishedRow], now: float) -> None:
        """Store finished rows in one transaction, in one pipelined round trip or one COPY (see the SQLite ledger's
        rule for which row wins)."""
        rows = [
            (
                run_key,
                r.index,
                r.status,
                r.route,
                r.cost_usd,
                now,
                r.attempts,
                r.json,
            )
            for r in results
        ]
        if not rows:
            return
        with self._db.transaction(), self._db.cursor() as cursor:
            if len(rows) < _COPY_FROM:
                cursor.executemany(_SAVE_RESULT.encode(), rows)
                return
            cursor.execute(_RESULTS_IN.encode())
            with cursor.copy(_COPY_RESULTS.encode()) as copy:
                for row in rows:
                    copy.write_row(row)
            cursor.execute(_MERGE_RESULTS.encode())

    def spent(self, run_key: str) -> float:
        row = self._one("SELECT COALESCE(SUM(cost_usd), 0) FROM results WHERE run_key = %s", (run_key,))
        return float(row[0]) if row else 0.0

    def last_recorded(self, run_key: str) -> dict[str, float]:
        rows = self._all("SELECT route, MAX(recorded_at) FROM results WHERE run_key = %s GROUP BY route", (run_key,))
        return {row[0] or "none": row[1] for row in rows}

    def finished_indexes(self, run_key: str) -> set[int]:
        return {row[0] for row in self._all("SELECT idx FROM results WHERE run_key = %s", (run_key,))}

    def iter_finished_indexes(self, run_key: str) -> Iterator[int]:
        for (index,) in self._stream("SELECT idx FROM results WHERE run_key = %s ORDER BY idx", (run_key,)):
            yield index

    def results(self, run_key: str) -> Iterator[TaskResult]:
        for (row,) in self._stream("SELECT row FROM results WHERE run_key = %s ORDER BY idx", (run_key,)):
            yield TaskResult.model_validate(orjson.loads(row))

    def invalid_outputs(self, run_key: str, indexes: Iterable[int] | None = None) -> list[TaskResult]:
        query = "SELECT row FROM results WHERE run_key = %s AND status = 'invalid_output'"
        args: list[Any] = [run_key]
        if indexes is not None:
            wanted = list(indexes)
            if not wanted:
                return []
            query += " AND idx = ANY(%s)"
            args.append(wanted)
        rows = self._all(query + " ORDER BY idx", args)
        return [TaskResult.model_validate(orjson.loads(row[0])) for row in rows]

    def result_json(self, run_key: str) -> Iterator[tuple[int, bytes]]:
        for index, row in self._stream("SELECT idx, row FROM results WHERE run_key = %s ORDER BY idx", (run_key,)):
            yield index, bytes(row)

    def _stream(self, query: str, args: Sequence[Any]) -> Iterator[Row]:
        """Rows read in pages from a server-side cursor on a connection of their own: a million-row output is
        never held in memory, and the ledger's connection stays free for writes while it is read."""
        import psycopg

        with psycopg.connect(self._dsn) as conn, conn.transaction(), conn.cursor(name="stream") as cursor:
            cursor.itersize = 5000
            cursor.execute(query.encode(), args)
            yield from cursor
