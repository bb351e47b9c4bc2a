"""The usage log on PostgreSQL: one row per billed request of every worker, so `cache-stats`, `report` and the
budget's output history see the team's whole history. Appended per turn with COPY into a temporary table and one
INSERT … ON CONFLICT DO NOTHING (a request key already logged is left as it is), never a round trip per row."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

from batch_engine.state.postgres import connect, migrate
from batch_engine.state.usage_log import _COLUMNS, ANNOTATIONS, HISTORY_ROWS, UsageRecord

if TYPE_CHECKING:
    import psycopg

COMPONENT = "usage_log"
_TYPES = {"int": "BIGINT", "float": "DOUBLE PRECISION", "str": "TEXT"}


def _column(name: str, annotation: str) -> str:
    base = annotation.split("|")[0].strip()
    return f"{name} {_TYPES[base]}{'' if 'None' in annotation else ' NOT NULL'}"


_COLUMN_DEFS = ",\n    ".join(_column(name, ANNOTATIONS[name]) for name in _COLUMNS)
# Append only: a database migrated by an earlier version gets the ones it lacks, once.
MIGRATIONS: Sequence[str] = (
    f"""
    CREATE TABLE usage (
        {_COLUMN_DEFS}
    );
    CREATE INDEX usage_by_time ON usage (at);
    CREATE INDEX usage_by_run ON usage (run_key);
    CREATE UNIQUE INDEX usage_by_request ON usage (request_key);
    """,
)
_NAMES = ", ".join(_COLUMNS)


class PgUsageLog:
    """Append-only log of billed requests, shared by every worker."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._db = conn

    @classmethod
    def connect(cls, dsn: str) -> PgUsageLog:
        conn = connect(dsn, "usage log")
        try:
            migrate(conn, COMPONENT, MIGRATIONS)
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def append(self, records: Iterable[UsageRecord]) -> None:
        """Log billed requests; one already logged under the same request key is left as it is."""
        rows = list(records)
        if not rows:
            return
        with self._db.transaction():
            self._db.execute(b"CREATE TEMPORARY TABLE IF NOT EXISTS usage_in (LIKE usage) ON COMMIT DELETE ROWS")
            with self._db.cursor() as cursor, cursor.copy(f"COPY usage_in ({_NAMES}) FROM STDIN".encode()) as copy:
                for row in rows:
                    copy.write_row(row)
            self._db.execute(
                f"INSERT INTO usage ({_NAMES}) SELECT {_NAMES} FROM usage_in ON CONFLICT DO NOTHING".encode()
            )

    def recent_outputs(self, since: float = 0.0, limit: int = HISTORY_ROWS) -> Iterator[tuple[str, str, int]]:
        """(task type, model, output tokens) of the newest `limit` records at or after `since`, newest first."""
        query = b"SELECT task_type, model, output_tokens FROM usage WHERE at >= %s ORDER BY at DESC LIMIT %s"
        for row in self._db.execute(query, (since, limit)).fetchall():
            yield row[0], row[1], row[2]

    def records(self, since: float = 0.0, run_key: str | None = None) -> list[UsageRecord]:
        """Records at or after `since` (epoch seconds), optionally of one run, oldest first."""
        query = f"SELECT {_NAMES} FROM usage WHERE at >= %s"
        args: list[object] = [since]
        if run_key is not None:
            query += " AND run_key = %s"
            args.append(run_key)
        return [UsageRecord(*row) for row in self._db.execute((query + " ORDER BY at").encode(), args)]
