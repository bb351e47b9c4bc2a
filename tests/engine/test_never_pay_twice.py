"""The check an outsider would run on "never pay twice": only CLI processes and the emulator's public API.

A run is killed between a batch create landing and its id being recorded; another job then creates a running
batch of the same size on the same key; the config is edited (a price only); the run is started again, and while
it works a second process is started on the same input. Then what the emulator billed is counted: no batch row
billed twice, the other job's batch neither adopted nor cancelled, every billed row of ours logged once.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from batch_engine.emulator import RunningEmulator
from batch_engine.state.ledger import Ledger
from batch_engine.state.usage_log import UsageLog
from tests.engine.test_ambiguous_create import _create
from tests.support.crash import config_file, emulator_batches, engine_env, run_process
from tests.support.engine import generated_tasks, read_output, write_jsonl

CLI = [sys.executable, "-m", "batch_engine.cli", "run"]
ARGS = ["tasks.jsonl", "-o", "out.json", "--state-dir", "state", "--config", "config.toml", "--batch-only"]
CHUNK = 30


def _lease_pid(state: Path) -> int | None:
    with Ledger.open(state) as ledger:
        (run,) = ledger.runs()
        lease = ledger.lease(run.run_key)
    return lease.pid if lease is not None else None


def test_two_processes_a_price_edit_and_another_jobs_batch_during_recovery_bill_nothing_twice(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    emulator.configure(batch_duration_s=3600)
    tasks = generated_tasks(2 * CHUNK)
    write_jsonl(tmp_path / "tasks.jsonl", tasks)
    config_file(
        tmp_path / "config.toml", batch_poll_initial_s=0.05, batch_poll_interval_s=0.2, max_requests_per_batch=CHUNK
    )

    # 1. Killed right after the second chunk's create landed, before its batch id was recorded.
    killed = run_process([*CLI, *ARGS], engine_env(emulator.base_url, "batch.create.after:2"), tmp_path)
    assert killed.returncode == -9, killed.stderr
    assert emulator.stats()["batches_created"] == 2
    # 2. Another job (another shard, state dir or team on the key) creates a running batch of the chunk's size.
    foreign = _create(emulator.base_url, [f"other{i}" for i in range(CHUNK)])
    # 3. Only a price is edited before the re-run: the same requests, so the same run.
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text(text.replace("price = { input = 0.10,", "price = { input = 0.11,", 1))

    # 4. The re-run cannot tell the two running candidates apart yet and waits; a second process meanwhile.
    rerun = subprocess.Popen(
        [*CLI, *ARGS],
        cwd=tmp_path,
        env=engine_env(emulator.base_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _lease_pid(tmp_path / "state") != rerun.pid:
            assert rerun.poll() is None, rerun.communicate()
            assert time.monotonic() < deadline, "the re-run never took the run's lease"
            time.sleep(0.1)
        second = run_process([*CLI, *ARGS], engine_env(emulator.base_url), tmp_path)
        emulator.advance_clock(3600)  # every batch ends; results tell which batch is the chunk's
        _, stderr = rerun.communicate(timeout=90)
    finally:
        if rerun.poll() is None:
            rerun.kill()
            rerun.communicate()

    assert second.returncode == 2, second.stderr
    (error,) = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
    assert f"pid {rerun.pid}" in error
    assert rerun.returncode == 0, stderr
    _, rows = read_output(tmp_path / "out.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert {row["status"] for row in rows} == {"succeeded"}

    # What the emulator billed: three batches (ours two, the other job's one), no row of ours twice.
    stats = emulator.stats()
    batches = {info.id: (info, ids) for info, ids in emulator_batches(emulator.base_url)}
    assert stats["batches_created"] == 3, stats
    assert stats["duplicate_succeeded_custom_ids"] == 0, stats
    assert stats["batch_rows_created"] == 3 * CHUNK
    other, _ = batches[foreign]
    assert other.request_counts["canceled"] == 0 and other.request_counts["succeeded"] == CHUNK
    assert foreign not in {row["batch_id"] for row in rows}
    with Ledger.open(tmp_path / "state") as ledger:
        assert [run.status for run in ledger.runs()] == ["complete"]  # the price edit made no second run
    # The usage log holds every billed row of our two batches, each once, and nothing of the other job's.
    with UsageLog.open(tmp_path / "state") as log:
        records = log.records()
    ours = [batch_id for batch_id in batches if batch_id != foreign]
    assert len(records) == 2 * CHUNK and {r.request_key for r in records} == {
        f"batch:{batch_id}:{custom_id}" for batch_id in ours for custom_id in batches[batch_id][1]
    }
