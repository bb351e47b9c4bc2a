"""Run identity is what is sent: a config edit that changes no request resumes the same run on its batches; one
that changes requests is refused while the old run is unfinished, with the two ways on (`--resume-run KEY`,
`--supersede`), and neither pays for a batch twice. Real processes, killed for real, billing counted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from batch_engine.config import load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.errors import RunChangedError
from batch_engine.runner import Run, RunOptions
from batch_engine.state.ledger import Ledger
from batch_engine.state.usage_log import UsageLog
from tests.support.crash import config_file, run_driver
from tests.support.engine import generated_tasks, read_output, write_jsonl

# The realtime task type's max_tokens: editing it changes every realtime request and no batch row.
USER_QUERY_MAX_TOKENS = "max_tokens = 512\ncache_system = true\nsystem = \"Answer the user's question"
ARGS = ["tasks.jsonl", "-o", "out.json", "--state-dir", "state", "--config", "config.toml"]


def _killed_mid_run(emulator: RunningEmulator, tmp_path: Path) -> list[dict[str, object]]:
    """A run killed with its batch in flight (it takes an hour of emulator time)."""
    emulator.configure(batch_duration_s=3600)
    tasks = generated_tasks(60)
    write_jsonl(tmp_path / "tasks.jsonl", tasks)
    config_file(tmp_path / "config.toml", batch_poll_initial_s=0.05, batch_poll_interval_s=0.2)
    crashed = run_driver(tmp_path, emulator.base_url, ARGS, crash_at="batch.polled")
    assert crashed.returncode == -9
    assert emulator.stats()["batches_created"] == 1
    return tasks


def _edit(tmp_path: Path, old: str, new: str) -> None:
    path = tmp_path / "config.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _runs(tmp_path: Path) -> dict[str, str]:
    with Ledger.open(tmp_path / "state") as ledger:
        return {run.run_key: run.status for run in ledger.runs()}


def _finish(emulator: RunningEmulator, tmp_path: Path, *flags: str) -> list[dict[str, object]]:
    emulator.advance_clock(3600)
    rerun = run_driver(tmp_path, emulator.base_url, [*ARGS, *flags])
    assert rerun.returncode == 0, rerun.stderr
    return read_output(tmp_path / "out.json")[1]


def test_a_price_only_config_change_resumes_the_same_run_on_its_batch(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    tasks = _killed_mid_run(emulator, tmp_path)
    (key,) = _runs(tmp_path)
    _edit(tmp_path, 'price_as_of = "2026-10-07"', 'price_as_of = "2026-11-30"')
    _edit(tmp_path, "price = { input = 0.10,", "price = { input = 0.11,")

    rows = _finish(emulator, tmp_path)

    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert _runs(tmp_path) == {key: "complete"}
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["duplicate_succeeded_custom_ids"] == 0


def test_a_request_change_is_refused_and_resume_run_finishes_the_old_run_as_it_was(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    tasks = _killed_mid_run(emulator, tmp_path)
    (key,) = _runs(tmp_path)
    with Ledger.open(tmp_path / "state") as ledger:
        (batch_id,) = [chunk.batch_id for chunk in ledger.chunks(key) if chunk.batch_id]
    _edit(tmp_path, USER_QUERY_MAX_TOKENS, USER_QUERY_MAX_TOKENS.replace("512", "600"))

    refused = run_driver(tmp_path, emulator.base_url, ARGS)

    assert refused.returncode == 2
    (error,) = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert key in error and batch_id in error and f"--resume-run {key}" in error and "--supersede" in error
    assert emulator.stats()["batches_created"] == 1

    rows = _finish(emulator, tmp_path, "--resume-run", key)

    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    assert _runs(tmp_path) == {key: "complete"}
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["duplicate_succeeded_custom_ids"] == 0
    assert stats["repeated_realtime_requests"] <= 32  # only requests in flight at the kill, if any, went twice


def test_supersede_keeps_the_old_runs_batch_for_unchanged_tasks_and_sends_only_what_changed(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    tasks = _killed_mid_run(emulator, tmp_path)
    (old_key,) = _runs(tmp_path)
    realtime_before = emulator.stats()["messages_succeeded"]
    _edit(tmp_path, USER_QUERY_MAX_TOKENS, USER_QUERY_MAX_TOKENS.replace("512", "600"))

    rows = _finish(emulator, tmp_path, "--supersede")

    assert [row["task_id"] for row in rows] == [task["task_id"] for task in tasks]
    runs = _runs(tmp_path)
    assert runs.pop(old_key) == "superseded" and list(runs.values()) == ["complete"]
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["duplicate_succeeded_custom_ids"] == 0
    # Every realtime task was sent once more, with its new request; the 40 batch rows were not sent again.
    realtime = sum(row["route"] == "realtime" for row in rows)
    assert realtime == 20 and stats["messages_succeeded"] - realtime_before == realtime
    assert {row["batch_id"] for row in rows if row["route"] == "batch"} != {None}


def test_an_unfinished_run_recorded_by_the_earlier_version_is_not_silently_run_beside(tmp_path: Path) -> None:
    # A ledger written before run keys were request digests: its run has no input digest and an old-style key.
    tasks = write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(10))
    with Ledger.open(tmp_path / "state") as ledger:
        ledger.begin("0ld5ty1ek3y", str(tasks.resolve()), str(tmp_path / "out.json"), {"mode": None}, time.time())
        ledger.record_intent("0ld5ty1ek3y", "c0", [1, 2], time.time())
        ledger.record_batch("0ld5ty1ek3y", "c0", "msgbatch_old", time.time())

    with pytest.raises(RunChangedError, match=r"run 0ld5ty1ek3y .*msgbatch_old.*--resume-run 0ld5ty1ek3y.*--supersede"):
        Run.prepare(tasks, tmp_path / "out.json", load_config(), RunOptions(state_dir=tmp_path / "state"))


# The batch task type's max_tokens: editing it changes every classify_bulk row.
CLASSIFY_MAX_TOKENS = 'tier = "cheap"\nmax_tokens = 64'


def test_supersede_logs_the_billed_rows_of_changed_tasks_in_the_old_batch_once(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # The old batch carries 20 unchanged rows (kept) and 40 changed ones (sent again): the API bills all 60 of
    # it, so the usage log (`report`, `cache-stats`, the budget's history) must hold all 60, once each.
    emulator.configure(batch_duration_s=3600)
    write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(60))
    config_file(tmp_path / "config.toml", batch_poll_initial_s=0.05, batch_poll_interval_s=0.2)
    batch_only = [*ARGS, "--batch-only"]
    assert run_driver(tmp_path, emulator.base_url, batch_only, crash_at="batch.polled").returncode == -9
    _edit(tmp_path, CLASSIFY_MAX_TOKENS, CLASSIFY_MAX_TOKENS.replace("64", "80"))
    emulator.advance_clock(3600)
    emulator.configure(batch_duration_s=0.5)  # the batch of the changed rows ends at once

    rerun = run_driver(tmp_path, emulator.base_url, [*batch_only, "--supersede"])

    assert rerun.returncode == 0, rerun.stderr
    stats = emulator.stats()
    assert stats["batches_created"] == 2 and stats["batch_rows_created"] == 100
    with UsageLog.open(tmp_path / "state") as log:
        records = log.records()
    keys = [record.request_key for record in records]
    assert len(keys) == len(set(keys)) == 100
    assert sum(record.cost_usd for record in records) == pytest.approx(stats["cost_usd"]["total"])
    # Read again (a second collect of the same batches), nothing is logged twice.
    again = run_driver(tmp_path, emulator.base_url, [*batch_only, "--supersede"])
    assert again.returncode == 0, again.stderr
    with UsageLog.open(tmp_path / "state") as log:
        assert len(log.records()) == 100
