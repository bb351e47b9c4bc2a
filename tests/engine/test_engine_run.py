"""The engine end to end on the sample task file: both lanes against the emulator through the real SDK."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import orjson
import pytest

from batch_engine.config import Config, load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.models import TaskResult
from batch_engine.render.artifacts import RunBreakdown
from batch_engine.runner import Run, RunOptions
from tests.support.engine import (
    SAMPLE_CONFIG,
    SAMPLE_TASKS,
    Output,
    expected_text_prefix,
    fast_config,
    generated_tasks,
    messages_calls,
    read_output,
    run_engine,
    write_jsonl,
)


@pytest.fixture(scope="module")
def sample_tasks() -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = orjson.loads(SAMPLE_TASKS.read_bytes())
    return tasks


@pytest.fixture(scope="module")
def sample_config() -> Config:
    return fast_config(load_config(SAMPLE_CONFIG))


def _assert_rows_answer_their_own_requests(output: Output, tasks: list[dict[str, Any]], config: Config) -> None:
    assert [row["task_id"] for row in output.rows] == [task["task_id"] for task in tasks]
    assert [row["index"] for row in output.rows] == list(range(len(tasks)))
    for task, row in zip(tasks, output.rows, strict=True):
        assert row["status"] == "succeeded", row
        assert row["text"].startswith(expected_text_prefix(task, row, config)), (task["task_id"], row["text"][:80])
        assert row["metadata"] == task.get("metadata")
        assert row["attempts"] == 1
        assert (row["batch_id"] is not None) == (row["route"] == "batch")


def test_sample_run_answers_every_task_once_in_input_order_from_its_own_request(
    emulator: RunningEmulator, tmp_path: Path, sample_tasks: list[dict[str, Any]], sample_config: Config
) -> None:
    output = run_engine(emulator, SAMPLE_TASKS, tmp_path, config=sample_config)

    _assert_rows_answer_their_own_requests(output, sample_tasks, sample_config)
    routes = [row["route"] for row in output.rows]
    assert routes.count("batch") == 241 and routes.count("realtime") == 63
    counts = output.run["counts"]
    assert counts["total"] == counts["succeeded"] == 304
    assert counts["failed"] == counts["rejected"] == 0
    assert counts["by_route"] == {"batch": 241, "realtime": 63}
    assert output.summary.all_succeeded
    # One batch for the whole batch route (default limits), and it is the one every batch row names.
    assert [batch["id"] for batch in output.run["batches"]] == list(
        dict.fromkeys(r["batch_id"] for r in output.rows if r["batch_id"])
    )
    stats = emulator.stats()
    assert stats["batches_created"] == 1 and stats["batch_rows_created"] == 241
    # The samples repeat some prompts, so count calls rather than distinct bodies: one per realtime task.
    assert messages_calls(stats) == {"200": 63}
    assert stats["duplicate_succeeded_custom_ids"] == 0


def test_run_cost_and_token_totals_are_the_sums_of_the_rows(
    emulator: RunningEmulator, tmp_path: Path, sample_config: Config
) -> None:
    output = run_engine(emulator, SAMPLE_TASKS, tmp_path, config=sample_config)

    run = output.run
    assert run["cost"]["total_usd"] == pytest.approx(sum(row["cost_usd"] for row in output.rows), abs=1e-6)
    assert run["cost"]["total_usd"] > 0
    # Batch discount and caching: the run costs less than the all-realtime, no-cache baseline.
    assert run["cost"]["savings_usd"] == pytest.approx(run["cost"]["baseline_usd"] - run["cost"]["total_usd"])
    assert 0 < run["cost"]["total_usd"] < run["cost"]["baseline_usd"]
    usage = [row["usage"] for row in output.rows]
    assert run["tokens"]["input"] == sum(u["input_tokens"] for u in usage)
    assert run["tokens"]["output"] == sum(u["output_tokens"] for u in usage)
    assert run["tokens"]["cache_read"] == sum(u["cache_read_input_tokens"] for u in usage)
    assert run["tokens"]["cache_write"] == sum(u["cache_creation_input_tokens"] for u in usage)
    # The engine's accounting agrees with what the emulator billed.
    billed = emulator.stats()["cost_usd"]["total"]
    assert run["cost"]["total_usd"] == pytest.approx(billed, abs=1e-6)


def test_batches_are_split_at_max_requests_per_batch(
    emulator: RunningEmulator, tmp_path: Path, sample_tasks: list[dict[str, Any]], sample_config: Config
) -> None:
    config = fast_config(sample_config, max_requests_per_batch=50)

    output = run_engine(emulator, SAMPLE_TASKS, tmp_path, config=config)

    _assert_rows_answer_their_own_requests(output, sample_tasks, config)
    batches = output.run["batches"]
    assert len(batches) == 5
    assert sorted(batch["request_counts"]["succeeded"] for batch in batches) == [41, 50, 50, 50, 50]
    rows_per_batch: dict[str, int] = {}
    for row in output.rows:
        if row["batch_id"]:
            rows_per_batch[row["batch_id"]] = rows_per_batch.get(row["batch_id"], 0) + 1
    assert sorted(rows_per_batch.values()) == [41, 50, 50, 50, 50]
    stats = emulator.stats()
    assert stats["batches_created"] == 5 and stats["duplicate_batch_payloads"] == 0


def test_rerunning_a_completed_run_makes_no_api_call_and_writes_the_same_bytes(
    emulator: RunningEmulator, tmp_path: Path, sample_config: Config
) -> None:
    first = run_engine(emulator, SAMPLE_TASKS, tmp_path, config=sample_config)
    first_bytes = first.path.read_bytes()
    stats_after_first = emulator.stats()

    second = run_engine(emulator, SAMPLE_TASKS, tmp_path, config=sample_config)

    assert emulator.stats()["calls"] == stats_after_first["calls"]
    assert second.path.read_bytes() == first_bytes
    assert second.summary == first.summary


def test_jsonl_output_has_the_run_line_then_one_line_per_task(
    emulator: RunningEmulator, tmp_path: Path, sample_config: Config
) -> None:
    as_json = run_engine(emulator, SAMPLE_TASKS, tmp_path, config=sample_config)
    calls = emulator.stats()["calls"]

    options = RunOptions(state_dir=tmp_path / "state", output_format="jsonl")
    as_jsonl = run_engine(
        emulator, SAMPLE_TASKS, tmp_path, config=sample_config, options=options, output_name="o.jsonl"
    )

    lines = as_jsonl.path.read_bytes().splitlines()
    assert len(lines) == 1 + 304
    assert set(orjson.loads(lines[0])) == {"run"}
    assert all(set(orjson.loads(line)) >= {"task_id", "status", "route"} for line in lines[1:])
    run, rows = read_output(as_jsonl.path)
    assert rows == as_json.rows
    assert {k: v for k, v in run.items() if k != "output_path"} == {
        k: v for k, v in as_json.run.items() if k != "output_path"
    }
    assert emulator.stats()["calls"] == calls  # the same completed run: rewritten from the ledger


def test_content_blocks_have_one_shape_whichever_way_the_reply_came(emulator: RunningEmulator, tmp_path: Path) -> None:
    # Realtime replies are decoded from the raw body, streamed ones rebuilt by the SDK, batch rows read line by
    # line: all three must write the blocks as the API sent them (no fields the SDK adds as null).
    base = fast_config()
    streamed = base.task_types["user_query"].model_copy(update={"stream": True})
    config = base.model_copy(update={"task_types": {**base.task_types, "user_query": streamed}})
    tasks = write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(6))
    shapes: dict[str, set[tuple[str, ...]]] = {}
    for mode, run_config in (("realtime", base), ("batch", base), ("realtime-streamed", config)):
        options = RunOptions(state_dir=tmp_path / mode, mode="batch" if mode == "batch" else "realtime")
        output = run_engine(emulator, tasks, tmp_path / mode, config=run_config, options=options)
        assert output.summary.all_succeeded
        shapes[mode] = {tuple(sorted(block)) for row in output.rows for block in row["content"]}
        assert all(value is not None for row in output.rows for block in row["content"] for value in block.values())
    assert shapes["realtime"] == shapes["batch"] == shapes["realtime-streamed"] == {("text", "type")}


def test_a_run_keeps_its_plan_out_of_the_collectors_sight_only_while_it_is_open(tmp_path: Path) -> None:
    tasks = write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(50))
    prepared = Run.prepare(tasks, tmp_path / "out.json", load_config(), RunOptions(state_dir=tmp_path / "state"))
    try:
        assert gc.get_freeze_count() > 0  # the plan's objects: not walked by every full collection
    finally:
        prepared.close()
    assert gc.get_freeze_count() == 0  # a long-lived process (a Prefect worker) does not keep the plan


def test_the_artifacts_breakdown_is_counted_on_the_output_pass_without_reading_the_ledger_again(
    emulator: RunningEmulator, tmp_path: Path, sample_config: Config
) -> None:
    tasks = generated_tasks(30)
    tasks[4] = {"task_id": "bad", "task_type": "no_such_type", "input_data": {}}  # a rejection in the table too
    input_path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    output = run_engine(emulator, input_path, tmp_path, config=sample_config)
    expected = RunBreakdown.of(TaskResult(**row) for row in output.rows)

    # The completed run reopened: finishing it writes the output again, from one read of the ledger's rows.
    prepared = Run.prepare(input_path, output.path, sample_config, RunOptions(state_dir=tmp_path / "state"))
    reads = 0
    result_json = prepared.ledger.result_json

    def counted_reads(run_key: str) -> Any:
        nonlocal reads
        reads += 1
        return result_json(run_key)

    prepared.ledger.result_json = counted_reads  # type: ignore[method-assign]
    breakdown = RunBreakdown()
    try:
        prepared.finish(breakdown.add)
    finally:
        prepared.close()

    assert reads == 1
    assert breakdown.table() == expected.table() and len(breakdown.table()) >= 3
    assert breakdown.failures() == expected.failures() and breakdown.failures()[0].status == "rejected"
