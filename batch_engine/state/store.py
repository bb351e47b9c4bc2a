"""One SQLite file in WAL mode with a versioned schema: the base of the run ledger and the usage log."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any, Self

from batch_engine.errors import LedgerError

# Rows per INSERT statement when writing many. `executemany` binds and steps one row at a time, re-entering SQLite
# (and leaving and taking the GIL) per row; statements of 64 rows' VALUES took ~17 % less CPU to append usage rows
# (23 columns) and to save result rows (100k rows in blocks of 1000, alternating with executemany); 250 or 1000
# rows a statement gained nothing more. 64 rows of 23 values stay far under SQLite's 32,766 variables.
BLOCK_ROWS = 64


@functools.cache
def _inserts(insert: str, width: int, conflict: str) -> tuple[str, str]:
    """(the statement of `BLOCK_ROWS` rows, the statement of one row) of `insert … VALUES … conflict`."""
    one = "(" + ", ".join("?" * width) + ")"
    return f"{insert} VALUES {', '.join([one] * BLOCK_ROWS)} {conflict}", f"{insert} VALUES {one} {conflict}"


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
            # Checkpoints run on a thread of their own (`_Checkpointer`), never inside a commit of this connection.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.executescript("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);")
            self._db.executescript(schema)
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
            elif int(found["value"]) != version:
                raise LedgerError(f"{path}: {what} schema {found['value']} is not {version}")
            self._checkpointer = _Checkpointer(path)
        except sqlite3.Error as exc:
            raise LedgerError(f"{path}: cannot use the {what}: {exc}") from exc

    def _insert_rows(self, insert: str, width: int, rows: Sequence[tuple[Any, ...]], conflict: str = "") -> None:
        """Run `insert VALUES (row) conflict` for each of `rows` (of `width` values), in order, `BLOCK_ROWS` rows a
        statement. Row by row as `executemany` would: a row conflicting with an earlier one of the same statement
        sees it. Inside the caller's transaction."""
        block, one = _inserts(insert, width, conflict)
        full = len(rows) - len(rows) % BLOCK_ROWS
        for start in range(0, full, BLOCK_ROWS):
            self._db.execute(block, tuple(chain.from_iterable(rows[start : start + BLOCK_ROWS])))
        if full < len(rows):
            # Plain tuples: sqlite3 binds a tuple subclass (a named tuple) item by item through the sequence
            # protocol, ~2 µs a row slower.
            self._db.executemany(one, [tuple(row) for row in rows[full:]])

    def close(self) -> None:
        self._checkpointer.close()
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _Checkpointer:
    """Copies a WAL file's commits back into the database from a thread of its own, every `interval_s`.

    SQLite's automatic checkpoint runs inside the commit that fills the WAL past 1,000 pages: ~4 MB written into
    the database file and an fsync (median 9 ms, up to 150 ms here), on the event loop's thread. At a million
    results that was several hundred stalls of the loop, each holding every realtime answer. Here the copy and the
    fsync run on this thread (SQLite releases the GIL while it works), and a PASSIVE checkpoint never waits for a
    reader or a writer: what it cannot copy now, it copies next time. The last connection to close checkpoints
    what is left, as before.
    """

    def __init__(self, path: Path, interval_s: float = 0.25) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, name=f"checkpoint {path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            # Busy, or the file gone under a test: the next round, or the last connection's close, copies it.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._db.close()
