"""The run ledger: one SQLite file (WAL) in the state directory holding, per run key, the chunk intents written
before each `batches.create`, the batch ids recorded the moment they return, and every finished task's row.

It is the source of truth for resuming: a re-run re-attaches to recorded batches, skips finished tasks and
sends only what is left. Batch creation is not idempotent, so the intent row is what stops a second create.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from batch_engine.models import TaskResult
from batch_engine.planning.outcome import FinishedRow
from batch_engine.state.store import SqliteStore

SCHEMA_VERSION = 1
LEDGER_FILE = "ledger.sqlite3"

# lost: the API no longer knows its recorded batch (404: deleted in the Console or by another tool).
ChunkStatus = Literal["intent", "submitted", "ended", "collected", "failed", "lost"]
RunStatus = Literal["running", "submitted", "complete", "superseded"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_key TEXT PRIMARY KEY,
    input_path TEXT NOT NULL,
    output_path TEXT NOT NULL,
    options BLOB NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    run_key TEXT NOT NULL,
    chunk_key TEXT NOT NULL,
    task_indexes BLOB NOT NULL,
    intent_at REAL NOT NULL,
    batch_id TEXT,
    created_at REAL,
    status TEXT NOT NULL,
    request_counts BLOB,
    canceled_by_us INTEGER NOT NULL DEFAULT 0,
    sent_at REAL,
    last_sent_at REAL,
    PRIMARY KEY (run_key, chunk_key)
);
CREATE INDEX IF NOT EXISTS chunks_by_batch ON chunks (batch_id);
CREATE TABLE IF NOT EXISTS leases (
    run_key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    heartbeat_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS run_durations (
    run_key TEXT PRIMARY KEY,
    durations BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    run_key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    status TEXT NOT NULL,
    route TEXT,
    cost_usd REAL NOT NULL,
    recorded_at REAL NOT NULL,
    row BLOB NOT NULL,
    PRIMARY KEY (run_key, idx)
);
"""


# The row blob is JSON text from orjson; `attempts` is read from it rather than kept in a column of its own, so
# ledgers written before this rule keep working. The incoming row's `attempts` is read from its JSON too (the same
# number: a `FinishedRow`'s JSON is what its fields say), so rows can be inserted many to a statement; only a
# conflict, which is rare, reads the JSON.
_INSERT_RESULT = "INSERT INTO results"
_ON_RESULT_CONFLICT = """
ON CONFLICT (run_key, idx) DO UPDATE SET
    status = excluded.status, route = excluded.route, cost_usd = excluded.cost_usd,
    recorded_at = excluded.recorded_at, row = excluded.row
WHERE results.status <> 'succeeded'
    AND COALESCE(json_extract(CAST(results.row AS TEXT), '$.attempts'), 0)
        <= json_extract(CAST(excluded.row AS TEXT), '$.attempts')
"""


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_key: str
    input_path: str
    output_path: str
    options: dict[str, Any]
    started_at: float
    finished_at: float | None
    status: RunStatus


@dataclass(frozen=True, slots=True)
class Lease:
    """Who works on a run: one process at a time, for as long as it keeps the heartbeat going."""

    run_key: str
    owner: str  # random per opened run: two runs of one process are two owners
    host: str
    pid: int
    heartbeat_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    run_key: str
    chunk_key: str
    task_indexes: tuple[int, ...]
    intent_at: float
    batch_id: str | None
    created_at: float | None
    status: ChunkStatus
    request_counts: dict[str, int] | None
    canceled_by_us: bool
    # When the first and the latest `batches.create` of the chunk were sent (None: never sent, so no batch can
    # exist for it). A batch made by a create whose answer was lost was created between the two (plus a
    # request timeout): the window an unrecorded batch must fall in to be adopted.
    sent_at: float | None = None
    last_sent_at: float | None = None

    @property
    def open(self) -> bool:
        """Still owes results: intended, submitted or ended but not yet collected."""
        return self.status in ("intent", "submitted", "ended")


def _chunk(row: sqlite3.Row) -> ChunkRecord:
    return ChunkRecord(
        run_key=row["run_key"],
        chunk_key=row["chunk_key"],
        task_indexes=tuple(orjson.loads(row["task_indexes"])),
        intent_at=row["intent_at"],
        batch_id=row["batch_id"],
        created_at=row["created_at"],
        status=row["status"],
        request_counts=orjson.loads(row["request_counts"]) if row["request_counts"] else None,
        canceled_by_us=bool(row["canceled_by_us"]),
        sent_at=row["sent_at"],
        last_sent_at=row["last_sent_at"],
    )


