"""The SQLite stores' WAL is copied back into the database by a thread of its own, never inside a commit on the
event loop's thread (a checkpoint writes ~4 MB and fsyncs: up to 150 ms here, holding every realtime answer)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from batch_engine.state.usage_log import UsageLog, UsageRecord
from tests.support.usage import usage_row


def _checkpoint_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("checkpoint ")]


def _record(i: int) -> UsageRecord:
    return usage_row(at=float(i), task_id=f"t{i}", input_tokens=100, route_reason="x" * 200, request_key=f"b:t{i}")


def test_commits_never_checkpoint_and_the_thread_does(tmp_path: Path) -> None:
    before = len(_checkpoint_threads())
    log = UsageLog.open(tmp_path)
    try:
        assert log._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert len(_checkpoint_threads()) == before + 1
        database = tmp_path / "usage.sqlite3"
        for start in range(0, 20_000, 1000):  # ~6 MB of WAL: past SQLite's automatic checkpoint
            log.append([_record(i) for i in range(start, start + 1000)])
        deadline = time.monotonic() + 5
        while database.stat().st_size < 4 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert database.stat().st_size >= 4 << 20  # copied back while this connection stays open
        with sqlite3.connect(database) as reader:
            assert reader.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 20_000
    finally:
        log.close()
    assert len(_checkpoint_threads()) == before  # closed with its store
