"""The ambiguous create: the process dies after `batches.create` landed but before the batch id was recorded.

A re-run finds the batch (unrecorded, created since the intent, the chunk's size, and, once ended, the chunk's
custom_ids in its results) and adopts it instead of paying for a second one. When two batches carry the chunk,
guessing could lose rows or keep a duplicate: the CLI stops with one `Error:` line saying what to do, and doing
it lets the next re-run finish.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings, BatchBody, create_batch, make_client
from batch_engine.emulator import RunningEmulator
from batch_engine.state.ledger import Ledger
from tests.support.crash import config_file, emulator_batches, engine_env, run_driver, run_process
from tests.support.engine import generated_tasks, read_output, write_jsonl

ARGS = ["tasks.jsonl", "-o", "out.json", "--state-dir", "state", "--config", "config.toml", "--batch-only"]


def _setup(tmp_path: Path, count: int = 30) -> list[dict[str, Any]]:
    tasks = generated_tasks(count)
    write_jsonl(tmp_path / "tasks.jsonl", tasks)
    config_file(tmp_path / "config.toml", batch_poll_initial_s=0.05, batch_poll_interval_s=0.2)
    return tasks


def _chunks(state_dir: Path) -> list[Any]:
    with Ledger.open(state_dir) as ledger:
        (run,) = ledger.runs()
        return ledger.chunks(run.run_key)


def _wait_ended(base_url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while sum(info.status == "ended" for info, _ in emulator_batches(base_url, with_ids=False)) < count:
        assert time.monotonic() < deadline, "batches did not end"
        time.sleep(0.05)


def test_a_create_that_landed_before_its_id_was_recorded_is_adopted_on_rerun(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    tasks = _setup(tmp_path)
    crashed = run_driver(tmp_path, emulator.base_url, ARGS, crash_at="batch.create.after")
    assert crashed.returncode == -9
    (chunk,) = _chunks(tmp_path / "state")
    assert (chunk.status, chunk.batch_id) == ("intent", None)
    ((landed, _),) = emulator_batches(emulator.base_url, with_ids=False)

    rerun = run_driver(tmp_path, emulator.base_url, ARGS)

    assert rerun.returncode == 0, rerun.stderr
    assert f"adopted batch {landed.id}" in rerun.stderr
    assert emulator.stats()["batches_created"] == 1
    assert _chunks(tmp_path / "state")[0].batch_id == landed.id
    _, rows = read_output(tmp_path / "out.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert {row["batch_id"] for row in rows} == {landed.id}


def test_an_ended_batch_of_the_same_size_from_elsewhere_is_told_apart_by_its_results(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    tasks = _setup(tmp_path)
    crashed = run_driver(tmp_path, emulator.base_url, ARGS, crash_at="batch.create.before")
    assert crashed.returncode == -9
    # Another job's batch, created after the intent, with as many requests as the chunk.
    foreign = _create(emulator.base_url, [f"other{i}" for i in range(len(tasks))])
    _wait_ended(emulator.base_url, 1)

    rerun = run_driver(tmp_path, emulator.base_url, ARGS)

    assert rerun.returncode == 0, rerun.stderr
    assert emulator.stats()["batches_created"] == 2
    assert _chunks(tmp_path / "state")[0].batch_id not in (None, foreign)


def test_two_unrecorded_batches_carrying_the_chunk_stop_the_cli_with_one_error_line(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    tasks = _setup(tmp_path)
    crashed = run_driver(tmp_path, emulator.base_url, ARGS, crash_at="batch.create.after")
    assert crashed.returncode == -9
    # The same chunk submitted a second time (another process, a person) before anyone recorded either.
    duplicate = _create(emulator.base_url, [task["task_id"] for task in tasks])
    _wait_ended(emulator.base_url, 2)

    cli = [sys.executable, "-m", "batch_engine.cli", "run", *ARGS]
    refused = run_process(cli, engine_env(emulator.base_url), tmp_path)

    assert refused.returncode == 2, refused.stderr
    error_lines = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    (error,) = error_lines
    both = [info.id for info, _ in emulator_batches(emulator.base_url, with_ids=False)]
    assert all(batch_id in error for batch_id in both)
    assert "batch-engine batches delete" in error
    assert emulator.stats()["batches_created"] == 2  # it created nothing while refusing
    assert not (tmp_path / "out.json").exists()

    # Doing what it says: delete one, re-run, and the other is adopted.
    deleted = run_process(
        [sys.executable, "-m", "batch_engine.cli", "batches", "delete", duplicate, "--state-dir", "state"],
        engine_env(emulator.base_url),
        tmp_path,
    )
    assert deleted.returncode == 0, deleted.stderr
    rerun = run_driver(tmp_path, emulator.base_url, ARGS)
    assert rerun.returncode == 0, rerun.stderr
    kept = _chunks(tmp_path / "state")[0].batch_id
    assert kept is not None and kept != duplicate
    assert emulator.stats()["batches_created"] == 2
    _, rows = read_output(tmp_path / "out.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]


@pytest.mark.parametrize("fault", ["after_commit", "drop", "after_commit_no_retry"])
def test_a_create_that_landed_and_then_failed_is_adopted_not_repeated(
    emulator: RunningEmulator, tmp_path: Path, fault: str
) -> None:
    # The API created the batch, then answered 500/529 (or nothing): there is no idempotency key, so only looking
    # for the batch before retrying keeps the chunk from being paid twice.
    tasks = _setup(tmp_path)
    emulator.script_fault("batches_create", fault)

    ran = run_driver(tmp_path, emulator.base_url, ARGS)

    assert ran.returncode == 0, ran.stderr
    assert emulator.stats()["batches_created"] == 1
    assert emulator.stats()["duplicate_succeeded_custom_ids"] == 0
    ((landed, _),) = emulator_batches(emulator.base_url, with_ids=False)
    assert f"adopted batch {landed.id}" in ran.stderr
    _, rows = read_output(tmp_path / "out.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]


def test_a_create_refused_with_x_should_retry_false_is_reconciled_before_its_rows_are_marked_errored(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # A 500 marked `x-should-retry: false` is not retried, but it says nothing of whether the batch was created
    # (no idempotency key): the engine looks for the batch before it gives the chunk's rows up as errored.
    tasks = _setup(tmp_path)
    emulator.script_fault("batches_create", "500_no_retry")

    ran = run_driver(tmp_path, emulator.base_url, ARGS)

    assert ran.returncode == 1, ran.stderr
    calls = emulator.stats()["calls"]
    assert sum(calls.get("GET /v1/messages/batches", {}).values()) >= 1, calls  # reconciled first
    assert emulator.stats()["batches_created"] == 0
    _, rows = read_output(tmp_path / "out.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert {row["status"] for row in rows} == {"errored"}
    assert (_chunks(tmp_path / "state")[0].status, _chunks(tmp_path / "state")[0].batch_id) == ("failed", None)


def test_a_running_batch_of_another_job_is_neither_adopted_nor_cancelled(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # Killed after writing the intent, before sending the create: no batch of ours can exist. Meanwhile another
    # job (another shard, state dir or team on the same key) created a batch of the chunk's size.
    emulator.configure(batch_duration_s=600)
    tasks = _setup(tmp_path)
    crashed = run_driver(tmp_path, emulator.base_url, [*ARGS, "--batch-timeout", "2"], crash_at="batch.intent")
    assert crashed.returncode == -9
    foreign = _create(emulator.base_url, [f"other{i}" for i in range(len(tasks))])

    rerun = run_driver(tmp_path, emulator.base_url, [*ARGS, "--batch-timeout", "2"])

    assert rerun.returncode in (0, 1), rerun.stderr
    assert foreign not in {chunk.batch_id for chunk in _chunks(tmp_path / "state")}
    infos = {info.id: info for info, _ in emulator_batches(emulator.base_url, with_ids=False)}
    assert infos[foreign].status == "in_progress" and infos[foreign].request_counts["canceled"] == 0
    assert emulator.stats()["batches_created"] == 2

    # Nor does `batches cancel` touch a batch no run of this state dir recorded.
    cli = [sys.executable, "-m", "batch_engine.cli", "batches", "cancel", foreign, "--state-dir", "state"]
    refused = run_process(cli, engine_env(emulator.base_url), tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("Error:"), refused.stderr
    assert foreign in refused.stderr
    infos = {info.id: info for info, _ in emulator_batches(emulator.base_url, with_ids=False)}
    assert infos[foreign].status == "in_progress"


def _create(base_url: str, custom_ids: list[str]) -> str:
    params = {"model": "claude-haiku-5-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}

    async def create() -> str:
        client = make_client(ApiSettings(SecretStr("sk-test"), base_url))
        try:
            info = await create_batch(client, BatchBody.from_params(lambda: ((cid, params) for cid in custom_ids)))
            return info.id
        finally:
            await client.close()

    return asyncio.run(create())


def test_concurrent_creates_of_equal_chunks_never_take_each_others_batch(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # Two chunks of the same size are created at once. The first create to arrive is refused with a 500 before
    # anything is made; the second makes its batch and its answer is lost (a dropped connection). Both outcomes
    # are unknown to the engine. The refused chunk finds one unrecorded running batch of its size, but it is the
    # other chunk's: only that batch's results, once it ends, can tell, so neither chunk adopts a batch before then.
    tasks = generated_tasks(30)
    write_jsonl(tmp_path / "tasks.jsonl", tasks)
    config_file(
        tmp_path / "config.toml", batch_poll_initial_s=0.05, batch_poll_interval_s=0.2, max_requests_per_batch=15
    )
    emulator.configure(batch_duration_s=1.0)
    emulator.script_fault("batches_create", "500")
    emulator.script_fault("batches_create", "drop")

    ran = run_driver(tmp_path, emulator.base_url, ARGS)
    assert ran.returncode == 0, ran.stderr
    chunks = _chunks(tmp_path / "state")
    assert len(chunks) == 2 and len({chunk.batch_id for chunk in chunks}) == 2
    assert emulator.stats()["batches_created"] == 2  # the dropped one adopted, the refused one created again
    assert emulator.stats()["duplicate_succeeded_custom_ids"] == 0
    carried = {info.id: custom_ids for info, custom_ids in emulator_batches(emulator.base_url)}
    for chunk in chunks:
        assert carried[chunk.batch_id] == {tasks[i]["task_id"] for i in chunk.task_indexes}
    _, rows = read_output(tmp_path / "out.json")
    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert {row["route"] for row in rows} == {"batch"}