def _run(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_key=row["run_key"],
        input_path=row["input_path"],
        output_path=row["output_path"],
        options=orjson.loads(row["options"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        status=row["status"],
    )


class Ledger(SqliteStore):
    """The SQLite ledger of every run kept in one state directory."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, SCHEMA_VERSION, "run ledger")
        self._migrate()

    def _migrate(self) -> None:
        """Add what later versions keep to a ledger written by an earlier one (the schema only grows)."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(chunks)")}
        if "sent_at" not in columns:
            with self._transaction():
                self._db.execute("ALTER TABLE chunks ADD COLUMN sent_at REAL")
                self._db.execute("ALTER TABLE chunks ADD COLUMN last_sent_at REAL")
                # Earlier versions did not record sends: an open intent may have been sent.
                self._db.execute(
                    "UPDATE chunks SET sent_at = intent_at, last_sent_at = intent_at WHERE status = 'intent'"
                )

    @classmethod
    def open(cls, state_dir: Path) -> Ledger:
        return cls(Path(state_dir) / LEDGER_FILE)

    @property
    def where(self) -> str:
        return str(self.path)

    # --- runs ------------------------------------------------------------------------------------------

    def begin(self, run_key: str, input_path: str, output_path: str, options: dict[str, Any], now: float) -> RunRecord:
        """The run's record, created on first sight; a re-run gets the original start time back."""
        self._db.execute(
            "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, NULL, 'running')",
            (run_key, input_path, output_path, orjson.dumps(options), now),
        )
        # The output path may change between re-runs of the same input; the latest wins.
        self._db.execute("UPDATE runs SET output_path = ? WHERE run_key = ?", (output_path, run_key))
        record = self.run(run_key)
        assert record is not None
        return record

    def run(self, run_key: str) -> RunRecord | None:
        row = self._db.execute("SELECT * FROM runs WHERE run_key = ?", (run_key,)).fetchone()
        return _run(row) if row else None

    def runs(self, status: RunStatus | None = None) -> list[RunRecord]:
        if status is None:
            rows = self._db.execute("SELECT * FROM runs ORDER BY started_at").fetchall()
        else:
            rows = self._db.execute("SELECT * FROM runs WHERE status = ? ORDER BY started_at", (status,)).fetchall()
        return [_run(row) for row in rows]

    def has_work(self, run_key: str) -> bool:
        """Whether the run sent anything: a chunk intent or a finished row."""
        for table in ("chunks", "results"):
            if self._db.execute(f"SELECT 1 FROM {table} WHERE run_key = ? LIMIT 1", (run_key,)).fetchone():
                return True
        return False

    def supersede(self, old_key: str, new_key: str, unchanged: set[int], finished_at: float) -> list[str]:
        """Hand an unfinished run's work on unchanged tasks to the run that replaces it, in one transaction.

        Its finished rows of `unchanged` tasks move to `new_key`, and so does each recorded batch still owing
        results, narrowed to its unchanged rows. A batch with none moves too (nothing is cancelled): the API bills
        its rows all the same, so the new run collects it to log their usage. The old run is marked superseded.
        Returns the batch ids that moved.
        """
        moved: list[str] = []
        with self._transaction():
            self._db.executemany(
                "UPDATE results SET run_key = ? WHERE run_key = ? AND idx = ?",
                [(new_key, old_key, index) for index in sorted(unchanged)],
            )
            for chunk in self.chunks(old_key):
                kept = [index for index in chunk.task_indexes if index in unchanged]
                if chunk.batch_id is None or not chunk.open:
                    continue
                self._db.execute(
                    "UPDATE chunks SET run_key = ?, chunk_key = ?, task_indexes = ? "
                    "WHERE run_key = ? AND chunk_key = ?",
                    (new_key, f"{chunk.chunk_key}@{old_key[:8]}", orjson.dumps(kept), old_key, chunk.chunk_key),
                )
                moved.append(chunk.batch_id)
            self._db.execute(
                "UPDATE runs SET status = 'superseded', finished_at = ? WHERE run_key = ?", (finished_at, old_key)
            )
        return moved

    def set_run_status(self, run_key: str, status: RunStatus, finished_at: float | None = None) -> None:
        self._db.execute(
            "UPDATE runs SET status = ?, finished_at = ? WHERE run_key = ?", (status, finished_at, run_key)
        )

    def keep_durations(self, run_key: str, durations: dict[str, Any]) -> dict[str, Any]:
        """The run's phase durations as first recorded: the invocation that completes a run records them, and a
        later rewrite of its output gets them back (the same bytes)."""
        self._db.execute("INSERT OR IGNORE INTO run_durations VALUES (?, ?)", (run_key, orjson.dumps(durations)))
        row = self._db.execute("SELECT durations FROM run_durations WHERE run_key = ?", (run_key,)).fetchone()
        kept: dict[str, Any] = orjson.loads(row["durations"])
        return kept

    # --- leases ----------------------------------------------------------------------------------------

    def take_lease(self, lease: Lease, holder_alive: Callable[[Lease], bool]) -> Lease | None:
        """Take the run's lease, or return the live lease another owner holds.

        Atomic across processes (BEGIN IMMEDIATE): of two processes taking the lease at once, one gets it. The
        held lease is taken over when `holder_alive` says its owner is gone.
        """
        with self._transaction():
            row = self._db.execute("SELECT * FROM leases WHERE run_key = ?", (lease.run_key,)).fetchone()
            if row is not None:
                held = Lease(*row)
                if held.owner != lease.owner and holder_alive(held):
                    return held
            self._db.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                (lease.run_key, lease.owner, lease.host, lease.pid, lease.heartbeat_at, lease.expires_at),
            )
        return None

    def lease(self, run_key: str) -> Lease | None:
        """The run's lease as recorded (None when nobody holds it)."""
        row = self._db.execute("SELECT * FROM leases WHERE run_key = ?", (run_key,)).fetchone()
        return Lease(*row) if row else None

    def lease_alive(self, held: Lease, holder_alive: Callable[[Lease], bool]) -> bool:
        """Whether the holder of `held` may still be working."""
        return holder_alive(held)

    def renew_lease(self, run_key: str, owner: str, now: float, expires_at: float) -> bool:
        """Move the lease's heartbeat on; False when `owner` no longer holds it (it was taken over)."""
        cursor = self._db.execute(
            "UPDATE leases SET heartbeat_at = ?, expires_at = ? WHERE run_key = ? AND owner = ?",
            (now, expires_at, run_key, owner),
        )
        return cursor.rowcount > 0

    def release_lease(self, run_key: str, owner: str) -> None:
        self._db.execute("DELETE FROM leases WHERE run_key = ? AND owner = ?", (run_key, owner))

    # --- chunks ----------------------------------------------------------------------------------------

    def chunks(self, run_key: str) -> list[ChunkRecord]:
        rows = self._db.execute("SELECT * FROM chunks WHERE run_key = ? ORDER BY intent_at, chunk_key", (run_key,))
        return [_chunk(row) for row in rows]

    def chunk(self, run_key: str, chunk_key: str) -> ChunkRecord | None:
        row = self._db.execute(
            "SELECT * FROM chunks WHERE run_key = ? AND chunk_key = ?", (run_key, chunk_key)
        ).fetchone()
        return _chunk(row) if row else None

    def record_intent(self, run_key: str, chunk_key: str, task_indexes: Iterable[int], now: float) -> ChunkRecord:
        """Written (and durable) before `batches.create` is called for the chunk."""
        with self._durable():
            self._db.execute(
                "INSERT OR IGNORE INTO chunks (run_key, chunk_key, task_indexes, intent_at, status) "
                "VALUES (?, ?, ?, ?, 'intent')",
                (run_key, chunk_key, orjson.dumps(list(task_indexes)), now),
            )
        record = self.chunk(run_key, chunk_key)
        assert record is not None
        return record

    def record_send(self, run_key: str, chunk_key: str, now: float) -> None:
        """Written (durable) just before each `batches.create` of the chunk is sent."""
        with self._durable():
            self._db.execute(
                "UPDATE chunks SET sent_at = COALESCE(sent_at, ?1), last_sent_at = ?1 "
                "WHERE run_key = ?2 AND chunk_key = ?3",
                (now, run_key, chunk_key),
            )

    def record_batch(self, run_key: str, chunk_key: str, batch_id: str, created_at: float) -> None:
        """Written (durable) the moment `batches.create` returns."""
        with self._durable():
            self._db.execute(
                "UPDATE chunks SET batch_id = ?, created_at = ?, status = 'submitted' "
                "WHERE run_key = ? AND chunk_key = ?",
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
            sets.append("status = ?")
            values.append(status)
        if request_counts is not None:
            sets.append("request_counts = ?")
            values.append(orjson.dumps(request_counts))
        if canceled_by_us is not None:
            sets.append("canceled_by_us = ?")
            values.append(int(canceled_by_us))
        if sets:
            self._db.execute(
                f"UPDATE chunks SET {', '.join(sets)} WHERE run_key = ? AND chunk_key = ?",
                (*values, run_key, chunk_key),
            )

    def chunk_by_batch(self, batch_id: str) -> ChunkRecord | None:
        """The chunk a batch id is recorded under (in any run), or None."""
        row = self._db.execute("SELECT * FROM chunks WHERE batch_id = ?", (batch_id,)).fetchone()
        return _chunk(row) if row else None

    def known_batch_ids(self) -> set[str]:
        rows = self._db.execute("SELECT batch_id FROM chunks WHERE batch_id IS NOT NULL")
        return {row["batch_id"] for row in rows}

    # --- results ---------------------------------------------------------------------------------------

    def save_results(self, run_key: str, results: Iterable[FinishedRow], now: float) -> None:
        """Store finished rows in one transaction. A later row for the same task replaces the earlier one only
        if that one did not succeed and the later one was not sent fewer times: collecting a batch again (a
        Prefect retry, a second collector) never replaces a paid success with an older error."""
        rows = [(run_key, r.index, r.status, r.route, r.cost_usd, now, r.json) for r in results]
        if not rows:
            return
        with self._transaction():
            self._insert_rows(_INSERT_RESULT, 7, rows, _ON_RESULT_CONFLICT)

    def spent(self, run_key: str) -> float:
        """USD billed so far for the run's finished rows."""
        row = self._db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM results WHERE run_key = ?", (run_key,))
        return float(row.fetchone()[0])

    def last_recorded(self, run_key: str) -> dict[str, float]:
        """When the last row of each route was recorded (epoch seconds); what lane durations are measured by."""
        rows = self._db.execute(
            "SELECT route, MAX(recorded_at) AS last FROM results WHERE run_key = ? GROUP BY route", (run_key,)
        )
        return {row["route"] or "none": row["last"] for row in rows}

    def finished_indexes(self, run_key: str) -> set[int]:
        return {row["idx"] for row in self._db.execute("SELECT idx FROM results WHERE run_key = ?", (run_key,))}

    def iter_finished_indexes(self, run_key: str) -> Iterator[int]:
        """The finished indexes in ascending order, read as a stream."""
        for row in self._db.execute("SELECT idx FROM results WHERE run_key = ? ORDER BY idx", (run_key,)):
            yield row["idx"]

    def results(self, run_key: str) -> Iterator[TaskResult]:
        """Every finished row of the run, in input order, read as a stream."""
        cursor = self._db.execute("SELECT row FROM results WHERE run_key = ? ORDER BY idx", (run_key,))
        for row in cursor:
            yield TaskResult.model_validate(orjson.loads(row["row"]))

    def invalid_outputs(self, run_key: str, indexes: Iterable[int] | None = None) -> list[TaskResult]:
        """The run's `invalid_output` rows (only those of `indexes` when given), in input order."""
        query = "SELECT row FROM results WHERE run_key = ? AND status = 'invalid_output'"
        args: list[Any] = [run_key]
        if indexes is not None:
            wanted = list(indexes)
            if not wanted:
                return []
            query += f" AND idx IN ({', '.join('?' * len(wanted))})"
            args += wanted
        rows = self._db.execute(query + " ORDER BY idx", args)
        return [TaskResult.model_validate(orjson.loads(row["row"])) for row in rows]

    def result_json(self, run_key: str) -> Iterator[tuple[int, bytes]]:
        """Every finished row of the run as stored, (index, its output JSON), in input order, read as a stream."""
        cursor = self._db.cursor()
        # Plain tuples, as the cursor gives them (a BLOB comes back as bytes): a `sqlite3.Row`, or a generator
        # re-yielding each tuple, per row was a share of writing the output.
        cursor.row_factory = None
        rows: Iterator[tuple[int, bytes]] = cursor.execute(
            "SELECT idx, row FROM results WHERE run_key = ? ORDER BY idx", (run_key,)
        )
        return rows

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    @contextlib.contextmanager
    def _durable(self) -> Iterator[None]:
        """A write that must survive a power cut, not only a crash: what stops a second `batches.create`.

        WAL with synchronous=NORMAL (the rest of the ledger) may lose the last commits on power loss; FULL
        syncs the WAL at this commit.
        """
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
