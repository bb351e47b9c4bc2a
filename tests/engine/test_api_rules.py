"""The engine against the rules of today's API (version 2026-10-21, thinking by default, the 5.x tokenizer,
context windows), end to end: a task file through planning, the real SDK and the emulator."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from batch_engine.cli import main
from batch_engine.client import ApiSettings
from batch_engine.config import load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.files import RawRecord, iter_records
from batch_engine.models import TaskResult
from batch_engine.planning import make_plan
from batch_engine.planning.budget import Estimator
from batch_engine.planning.plan_summary import plan_summary
from batch_engine.planning.pricing import estimate_cost
from batch_engine.render.artifacts import RunBreakdown
from batch_engine.runner import Run, RunOptions
from batch_engine.state.usage_log import UsageLog
from batch_engine.token_count import TokenCounts
from tests.support.crash import config_file, engine_env, run_process
from tests.support.engine import (
    NO_WAIT_POLICY,
    SAMPLE_CONFIG,
    SAMPLE_TASKS,
    fast_config,
    generated_tasks,
    messages_calls,
    read_output,
    run_engine,
    write_jsonl,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _batch_only(tmp_path: Path) -> RunOptions:
    return RunOptions(state_dir=tmp_path / "state", mode="batch")


def _raw(task_id: str, mode: str, messages: list[Any] | None = None, **params: Any) -> dict[str, Any]:
    messages = messages or [{"role": "user", "content": f"{task_id} please"}]
    return {"task_id": task_id, "task_type": "chat", "mode": mode, "params": {"messages": messages, **params}}


def test_records_api_version_2026_10_21_refuses_are_rejected_up_front_naming_the_field(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "a note"}}
    cited = {"type": "text", "text": "see", "citations": [{"type": "char_location", "cited_text": "a"}]}
    tasks = [
        # Even at its default value, and even on a model that took it under 2023-06-01.
        _raw("temp", "batch", temperature=1.0) | {"model": "claude-sonnet-4-6"},
        _raw("top-p", "realtime", top_p=0.9),
        _raw("top-k", "batch", top_k=5),
        _raw("doc", "batch", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [document]}]),
        _raw("cite", "realtime", [{"role": "user", "content": [cited]}]),
        _raw("fine", "batch"),
    ]

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    rows = {row["task_id"]: row for row in output.rows}
    assert [row["status"] for row in output.rows] == ["rejected"] * 5 + ["succeeded"]
    assert [rows[t]["error"]["message"].split(": ")[1] for t in ("temp", "top-p", "top-k", "doc", "cite")] == [
        "params.temperature",
        "params.top_p",
        "params.top_k",
        "params.messages.1.content.0",
        "params.messages.0.content.0.citations",
    ]
    assert all("2026-10-21" in rows[t]["error"]["message"] for t in ("temp", "top-p", "doc", "cite"))
    stats = emulator.stats()
    assert messages_calls(stats) == {} and stats["batch_rows_created"] == 1


def test_forced_tool_choice_where_the_api_refuses_it_is_rejected_up_front_naming_the_field(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    tool = {"name": "label", "description": "a label", "input_schema": {"type": "object", "properties": {}}}
    forced = {"tools": [tool], "tool_choice": {"type": "tool", "name": "label"}}
    off = {"type": "disabled"}
    tasks = [
        _raw(f"no-{model}", mode, **forced) | {"model": model}
        for model, mode in (
            ("claude-opus-5-5", "batch"),
            ("claude-sonnet-5-5", "realtime"),
            ("claude-fable-5-1", "batch"),
        )
    ]
    tasks += [
        _raw("any-opus", "batch", tools=[tool], tool_choice={"type": "any"}) | {"model": "claude-opus-5-5"},
        # Haiku 5.5 takes forced tool use, but not while it thinks, and it thinks when `thinking` is omitted.
        _raw("thinking-haiku", "realtime", **forced) | {"model": "claude-haiku-5-5"},
        _raw("fine-haiku", "realtime", thinking=off, **forced) | {"model": "claude-haiku-5-5"},
        _raw("fine-auto", "batch", tools=[tool], tool_choice={"type": "auto"}) | {"model": "claude-opus-5-5"},
    ]

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    rows = {row["task_id"]: row for row in output.rows}
    refused = ["no-claude-opus-5-5", "no-claude-sonnet-5-5", "no-claude-fable-5-1", "any-opus", "thinking-haiku"]
    assert {t: rows[t]["status"] for t in refused} == dict.fromkeys(refused, "rejected")
    assert all("params.tool_choice" in rows[t]["error"]["message"] for t in refused)
    assert "claude-sonnet-5-5 refuses" in rows["no-claude-sonnet-5-5"]["error"]["message"]
    assert "thinks" in rows["thinking-haiku"]["error"]["message"]
    assert rows["fine-haiku"]["status"] == rows["fine-auto"]["status"] == "succeeded"
    stats = emulator.stats()
    assert sum(messages_calls(stats).values()) == 1 and stats["batch_rows_created"] == 1


def test_thinking_off_sends_each_models_off_value_and_a_64_token_classifier_gets_its_answer(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # classify_bulk: max_tokens 64, thinking "off". Haiku 5.5 and Sonnet 5.5 think unless told otherwise, each
    # with its own off value; Opus 5.5 cannot stop thinking and gets the lowest effort instead.
    tasks = [
        {"task_id": f"{name}-{i}", "task_type": "classify_bulk", "model": model, "input_data": {"text": f"t{i}"}}
        for name, model in (("haiku", "claude-haiku-5-5"), ("sonnet", "claude-sonnet-5-5"), ("opus", "claude-opus-5-5"))
        for i in range(3)
    ]
    path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    config = load_config()
    plan = make_plan(iter_records(path), config, NOW)
    sent = {task.model: task.params.get("thinking") for task in plan.tasks}
    assert sent == {
        "claude-haiku-5-5": {"type": "disabled"},
        "claude-sonnet-5-5": {"type": "between_tools"},
        "claude-opus-5-5": {"type": "adaptive"},
    }
    assert next(t for t in plan.tasks if t.model == "claude-opus-5-5").params["output_config"] == {"effort": "low"}
    (warning,) = plan_summary(plan, config).warnings
    assert "claude-opus-5-5 cannot turn thinking off" in warning and "max_tokens 64" in warning

    output = run_engine(emulator, path, tmp_path)

    for row in output.rows:
        thinking = row["usage"]["thinking_tokens"]
        if row["model"] == "claude-opus-5-5":
            assert thinking > 0
        else:
            assert thinking == 0 and row["text"].startswith("echo:") and row["status"] == "succeeded"


def test_plan_warns_when_a_thinking_task_type_leaves_no_room_for_thinking() -> None:
    config = load_config()
    small = config.task_types["generate_tests"].model_copy(update={"max_tokens": 300})
    config = config.model_copy(update={"task_types": {**config.task_types, "generate_tests": small}})
    records = [{"task_id": "g", "task_type": "generate_tests", "input_data": {"code": "def f(): pass"}}]
    plan = make_plan(_records(records), config, NOW)
    (warning,) = plan_summary(plan, config).warnings
    assert warning.startswith("warning: task type generate_tests thinks on claude-sonnet-5-5 but max_tokens 300")


def _records(values: list[dict[str, Any]]) -> Any:
    from batch_engine.files import RawRecord

    return [RawRecord(index=i, line=None, value=value, error=None) for i, value in enumerate(values)]


def test_a_prompt_over_the_context_window_is_rejected_up_front(emulator: RunningEmulator, tmp_path: Path) -> None:
    # Haiku 4.5: a 200K context. ~900 KB of text is ~225K tokens by any estimate.
    huge = "incident log line " * 50_000
    tasks = [
        {"task_id": "huge", "task_type": "summarize", "model": "claude-haiku-4-5", "input_data": {"document": huge}},
        {"task_id": "fits", "task_type": "summarize", "model": "claude-haiku-5-5", "input_data": {"document": huge}},
    ]

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    rejected, fine = output.rows
    assert (
        rejected["status"] == "rejected"
        and "exceeds claude-haiku-4-5's context window of 200,000" in (rejected["error"]["message"])
    )
    assert fine["status"] == "succeeded" and fine["usage"]["input_tokens"] > 200_000


def test_a_prompt_the_count_puts_over_the_context_window_is_rejected_before_it_is_sent(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # One punctuation mark is one token to a tokenizer, a quarter of one to the offline estimate: ~75K estimated,
    # ~300K counted, over Haiku 4.5's 200K window.
    marks = "!" * 300_000
    tasks = [
        {"task_id": "dense", "task_type": "summarize", "model": "claude-haiku-4-5", "input_data": {"document": marks}}
    ]
    path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    (task,) = make_plan(iter_records(path), load_config(), NOW).tasks  # the estimate lets it through
    assert task.estimated_input_tokens < 200_000

    uncounted = run_engine(emulator, path, tmp_path, output_name="uncounted.json")
    counted = run_engine(
        emulator, path, tmp_path / "counted", options=RunOptions(state_dir=tmp_path / "counted", count_tokens=True)
    )

    (sent,) = uncounted.rows  # sent, and refused by the API: "prompt is too long"
    assert sent["status"] == "errored" and "prompt is too long" in sent["error"]["message"]
    (row,) = counted.rows
    assert row["status"] == "rejected" and row["cost_usd"] == 0
    assert row["error"]["message"].startswith("input_data: prompt of ")
    assert "(counted) exceeds claude-haiku-4-5's context window of 200,000" in row["error"]["message"]
    assert emulator.stats()["batch_rows_created"] == 1  # only the uncounted run sent it
    summary = plan_summary(
        make_plan(iter_records(path), load_config(), NOW), load_config(), counts=_counts(task, 300_000)
    )
    assert summary.rejected == 1 and "task_id dense: input_data:" in summary.rejections[0]


def _counts(task: Any, tokens: int) -> TokenCounts:
    return TokenCounts({task.index: tokens}, 1)


def test_the_cache_write_expected_uses_the_counted_prompt_when_there_is_one() -> None:
    # Long words: the offline estimate (bytes/4 x 1.3) is above Haiku 5.5's 512-token cache minimum, so planning
    # marks the system prompt for caching; the tokenizer counts fewer, under the minimum: the API caches nothing.
    system = " ".join(["abcdef"] * 300)
    records = [
        {"task_id": "t", "task_type": "summarize", "system": system, "input_data": {"document": "x"}},
    ]
    (task,) = make_plan(iter(_records(records)), load_config(), NOW).tasks
    config = load_config()
    assert task.cache_key is not None
    estimated = Estimator(config)
    counted = Estimator(config, {task.index: 400})  # what messages.count_tokens says of the whole prompt

    assert estimated.cache_write(task) is not None
    assert counted.cache_write(task) is None
    spec = config.models[task.model]
    output = counted.output_tokens(task)
    assert counted.cost(task, "batch") == estimate_cost(400, output, spec, "batch", config, None)
    assert Estimator(config, {task.index: 2_000}).cache_write(task) is not None  # counted above it: a write


def test_without_a_count_both_checks_use_the_tokenizer_familys_factor() -> None:
    # 5.x counts ~1.3x the tokens of bytes/4: the offline estimate scales by it, so it neither misses a cacheable
    # prefix nor lets an over-long prompt through to a 400 (docs: /models/haiku-5-5/whats-new-haiku-5-5).
    system = "x" * 1_800  # 450 tokens by bytes/4, 585 by the 5.x factor: over Haiku 5.5's 512-token minimum
    long = "y" * 3_200_000  # 800K tokens by bytes/4, 1.04M by the 5.x factor: over the 1M context window
    records = [
        {"task_id": "cached", "task_type": "summarize", "system": system, "input_data": {"document": "x"}},
        {"task_id": "too-long", "task_type": "summarize", "input_data": {"document": long}},
    ]

    plan = make_plan(iter(_records(records)), load_config(), NOW)

    (task,) = plan.tasks
    assert task.model == "claude-haiku-5-5" and task.cache_key is not None
    (rejection,) = plan.rejections
    assert rejection.task_id == "too-long" and rejection.field == "input_data"
    assert "exceeds claude-haiku-5-5's context window of 1,000,000" in rejection.reason


def _records(values: list[dict[str, Any]]) -> list[RawRecord]:
    return [RawRecord(index=i, line=i + 1, value=value) for i, value in enumerate(values)]


def test_itpm_reservations_use_the_counted_input_when_tokens_were_counted(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    words = " ".join(["abcdef"] * 600)  # the tokenizer counts about half the offline estimate
    tasks = [_raw(f"t{i}", "realtime", [{"role": "user", "content": f"{i} {words}"}]) for i in range(3)]
    path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    options = RunOptions(state_dir=tmp_path / "state", count_tokens=True)
    run = Run.prepare(path, tmp_path / "out.json", fast_config(), options)

    async def send() -> Any:
        async with run.lanes(ApiSettings(SecretStr("sk-test"), emulator.base_url), policy=NO_WAIT_POLICY) as lanes:
            await run.send(lanes)
            return lanes.batch.ctx

    try:
        ctx = asyncio.run(send())
    finally:
        run.close()

    counted = sum(ctx.estimator.counted_input.values())
    estimated = sum(task.estimated_input_tokens for task in run.plan.tasks)
    assert counted < estimated * 0.8
    reserved = sum(limiter._taken["itpm"] for limiter in ctx.limiters.values())  # what acquire took, in total
    assert reserved == counted


@pytest.mark.parametrize("model", ["claude-haiku-5-5", "claude-haiku-4-5"])
def test_the_offline_estimate_knows_the_tokenizer_family_and_is_not_the_emulators_count(
    emulator: RunningEmulator, tmp_path: Path, model: str
) -> None:
    text = "Service checkout-api returned 502 for 14% of requests between 02:10 and 02:25 UTC (pod restarts)."
    tasks = [{"task_id": "t", "task_type": "summarize", "model": model, "input_data": {"document": text}}]
    path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    (task,) = make_plan(iter_records(path), load_config(), NOW).tasks

    (row,) = run_engine(emulator, path, tmp_path).rows

    billed = row["usage"]["input_tokens"] + row["usage"]["cache_creation_input_tokens"]
    assert task.estimated_input_tokens != billed  # an estimate, measurably off
    assert abs(task.estimated_input_tokens - billed) / billed < 0.35  # but in the right range for the family


# --- a 200 is not always an answer --------------------------------------------------------------------------


def test_refused_and_incomplete_answers_are_billed_counted_and_never_succeeded(
    emulator: RunningEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator.configure(refusal_rate=0.3)
    tasks = generated_tasks(60)  # realtime user_query and batch classify_bulk
    # Opus 5.5 cannot stop thinking: at max_tokens 64 all of it goes to thinking and no text comes back.
    tasks += [
        {"task_id": f"opus{i}", "task_type": "classify_bulk", "model": "claude-opus-5-5", "input_data": {"text": "x"}}
        for i in range(2)
    ]

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    statuses = Counter(row["status"] for row in output.rows)
    refused = [row for row in output.rows if row["status"] == "refused"]
    assert 8 <= len(refused) <= 30 and {row["route"] for row in refused} == {"batch", "realtime"}
    for row in refused:
        assert row["cost_usd"] > 0 and row["stop_reason"] == "refusal" and not row["text"]
        assert row["error"]["type"] == "refusal" and "category cyber" in row["error"]["message"]
        assert row["attempts"] == 1  # billed: never sent again
    opus = [row for row in output.rows if row["task_id"].startswith("opus")]
    for row in opus:
        if row["status"] != "refused":
            assert row["status"] == "incomplete" and row["error"]["type"] == "max_tokens" and row["cost_usd"] > 0
    counts = output.run["counts"]
    assert counts["by_status"] == dict(statuses) and counts["succeeded"] == statuses["succeeded"]
    assert counts["failed"] == statuses["refused"] + statuses["incomplete"] and not output.summary.all_succeeded
    # Billed rows are in the cost and in the usage log `report` reads.
    assert output.run["cost"]["total_usd"] == pytest.approx(sum(row["cost_usd"] for row in output.rows), abs=1e-5)
    with UsageLog.open(tmp_path / "state") as log:
        logged = Counter(record.status for record in log.records(since=0))
    assert logged == {status: statuses[status] for status in ("succeeded", "refused", "incomplete") if statuses[status]}
    failures = {(f.status, f.error_type) for f in RunBreakdown.of(TaskResult(**row) for row in output.rows).failures()}
    assert ("refused", "refusal") in failures
    capsys.readouterr()
    assert main(["report", "--state-dir", str(tmp_path / "state"), "--analyze-only"]) == 0
    report = capsys.readouterr().out
    refused_usd = sum(row["cost_usd"] for row in refused)
    assert "## Spend by status" in report and f"| refused | {len(refused)} | ${refused_usd:.4f}" in report


def test_a_paused_server_tool_turn_is_incomplete_billed_and_never_succeeded(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # pause_turn: the server-side tool loop reached its iteration limit (docs: /api/handling-stop-reasons).
    emulator.configure(pause_turn_rate=1.0)
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    tasks = [_raw(f"search-{mode}", mode, tools=[search]) for mode in ("batch", "realtime")]
    tasks.append(_raw("plain", "realtime"))  # no server tool: nothing to pause

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    rows = {row["task_id"]: row for row in output.rows}
    for task_id in ("search-batch", "search-realtime"):
        row = rows[task_id]
        assert (row["status"], row["stop_reason"], row["error"]["type"]) == ("incomplete", "pause_turn", "pause_turn")
        assert row["cost_usd"] > 0 and row["attempts"] == 1
    assert rows["plain"]["status"] == "succeeded"
    assert output.run["counts"]["by_status"] == {"incomplete": 2, "succeeded": 1}
    assert not output.summary.all_succeeded


def test_the_cli_exits_1_and_counts_refused_rows_in_its_summary(emulator: RunningEmulator, tmp_path: Path) -> None:
    emulator.configure(refusal_rate=1.0)
    write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(6))
    config_file(tmp_path / "config.toml", batch_poll_initial_s=0.05, batch_poll_interval_s=0.2)
    args = ["run", "tasks.jsonl", "-o", "out.json", "--state-dir", "state", "--config", "config.toml"]

    ran = run_process([sys.executable, "-m", "batch_engine.cli", *args], engine_env(emulator.base_url), tmp_path)

    assert ran.returncode == 1, ran.stderr
    assert "Traceback" not in ran.stderr
    summary = ran.stdout + ran.stderr
    assert "refused" in summary and "6" in summary, summary
    _, rows = read_output(tmp_path / "out.json")
    assert [row["status"] for row in rows] == ["refused"] * 6


# --- the batch queue cap ------------------------------------------------------------------------------------


def test_a_full_batch_queue_makes_chunks_wait_for_room_never_go_realtime(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    emulator.configure(batch_queue_cap=150, batch_duration_s=1.5)
    tasks = generated_tasks(400, realtime_every=None)  # four chunks of 100; the queue holds one at a time

    output = run_engine(
        emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path, config=fast_config(max_requests_per_batch=100)
    )

    assert Counter((row["status"], row["route"]) for row in output.rows) == {("succeeded", "batch"): 400}
    stats = emulator.stats()
    assert messages_calls(stats) == {}
    assert stats["batches_created"] == 4
    assert stats["calls"]["POST /v1/messages/batches"]["429"] > 0


# --- best-effort batch cache hits ------------------------------------------------------------------------------


def test_the_cost_estimate_stays_an_upper_bound_when_batch_cache_writes_repeat(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    emulator.configure(batch_cache_hit_rate=0.0)  # every row writes the 1-hour entry again
    config = load_config(SAMPLE_CONFIG)
    plan = make_plan(iter_records(SAMPLE_TASKS), config, NOW)
    estimator = Estimator(config)

    output = run_engine(emulator, SAMPLE_TASKS, tmp_path, config=fast_config(config), options=_batch_only(tmp_path))

    by_id = {task.task_id: task for task in plan.tasks}
    rows = [row for row in output.rows if row["status"] in ("succeeded", "incomplete")]
    assert sum(row["usage"]["cache_write_1h_tokens"] > 0 for row in rows) > 100  # the writes did repeat
    assert sum(row["usage"]["cache_read_input_tokens"] for row in rows) == 0
    for row in rows:
        assert row["cost_usd"] <= estimator.cost(by_id[row["task_id"]], "batch"), row["task_id"]


def test_batch_polling_follows_the_batch_endpoints_rate_limit_after_a_429(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # The engine believes 1,000 batch RPM; the account has 4. The first refused poll's headers and retry-after
    # correct the lane's bucket: it does not keep polling into 429s.
    emulator.configure(batch_rpm=4, batch_duration_s=1.5)
    tasks = write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(5, realtime_every=None))

    output = run_engine(emulator, tasks, tmp_path, options=_batch_only(tmp_path))

    assert [row["status"] for row in output.rows] == ["succeeded"] * 5
    calls = emulator.stats()["calls"]
    refused = sum(by_status.get("429", 0) for endpoint, by_status in calls.items() if "batches" in endpoint)
    assert 1 <= refused <= 2, calls
