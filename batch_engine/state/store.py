"""One SQLite file in WAL mode with a versioned schema: the base of the run ledger and the usage log."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Self

from batch_engine.errors import LedgerError


class SqliteStore:
    """Opens (creating if needed) a SQLite file, applies `schema`, and refuses a file of another version."""

    def __init__(self, path: Path, schema: str, version: int, what: str) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            # WAL: a reader never sees half a transaction and a crash never leaves one half-applied.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);")
            self._db.executescript(schema)
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
            elif int(found["value"]) != version:
                raise LedgerError(f"{path}: {what} schema {found['value']} is not {version}")
        except sqlite3.Error as exc:
            raise LedgerError(f"{path}: cannot use the {what}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
