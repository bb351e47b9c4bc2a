"""One process per run: a second process on a live run is refused (a collector skips the run), and a run whose
process died is taken over by the next one. Real processes, killed for real, on both state backends (the lease
rules themselves: tests/engine/test_state_backends.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_engine.emulator import RunningEmulator
from batch_engine.errors import LeaseLostError, LedgerError
from batch_engine.state.backend import open_ledger
from batch_engine.state.lease import RunLease
from batch_engine.state.ledger import Lease, Ledger
from batch_engine.state.url import parse_state_url
from tests.support.crash import DRIVER, config_file, engine_env, run_driver, run_process
from tests.support.engine import generated_tasks, read_output, write_jsonl

ARGS = ["tasks.jsonl", "-o", "out.json", "--state-dir", "state", "--config", "config.toml"]


def _wait_for_batch(state_url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "the first run exited early"
        with contextlib.suppress(LedgerError), open_ledger(parse_state_url(state_url)) as ledger:
            runs = ledger.runs()
            if runs and any(chunk.batch_id for chunk in ledger.chunks(runs[0].run_key)):
                return
        assert time.monotonic() < deadline, "the first run recorded no batch"
        time.sleep(0.1)


def test_a_second_process_on_a_live_run_is_refused_and_a_dead_ones_run_is_taken_over(
    emulator: RunningEmulator, tmp_path: Path, state_url: str
) -> None:
    args = [*ARGS, "--state-url", state_url]
    emulator.configure(batch_duration_s=3600)  # the first run waits on its batch until it is killed
    tasks = generated_tasks(30)
    write_jsonl(tmp_path / "tasks.jsonl", tasks)
    config_file(tmp_path / "config.toml", batch_poll_initial_s=0.05, batch_poll_interval_s=0.2)
    first = subprocess.Popen(
        [sys.executable, str(DRIVER), *args],
        cwd=tmp_path,
        env=engine_env(emulator.base_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_batch(state_url, first)
        realtime_before = emulator.stats()["messages_succeeded"]

        with open_ledger(parse_state_url(state_url)) as ledger:
            (run,) = ledger.runs()

        second = run_driver(tmp_path, emulator.base_url, args)
        collect = ["batches", "collect", "--run", run.run_key, "-o", "c.json", "--state-url", state_url]
        collector = run_process(
            [sys.executable, "-m", "batch_engine.cli", *collect], engine_env(emulator.base_url), tmp_path
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()

    assert second.returncode == 2, second.stderr
    (error,) = [line for line in second.stderr.splitlines() if line.startswith("Error:")]
    assert f"pid {first.pid}" in error and "being worked on" in error
    assert collector.returncode == 3, collector.stderr
    assert "skipped" in collector.stdout and f"pid {first.pid}" in collector.stdout
    # Neither sent anything: one batch, no realtime request beyond the first run's.
    stats = emulator.stats()
    assert stats["batches_created"] == 1
    assert stats["messages_succeeded"] == realtime_before

    # The first process is gone (killed): the next run takes its lease over and finishes on the same batch.
    emulator.advance_clock(3600)
    third = run_driver(tmp_path, emulator.base_url, args)

    assert third.returncode == 0, third.stderr
    _, rows = read_output(tmp_path / "out.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["duplicate_succeeded_custom_ids"] == 0
    assert stats["repeated_realtime_requests"] <= 10  # only the realtime requests in flight at the kill, if any


def _take_over(state: Path, run_key: str) -> None:
    """Another process takes the run's lease as if this one's heartbeat had expired (suspended, partitioned)."""
    with Ledger.open(state) as ledger:
        now = time.time()
        ledger.take_lease(Lease(run_key, "the-other-process", "elsewhere", 1, now, now + 600), lambda held: False)


def test_a_process_whose_lease_was_taken_over_stops_sending(emulator: RunningEmulator, tmp_path: Path) -> None:
    # The process was suspended past its lease's expiry and another took the run over: when it wakes up it must
    # not keep sending what the new owner sends too (every request paid twice).
    emulator.configure(latency_s=0.05)
    write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(60))
    config_file(tmp_path / "config.toml")
    args = ["run", *ARGS, "--realtime-only", "--concurrency", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "batch_engine.cli", *args],
        cwd=tmp_path,
        env=engine_env(emulator.base_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the run ended before it was taken over"
            answered = emulator.stats()["messages_succeeded"]
            if answered >= 5:
                break
            assert time.monotonic() < deadline, "the run sent nothing"
            time.sleep(0.02)
        with Ledger.open(tmp_path / "state") as ledger:
            (run,) = ledger.runs()
        _take_over(tmp_path / "state", run.run_key)
        taken_at = emulator.stats()["messages_succeeded"]
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()

    assert process.returncode == 2, stderr
    (error,) = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert "taken over" in error and "pid 1 on elsewhere" in error
    # At most the request in flight at the take-over was answered after it (concurrency 1).
    assert emulator.stats()["messages_succeeded"] <= taken_at + 1
    with Ledger.open(tmp_path / "state") as ledger:
        held = ledger.lease(run.run_key)
    assert held is not None and held.owner == "the-other-process"  # the stopped process left the lease alone


def test_the_heartbeat_that_finds_the_lease_taken_over_stops_the_work(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        lease = RunLease(ledger, "run1")
        lease.take()

        async def work() -> None:
            async with lease.heartbeat(every_s=0.02):
                _take_over(tmp_path, "run1")
                await asyncio.sleep(30)  # a long wait on a batch: the heartbeat must end it

        started = time.monotonic()
        with pytest.raises(LeaseLostError, match="taken over by pid 1 on elsewhere"):
            asyncio.run(work())
        assert time.monotonic() - started < 5
