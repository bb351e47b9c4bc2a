"""The PostgreSQL connection both PostgreSQL stores use, and their schema migrations.

Each store's schema is a list of migrations; `batch_engine_schema` records how many of them a database has.
Migrating takes a transaction-scoped advisory lock first, so workers starting at once apply each migration
exactly once (the others wait, then find nothing left to do). A database migrated by a newer batch_engine is
refused rather than written with an older schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from batch_engine.errors import LedgerError
from batch_engine.state.url import redact

if TYPE_CHECKING:
    import psycopg

# pg_advisory_xact_lock key for migrations: an arbitrary constant of this project ("bEng").
MIGRATION_LOCK = 0x62456E67

_VERSIONS = """
CREATE TABLE IF NOT EXISTS batch_engine_schema (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    migrated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def connect(dsn: str, what: str) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection (every statement its own transaction unless inside `conn.transaction()`)."""
    import psycopg

    try:
        conn = psycopg.connect(dsn, autocommit=True, application_name=f"batch_engine {what}")
    except psycopg.Error as exc:
        raise LedgerError(f"{redact(dsn)}: cannot connect for the {what}: {str(exc).strip()}") from exc
    # Like SQLite's synchronous=NORMAL for the rest of the ledger: a power cut may lose the last commits (a
    # finished row is collected again), never corrupt anything. The writes that stop a second `batches.create`
    # commit with synchronous_commit=on (see PgLedger._durable).
    conn.execute("SET synchronous_commit = off")
    return conn


def migrate(conn: psycopg.Connection[tuple[object, ...]], component: str, migrations: Sequence[str]) -> None:
    """Apply the migrations of `component` this database has not had yet, once, under an advisory lock."""
    import psycopg

    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(_VERSIONS)
            row = conn.execute("SELECT version FROM batch_engine_schema WHERE component = %s", (component,)).fetchone()
            version = 0 if row is None else int(str(row[0]))
            if version > len(migrations):
                raise LedgerError(
                    f"the {component} schema in this database is version {version}, newer than this batch_engine's "
                    f"{len(migrations)}: upgrade batch_engine on this worker"
                )
            for statement in migrations[version:]:
                conn.execute(statement.encode())
            if version < len(migrations):
                conn.execute(
                    "INSERT INTO batch_engine_schema (component, version) VALUES (%s, %s) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version, migrated_at = now()",
                    (component, len(migrations)),
                )
    except psycopg.Error as exc:
        raise LedgerError(f"cannot migrate the {component} schema: {str(exc).strip()}") from exc
