"""Crash safety: SIGKILL `batch-engine run` while its batch is in progress, run the same command again, and the
second process re-attaches to the batch instead of creating another, and sends nothing already done."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batch_engine.emulator import emulator_process as start_emulator_process
from batch_engine.state.ledger import Ledger
from tests.support.engine import expected_text_prefix, fast_config, generated_tasks, read_output, write_jsonl

WAIT_S = 60.0


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


def _kill_processes_marked(marker: str) -> list[int]:
    """SIGKILL every process whose environment carries `marker` (what a killed CLI may leave behind: its
    ephemeral Prefect server is a child process that can outlive a SIGKILLed parent)."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


@pytest.fixture
def emulator_process() -> Iterator[str]:
    """`batch-engine emulator` as its own process (it outlives the CLI runs); its base URL.

    Batches take an hour of emulator time, so one cannot end before the kill; the test then moves the
    emulator's clock on.
    """
    with start_emulator_process("--batch-duration", "1h") as emulator:
        yield emulator.base_url


def _wait_until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_a_killed_run_resumes_on_the_same_batch_and_sends_nothing_twice(
    emulator_process: str, tmp_path: Path, migrated_prefect_db: Path
) -> None:
    base_url = emulator_process
    tasks = generated_tasks(40, realtime_every=4)
    realtime = {i for i, task in enumerate(tasks) if task["task_type"] == "user_query"}
    input_path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    output_path, state_dir = tmp_path / "out.json", tmp_path / "state"
    command = [sys.executable, "-m", "batch_engine.cli", "run", str(input_path), "-o", str(output_path)]
    command += ["--state-dir", str(state_dir), "--poll-interval", "200ms"]
    # Without PREFECT_API_URL `run` runs in-process; a Prefect home of its own keeps it off any user-wide state.
    home = tmp_path / "prefect-home"
    home.mkdir()
    shutil.copy(migrated_prefect_db, home / "prefect.db")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "ANTHROPIC_"))}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env |= {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-test"}

    def stats() -> dict[str, Any]:
        return dict(httpx.get(f"{base_url}/_emulator/stats").json())

    def realtime_finished() -> bool:
        with Ledger.open(state_dir) as ledger:
            runs = ledger.runs()
            return len(runs) == 1 and realtime <= ledger.finished_indexes(runs[0].run_key)

    try:
        first = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            _wait_until("the batch is created", lambda: stats()["batches_created"] == 1)
            _wait_until("the realtime tasks are in the ledger", realtime_finished)
            os.killpg(first.pid, signal.SIGKILL)  # the crash: the CLI and everything it started, no cleanup
            assert first.wait(timeout=15) == -signal.SIGKILL
        finally:
            _stop(first)
        before = stats()
        assert before["batches"]["in_progress"] == 1
        assert not output_path.exists()

        httpx.post(f"{base_url}/_emulator/clock", json={"advance_s": 3600}).raise_for_status()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=2 * WAIT_S, check=False)
    finally:
        _kill_processes_marked(f"PREFECT_HOME={home}")

    assert second.returncode == 0, second.stderr
    after = stats()
    assert after["batches_created"] == 1
    assert after["calls"]["POST /v1/messages"] == {"200": len(realtime)} == before["calls"]["POST /v1/messages"]
    assert after["repeated_realtime_requests"] == 0
    run, rows = read_output(output_path)
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    [batch] = run["batches"]
    for task, row in zip(tasks, rows, strict=True):
        assert row["status"] == "succeeded" and row["attempts"] == 1
        assert row["text"].startswith(expected_text_prefix(task, row, fast_config()))
        assert row["batch_id"] == (None if row["index"] in realtime else batch["id"])
