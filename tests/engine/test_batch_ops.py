"""`batch-engine batches list / status / cancel / delete / collect`, against the emulator over HTTP.

Runs whose process is gone are made for real: tests/support/crash_driver.py SIGKILLed at a crash point. The commands
run as subprocesses of the real CLI where the exit code or the printed line is the point, and through
`batch_engine.operations` (what the CLI calls) where the data is.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import pytest
from pydantic import SecretStr

from batch_engine import operations
from batch_engine.client import ApiSettings, make_client
from batch_engine.config import load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.errors import LedgerError
from batch_engine.state.ledger import Ledger, RunRecord
from tests.support.crash import Finished, config_file, engine_env, run_driver, run_process
from tests.support.engine import expected_text_prefix, generated_tasks, read_output, write_jsonl

T = TypeVar("T")
RUN_ARGS = ["tasks.jsonl", "-o", "out.json", "--state-dir", "state", "--config", "config.toml"]
THIRTY_DAYS_S = 30 * 86_400.0

if TYPE_CHECKING:
    from batch_engine.client import AsyncClient


def _setup(tmp_path: Path, count: int = 40, max_requests: int = 20) -> list[dict[str, Any]]:
    tasks = generated_tasks(count)
    write_jsonl(tmp_path / "tasks.jsonl", tasks)
    config_file(
        tmp_path / "config.toml",
        batch_poll_initial_s=0.05,
        batch_poll_interval_s=0.2,
        max_requests_per_batch=max_requests,
    )
    return tasks


def _run_record(tmp_path: Path) -> RunRecord:
    with Ledger.open(tmp_path / "state") as ledger:
        (run,) = ledger.runs()
        return run


def _cli(tmp_path: Path, emulator: RunningEmulator, *args: str) -> Finished:
    command = [sys.executable, "-m", "batch_engine.cli", "batches", *args, "--state-dir", "state"]
    return run_process(command, engine_env(emulator.base_url), tmp_path)


def _ops(emulator: RunningEmulator, tmp_path: Path, call: Callable[[AsyncClient, Ledger], Awaitable[T]]) -> T:
    async def go() -> T:
        client = make_client(ApiSettings(SecretStr("sk-test"), emulator.base_url))
        try:
            with Ledger.open(tmp_path / "state") as ledger:
                return await call(client, ledger)
        finally:
            await client.close()

    return asyncio.run(go())


def test_list_and_status_show_each_batch_with_its_run_and_chunk(emulator: RunningEmulator, tmp_path: Path) -> None:
    _setup(tmp_path)
    assert run_driver(tmp_path, emulator.base_url, [*RUN_ARGS, "--batch-only"]).returncode == 0
    run = _run_record(tmp_path)

    views = _ops(emulator, tmp_path, lambda c, ledger: operations.list_views(c, ledger, run_key=run.run_key[:6]))

    assert sorted(view.chunk_key or "" for view in views) == ["c0", "c1"]
    assert {view.run_key for view in views} == {run.run_key}
    assert all(view.info.status == "ended" and view.info.request_counts["succeeded"] == 20 for view in views)

    listed = _cli(tmp_path, emulator, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {(row["id"], row["chunk"]) for row in orjson.loads(listed.stdout)} == {
        (view.info.id, view.chunk_key) for view in views
    }
    shown = _cli(tmp_path, emulator, "status", views[1].info.id)
    assert shown.returncode == 0, shown.stderr
    assert f"run {run.run_key} chunk c1" in shown.stdout and "succeeded=20" in shown.stdout


def test_cancel_run_cancels_every_in_flight_batch_of_a_mistaken_run(emulator: RunningEmulator, tmp_path: Path) -> None:
    emulator.configure(batch_duration_s=600)
    _setup(tmp_path)
    killed = run_driver(tmp_path, emulator.base_url, [*RUN_ARGS, "--batch-only"], crash_at="batch.polled:4")
    assert killed.returncode == -9
    run = _run_record(tmp_path)

    cancelled = _cli(tmp_path, emulator, "cancel", "--run", run.run_key)

    assert cancelled.returncode == 0, cancelled.stderr
    views = _ops(emulator, tmp_path, lambda c, ledger: operations.list_views(c, ledger, run_key=run.run_key))
    assert len(views) == 2
    assert all(view.info.status == "ended" and view.info.request_counts["canceled"] == 20 for view in views)
    assert cancelled.stdout.count("run " + run.run_key) == 2


def test_collect_finishes_a_run_whose_process_died(emulator: RunningEmulator, tmp_path: Path) -> None:
    emulator.configure(batch_duration_s=600)
    tasks = _setup(tmp_path, count=60)
    killed = run_driver(tmp_path, emulator.base_url, RUN_ARGS, crash_at="batch.recorded:2")
    assert killed.returncode == -9
    run = _run_record(tmp_path)

    waiting = _cli(tmp_path, emulator, "collect", "--run", run.run_key, "-o", "collected.json")
    assert waiting.returncode == 3, waiting.stderr
    assert "still running" in waiting.stdout and not (tmp_path / "collected.json").exists()
    emulator.advance_clock(600)  # the batches end

    done = _cli(tmp_path, emulator, "collect", "--run", run.run_key[:8], "-o", "collected.json", "--wait")

    assert done.returncode == 0, done.stderr
    _, rows = read_output(tmp_path / "collected.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    config = load_config()
    for task, row in zip(tasks, rows, strict=True):
        assert row["status"] == "succeeded" and row["text"].startswith(expected_text_prefix(task, row, config))
    stats = emulator.stats()
    assert stats["batches_created"] == 2 and stats["duplicate_batch_payloads"] == 0  # collected, not resubmitted


def test_archived_results_are_reported_errored_not_retried(
    emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the ledger records the input path as the run was given it
    tasks = _setup(tmp_path, count=20)
    killed = run_driver(tmp_path, emulator.base_url, [*RUN_ARGS, "--batch-only"], crash_at="batch.ended")
    assert killed.returncode == -9
    run = _run_record(tmp_path)
    emulator.advance_clock(THIRTY_DAYS_S)  # past the API's 29-day results window

    async def collect() -> operations.Collected:
        reopened = operations.reopen(tmp_path / "state", run.run_key, tmp_path / "late.json")
        try:
            api = ApiSettings(SecretStr("sk-test"), emulator.base_url)
            return await operations.collect(reopened, api)
        finally:
            reopened.close()

    collected = asyncio.run(collect())

    assert collected.summary is not None and collected.summary.counts.failed == len(tasks)
    _, rows = read_output(tmp_path / "late.json")
    assert {(row["status"], row["error"]["type"]) for row in rows} == {("errored", "results_archived")}
    assert "29-day" in rows[0]["error"]["message"]
    calls = emulator.stats()["calls"]
    assert emulator.stats()["batches_created"] == 1  # not resubmitted
    assert "GET /v1/messages/batches/{id}/results" not in calls  # nothing to download, so not tried
    # A second collect rewrites the same output from the ledger.
    assert asyncio.run(collect()).summary == collected.summary


def test_delete_refuses_a_batch_whose_results_are_not_collected(emulator: RunningEmulator, tmp_path: Path) -> None:
    _setup(tmp_path, count=20)
    killed = run_driver(tmp_path, emulator.base_url, [*RUN_ARGS, "--batch-only"], crash_at="batch.ended")
    assert killed.returncode == -9
    run = _run_record(tmp_path)
    with Ledger.open(tmp_path / "state") as ledger:
        (chunk,) = ledger.chunks(run.run_key)
    assert chunk.batch_id is not None

    refused = _cli(tmp_path, emulator, "delete", chunk.batch_id)

    assert refused.returncode == 2
    assert refused.stderr.startswith("Error: ") and refused.stderr.count("\n") == 1
    assert "batches collect --run" in refused.stderr
    try:
        _ops(emulator, tmp_path, lambda c, ledger: operations.delete(c, ledger, chunk.batch_id or ""))
    except LedgerError:
        pass
    else:
        raise AssertionError("deleting an uncollected batch was not refused")
    assert emulator.stats()["batches"]["ended"] == 1


def test_unknown_run_is_one_error_line(emulator: RunningEmulator, tmp_path: Path) -> None:
    _setup(tmp_path, count=5)
    assert run_driver(tmp_path, emulator.base_url, RUN_ARGS).returncode == 0

    missing = _cli(tmp_path, emulator, "collect", "--run", "nope", "-o", "x.json")

    assert missing.returncode == 2
    assert missing.stderr.startswith("Error: no run 'nope'") and missing.stderr.count("\n") == 1


def test_a_recorded_batch_deleted_elsewhere_is_marked_lost_and_its_rows_resubmitted(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    tasks = _setup(tmp_path, count=30, max_requests=100)
    killed = run_driver(tmp_path, emulator.base_url, [*RUN_ARGS, "--batch-only"], crash_at="batch.ended")
    assert killed.returncode == -9
    run = _run_record(tmp_path)
    with Ledger.open(tmp_path / "state") as ledger:
        (lost,) = [chunk.batch_id for chunk in ledger.chunks(run.run_key) if chunk.batch_id]
    assert lost is not None
    # Deleted in the Console (or by another tool): the API answers 404 for it from now on.
    _ops(emulator, tmp_path, lambda client, _: client.messages.batches.delete(lost))

    rerun = run_driver(tmp_path, emulator.base_url, [*RUN_ARGS, "--batch-only"])

    assert rerun.returncode == 0, rerun.stderr
    assert f"batch {lost} of chunk c0: not found" in rerun.stderr and "marked lost" in rerun.stderr
    run_section, rows = read_output(tmp_path / "out.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert all(row["status"] == "succeeded" and row["batch_id"] != lost for row in rows)
    statuses = {batch["id"]: batch["status"] for batch in run_section["batches"]}
    assert statuses.pop(lost) == "lost" and set(statuses.values()) == {"ended"}
    assert emulator.stats()["batches_created"] == 2
