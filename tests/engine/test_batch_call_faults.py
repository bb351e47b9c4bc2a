"""Faults on the batch lane's own calls (create, poll, cancel, results) against the real SDK and the emulator:
whatever happens to a batch's calls, the realtime lane finishes its tasks. A batch whose calls fail after every
retry stays open in the ledger (its rows are paid for: sending them realtime would pay twice), the run ends with
one error naming it, and running the same command again collects it."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings
from batch_engine.config import Config
from batch_engine.emulator import RunningEmulator
from batch_engine.errors import BatchEngineError
from batch_engine.runner import Run, RunOptions
from batch_engine.state.ledger import Ledger
from tests.support.engine import NO_WAIT_POLICY, fast_config, generated_tasks, run_engine, write_jsonl

REALTIME = 12  # tasks; with 2 workers and 0.3 s per request the realtime lane runs ~1.8 s
BATCH = 20


def _tasks() -> list[dict[str, Any]]:
    realtime = [
        {"task_id": f"r{i}", "task_type": "user_query", "input_data": {"question": f"q {i}?"}} for i in range(REALTIME)
    ]
    batch = [{"task_id": f"b{i}", "task_type": "classify_bulk", "input_data": {"text": f"t {i}"}} for i in range(BATCH)]
    return [*realtime, *batch]


def _send(emulator: RunningEmulator, path: Path, tmp_path: Path, config: Config, between_polls: list[float]) -> None:
    """`Run.send` as `batch-engine run` does it, the batch lane's waits between polls recorded (and kept short)."""

    async def batch_sleep(seconds: float) -> None:
        between_polls.append(seconds)
        await asyncio.sleep(0.01)

    async def go() -> None:
        prepared = Run.prepare(path, tmp_path / "out.json", config, RunOptions(state_dir=tmp_path / "state"))
        try:
            api = ApiSettings(SecretStr("sk-test"), emulator.base_url)
            async with prepared.lanes(api, policy=NO_WAIT_POLICY) as lanes:
                lanes.batch.sleep = batch_sleep
                await prepared.send(lanes)
            prepared.write_output()
        finally:
            prepared.close()

    asyncio.run(go())


def _ledger_rows(tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """Each finished task's status, and the status of each chunk, from the run's ledger."""
    with Ledger.open(tmp_path / "state") as ledger:
        [run] = ledger.runs()
        rows = {row.task_id: row.status for row in ledger.results(run.run_key)}
        chunks = [chunk.status for chunk in ledger.chunks(run.run_key)]
    return rows, chunks


def test_batch_results_failing_after_every_retry_leave_the_batch_open_and_the_realtime_lane_running(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # The batch ends at once, and then its results download fails on every attempt the policy allows, while
    # the realtime requests still have more than a second to go.
    emulator.configure(latency_s=0.3)
    emulator.script_fault("batches_results", "500", count=NO_WAIT_POLICY.attempts)
    path = write_jsonl(tmp_path / "tasks.jsonl", _tasks())
    config = fast_config(realtime_concurrency=2)

    with pytest.raises(BatchEngineError) as raised:
        _send(emulator, path, tmp_path, config, [])

    rows, chunks = _ledger_rows(tmp_path)
    # Every realtime task finished, none was cut short by the batch lane's failure...
    assert {task_id: status for task_id, status in rows.items() if task_id.startswith("r")} == {
        f"r{i}": "succeeded" for i in range(REALTIME)
    }
    # ...and the batch's rows were neither failed nor sent again realtime: the batch stays open, owing results.
    assert not any(task_id.startswith("b") for task_id in rows)
    assert chunks == ["ended"]
    message = str(raised.value)
    assert _batch_id(tmp_path) in message and "500" in message and "run the same command again" in message
    assert "\n" not in message

    # The same command again collects the open batch: no second batch, no realtime request sent twice.
    emulator.configure(latency_s=0.0)
    output = run_engine(emulator, path, tmp_path, config=config)
    assert Counter(row["status"] for row in output.rows) == {"succeeded": REALTIME + BATCH}
    stats = emulator.stats()
    assert stats["batches_created"] == 1
    assert stats["calls"]["GET /v1/messages/batches/{id}/results"] == {"500": NO_WAIT_POLICY.attempts, "200": 1}
    assert stats["calls"]["POST /v1/messages"] == {"200": REALTIME}


def _batch_id(tmp_path: Path) -> str:
    with Ledger.open(tmp_path / "state") as ledger:
        [run] = ledger.runs()
        [chunk] = ledger.chunks(run.run_key)
    assert chunk.batch_id is not None
    return chunk.batch_id


def test_polls_failing_until_the_deadline_and_a_failing_cancel_never_stop_the_realtime_lane(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # Every poll of the batch fails; at the batch timeout (1 s) the cancel fails too, after every retry.
    emulator.configure(latency_s=0.3)
    emulator.script_fault("batches_retrieve", "500", count=1000)
    emulator.script_fault("batches_cancel", "529", count=NO_WAIT_POLICY.attempts)
    path = write_jsonl(tmp_path / "tasks.jsonl", _tasks())
    config = fast_config(realtime_concurrency=2, batch_timeout_s=1.0)
    between_polls: list[float] = []

    with pytest.raises(BatchEngineError) as raised:
        _send(emulator, path, tmp_path, config, between_polls)

    rows, chunks = _ledger_rows(tmp_path)
    assert {task_id: status for task_id, status in rows.items() if task_id.startswith("r")} == {
        f"r{i}": "succeeded" for i in range(REALTIME)
    }
    assert not any(task_id.startswith("b") for task_id in rows)
    assert chunks == ["submitted"]
    assert _batch_id(tmp_path) in str(raised.value) and "529" in str(raised.value)
    # The failing polls backed off for this batch (fast_config: from 0.05 s, growing 1.5x a poll, ±20 % jitter).
    assert len(between_polls) >= 2
    assert between_polls[0] <= 0.05 * 1.2 < 0.05 * 1.5 * 0.8 <= between_polls[1]


def test_batch_creates_failing_after_every_retry_send_their_rows_realtime(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    emulator.script_fault("batches_create", "529", count=NO_WAIT_POLICY.attempts)
    tasks = generated_tasks(30, realtime_every=3)

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    assert Counter(row["status"] for row in output.rows) == {"succeeded": 30}
    assert Counter(row["route"] for row in output.rows) == {"realtime": 30}
    assert emulator.stats()["batches_created"] == 0
