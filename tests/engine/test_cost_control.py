"""Cost control against the emulator: exact per-row cost, budgets, the usage log, cache-stats, the report,
and token counting. Every run goes through the real SDK over HTTP."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from batch_engine.cli import main
from batch_engine.client import ApiSettings, RetryPolicy
from batch_engine.config import Config, TaskType, Thinking, load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.errors import BudgetError
from batch_engine.models import RunSummary
from batch_engine.runner import RunOptions, run
from batch_engine.state.usage_log import UsageLog, UsageRecord, output_history
from batch_engine.telemetry.cache_stats import cache_stats

ROOT = Path(__file__).resolve().parents[2]
LONG_SYSTEM = "You are a careful reviewer. Follow every house rule listed here exactly. " * 60  # ~1,100 tokens
HAIKU_LONG_SYSTEM = "Reference corpus line for the long-context rate card. " * 7_600  # ~104,500 tokens

# USD per million tokens, copied by hand from the price table: input, output, 5m write, 1h write, cache read.
HAND_PRICES = {
    "claude-sonnet-5-5": (2.00, 10.00, 2.50, 4.00, 0.10),
    "claude-haiku-5-5": (0.10, 0.50, 0.125, 0.20, 0.01),
}
HAIKU_ABOVE_100K = (0.50, 2.50, 0.625, 1.00, 0.05)


async def _no_wait(_: float) -> None:
    await asyncio.sleep(0)


POLICY = RetryPolicy(attempts=5, sleep=_no_wait)


def _config(task_types: dict[str, TaskType], **limits: Any) -> Config:
    base = load_config()
    fast = {"batch_poll_initial_s": 0.05, "batch_poll_interval_s": 0.2, **limits}
    return base.model_copy(update={"task_types": task_types, "limits": base.limits.model_copy(update=fast)})


def _tasks(path: Path, spec: dict[str, int], mode: str | None = None) -> Path:
    lines = []
    for task_type, count in spec.items():
        for i in range(count):
            task: dict[str, Any] = {"task_id": f"{task_type}-{i}", "task_type": task_type, "input_data": {"x": i}}
            if mode:
                task["mode"] = mode
            lines.append(orjson.dumps(task))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _run(emulator: RunningEmulator, tasks: Path, out: Path, config: Config, **options: Any) -> RunSummary:
    api = ApiSettings(SecretStr("sk-test"), emulator.base_url)
    opts = RunOptions(state_dir=out.parent / "state", **options)
    return asyncio.run(run(tasks, out, api=api, config=config, options=opts, policy=POLICY))


def _rows(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = orjson.loads(out.read_bytes())["results"]
    return rows


def _hand_cost(row: dict[str, Any]) -> float:
    usage = row["usage"]
    prompt = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    prices = HAND_PRICES[row["model"]]
    if row["model"] == "claude-haiku-5-5" and prompt > 100_000:
        prices = HAIKU_ABOVE_100K
    p_in, p_out, p_5m, p_1h, p_read = prices
    dollars = (
        usage["input_tokens"] * p_in
        + usage["output_tokens"] * p_out
        + usage["cache_write_5m_tokens"] * p_5m
        + usage["cache_write_1h_tokens"] * p_1h
        + usage["cache_read_input_tokens"] * p_read
    ) / 1_000_000
    return dollars / 2 if row["route"] == "batch" else dollars


def test_every_row_costs_what_a_hand_computation_says(emulator: RunningEmulator, tmp_path: Path) -> None:
    emulator.configure(batch_duration_s=0.1)
    sonnet = {"tier": "capable", "max_tokens": 256, "system": LONG_SYSTEM, "user": "Item {x}"}
    haiku_think = {"tier": "cheap", "max_tokens": 1024, "system": LONG_SYSTEM, "user": "Think about {x}"}
    haiku_long = {"tier": "cheap", "max_tokens": 128, "system": HAIKU_LONG_SYSTEM, "user": "Look up {x}"}
    thinking = Thinking(mode="adaptive", effort="low")
    types = {
        "cached_rt": TaskType(mode="realtime", **sonnet),
        "cached_batch": TaskType(mode="batch", **sonnet),
        "think_rt": TaskType(mode="realtime", thinking=thinking, **haiku_think),
        "think_batch": TaskType(mode="batch", thinking=thinking, **haiku_think),
        "long_rt": TaskType(mode="realtime", **haiku_long),
        "long_batch": TaskType(mode="batch", **haiku_long),
    }
    # A prefix of its own per task type, so each one writes (and then reads) its own cache entry.
    types = {name: t.model_copy(update={"system": f"[{name}] {t.system}"}) for name, t in types.items()}
    tasks = _tasks(tmp_path / "tasks.jsonl", dict.fromkeys(types, 3))
    out = tmp_path / "out.json"
    # One realtime request at a time, so the first of each prefix writes the cache and the next ones read it.
    summary = _run(emulator, tasks, out, _config(types, realtime_concurrency=1))
    rows = _rows(out)

    assert summary.counts.succeeded == len(rows) == 18
    for row in rows:
        assert row["cost_usd"] == pytest.approx(_hand_cost(row), rel=1e-9, abs=1e-12), row["task_id"]
    assert summary.cost.total_usd == pytest.approx(sum(_hand_cost(row) for row in rows), abs=1e-6)

    def seen(route: str, field: str, task_prefix: str = "") -> bool:
        return any(r["route"] == route and r["usage"][field] > 0 and r["task_id"].startswith(task_prefix) for r in rows)

    # Every combination the acceptance names really occurred in this run.
    assert seen("realtime", "cache_write_5m_tokens") and seen("realtime", "cache_read_input_tokens")
    assert seen("batch", "cache_write_1h_tokens") and seen("batch", "cache_read_input_tokens")
    assert seen("realtime", "thinking_tokens", "think") and seen("batch", "thinking_tokens", "think")
    # The usage log keeps the thinking tokens the API reports apart (usage.output_tokens_details), on both lanes:
    # the report's max_tokens advice reads them.
    with UsageLog.open(tmp_path / "state") as log:
        logged = {r.task_id: (r.route, r.thinking_tokens) for r in log.records()}
    assert logged == {r["task_id"]: (r["route"], r["usage"]["thinking_tokens"]) for r in rows}
    assert {route for route, thought in logged.values() if thought} == {"batch", "realtime"}
    long_prompts = [r for r in rows if r["task_id"].startswith("long")]
    assert {r["route"] for r in long_prompts} == {"batch", "realtime"}
    assert all(
        r["usage"]["input_tokens"] + r["usage"]["cache_read_input_tokens"] + r["usage"]["cache_creation_input_tokens"]
        > 100_000
        for r in long_prompts
    )


def test_the_sample_run_beats_the_baseline_by_at_least_50_percent(emulator: RunningEmulator, tmp_path: Path) -> None:
    # 50%, not 60% since issue #15: the 5.x models think by default (billed as output) and batch cache hits are
    # best-effort (the emulator reads a live entry for 60% of batch rows by default, as the docs' "30-98%").
    config = load_config(ROOT / "samples" / "config.toml")
    fast = config.model_copy(
        update={"limits": config.limits.model_copy(update={"batch_poll_initial_s": 0.05, "batch_poll_interval_s": 0.2})}
    )
    summary = _run(emulator, ROOT / "samples" / "nightly_tasks.json", tmp_path / "out.json", fast)
    assert summary.counts.succeeded == 304
    assert summary.cost.savings_pct >= 50, summary.cost
    assert summary.cost.baseline_usd - summary.cost.total_usd == pytest.approx(summary.cost.savings_usd, abs=1e-6)


# --- budgets -----------------------------------------------------------------------------------------------

SHORT = {"tier": "cheap", "max_tokens": 1024, "system": "", "user": "Answer {x}"}


def test_a_plan_over_budget_is_refused_before_anything_is_sent(emulator: RunningEmulator, tmp_path: Path) -> None:
    types = {"job": TaskType(mode="realtime", **SHORT), "bulk": TaskType(mode="batch", **SHORT)}
    tasks = _tasks(tmp_path / "tasks.jsonl", {"job": 20, "bulk": 20})
    with pytest.raises(BudgetError, match=r"estimated cost \$0\.0\d+ is over --max-cost-usd \$0\.0010"):
        _run(emulator, tasks, tmp_path / "out.json", _config(types), max_cost_usd=0.001)
    calls = emulator.stats()["calls"]
    assert "POST /v1/messages" not in calls and "POST /v1/messages/batches" not in calls
    assert not (tmp_path / "out.json").exists()


def test_the_cli_refuses_an_over_budget_plan_with_exit_2(
    emulator: RunningEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    args = ["run", str(ROOT / "samples" / "nightly_tasks.json"), "-o", str(tmp_path / "o.json")]
    args += ["--config", str(ROOT / "samples" / "config.toml"), "--state-dir", str(tmp_path / "s")]
    assert main([*args, "--max-cost-usd", "0.01"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("Error: estimated cost $") and "nothing was sent" in last
    assert "POST /v1/messages" not in emulator.stats()["calls"]


def test_sending_stops_at_the_budget_and_the_rest_is_skipped_budget(emulator: RunningEmulator, tmp_path: Path) -> None:
    types = {"job": TaskType(mode="realtime", **SHORT)}
    config = _config(types, realtime_concurrency=1)
    # History: short answers. The usage log then estimates ~20 output tokens per task...
    emulator.configure(reply_tokens=20)
    _run(emulator, _tasks(tmp_path / "warmup.jsonl", {"job": 5}), tmp_path / "warmup.json", config)
    # ...but tonight's answers are 40x longer, so actual spend overtakes the pre-flight estimate mid-run.
    emulator.reset()
    emulator.configure(reply_tokens=800)
    tasks = _tasks(tmp_path / "tasks.jsonl", {"job": 40}, mode="realtime")
    out = tmp_path / "out.json"
    summary = _run(emulator, tasks, out, config, max_cost_usd=0.004)

    rows = _rows(out)
    succeeded = [r for r in rows if r["status"] == "succeeded"]
    skipped = [r for r in rows if r["status"] == "skipped_budget"]
    assert len(rows) == 40 and len(succeeded) + len(skipped) == 40
    assert 0 < len(succeeded) < 40
    assert all(r["attempts"] == 0 and "budget" in r["error"]["message"] for r in skipped)
    # Nothing was sent after the stop: the emulator answered exactly the succeeded rows.
    assert emulator.stats()["messages_succeeded"] == len(succeeded)
    assert summary.cost.total_usd <= 0.004 + max(r["cost_usd"] for r in succeeded)
    assert summary.counts.by_status["skipped_budget"] == len(skipped)


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_the_budget_is_hard_at_any_concurrency(emulator: RunningEmulator, tmp_path: Path, concurrency: int) -> None:
    types = {"job": TaskType(mode="realtime", **SHORT)}
    config = _config(types, realtime_concurrency=concurrency)
    # History says ~20 output tokens per answer; tonight's answers are 40x longer, so estimates run low.
    emulator.configure(reply_tokens=20)
    _run(emulator, _tasks(tmp_path / "warmup.jsonl", {"job": 5}), tmp_path / "warmup.json", config)
    emulator.reset()
    emulator.configure(reply_tokens=800)
    out = tmp_path / "out.json"

    summary = _run(
        emulator, _tasks(tmp_path / "tasks.jsonl", {"job": 60}, mode="realtime"), out, config, max_cost_usd=0.004
    )

    billed = emulator.stats()["cost_usd"]["total"]
    assert billed <= 0.004 and summary.cost.total_usd <= 0.004
    rows = _rows(out)
    succeeded = sum(row["status"] == "succeeded" for row in rows)
    assert succeeded + sum(row["status"] == "skipped_budget" for row in rows) == 60
    # Hard, not timid: it stops only when one more request could go over (each costs ~$0.0004 here).
    assert billed > 0.004 - 2 * 0.000_55


# --- usage log, cache-stats, report --------------------------------------------------------------------------


def _low_hit_rate_run(emulator: RunningEmulator, tmp_path: Path) -> Path:
    """A run with one well-cached task type and two that cache badly, each for a different reason."""
    types = {
        "cached": TaskType(mode="realtime", tier="capable", max_tokens=128, system=LONG_SYSTEM, user="Q {x}"),
        "tiny_prefix": TaskType(mode="realtime", tier="capable", max_tokens=128, system="Be brief.", user="Q {x}"),
        "no_breakpoint": TaskType(
            mode="batch", tier="capable", max_tokens=128, system=LONG_SYSTEM, user="Q {x}", cache_system=False
        ),
    }
    tasks = _tasks(tmp_path / "tasks.jsonl", {"cached": 10, "tiny_prefix": 10, "no_breakpoint": 10})
    _run(emulator, tasks, tmp_path / "out.json", _config(types, realtime_concurrency=1))
    return tmp_path / "state"


def test_the_usage_log_has_one_row_per_billed_request(emulator: RunningEmulator, tmp_path: Path) -> None:
    state = _low_hit_rate_run(emulator, tmp_path)
    with UsageLog.open(state) as log:
        records = log.records()
    rows = _rows(tmp_path / "out.json")
    assert len(records) == 30 == len(rows)
    by_task = {r.task_id: r for r in records}
    for row in rows:
        record = by_task[row["task_id"]]
        assert record.cost_usd == pytest.approx(row["cost_usd"])
        assert record.route == row["route"] and record.model == row["model"]
        assert record.output_tokens == row["usage"]["output_tokens"]
        assert (record.latency_s is not None) == (row["route"] == "realtime")


def test_cache_stats_measure_by_tokens_and_diagnose_low_hit_rates(emulator: RunningEmulator, tmp_path: Path) -> None:
    state = _low_hit_rate_run(emulator, tmp_path)
    with UsageLog.open(state) as log:
        records = log.records()
    stats = {s.group: s for s in cache_stats(records, "task_type", load_config())}

    cached = stats["cached"]
    # 1 write, 9 reads of the same ~1,100-token prefix, tiny uncached tail: hit rate by tokens is ~90%.
    assert cached.hit_rate == pytest.approx(
        cached.cache_read / (cached.cache_read + cached.cache_write + cached.uncached_input)
    )
    assert cached.hit_rate > 0.8 and cached.saved_usd > 0 and not cached.diagnosis
    assert stats["tiny_prefix"].hit_rate == 0
    assert any("below the model's minimum" in reason for reason in stats["tiny_prefix"].diagnosis)
    assert stats["no_breakpoint"].hit_rate == 0
    assert any("breakpoints missing" in reason for reason in stats["no_breakpoint"].diagnosis)


def test_cache_stats_and_report_commands(
    emulator: RunningEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _low_hit_rate_run(emulator, tmp_path)
    capsys.readouterr()
    assert main(["cache-stats", "--state-dir", str(state), "--json", "--by", "model"]) == 0
    by_model = orjson.loads(capsys.readouterr().out)
    assert [row["group"] for row in by_model] == ["claude-sonnet-5-5"]
    assert by_model[0]["requests"] == 30

    assert main(["cache-stats", "--state-dir", str(state)]) == 0
    table = capsys.readouterr().out
    assert "tiny_prefix" in table and "below the model's minimum" in table

    report = tmp_path / "report.md"
    assert main(["report", "--state-dir", str(state), "--output", str(report)]) == 0
    text = report.read_text()
    assert "## Spend by model" in text and "## Spend by route" in text and "## Spend by task type" in text
    assert "Cache the system prompt of `no_breakpoint`" in text
    assert "Send `tiny_prefix` through Message Batches" in text
    # Every saving is a ranked row with today's, the after and the saved figure per month.
    savings = [line for line in text.splitlines() if re.match(r"\| \d+ \| \*\*", line)]
    assert savings and all(re.search(r"\| \$[\d.,]+ \| \$[\d.,]+ \| \*\*\$[\d.,]+\*\* \|$", line) for line in savings)

    capsys.readouterr()
    assert main(["report", "--state-dir", str(state), "--analyze-only"]) == 0
    assert capsys.readouterr().out.startswith("# batch_engine optimization report")


def test_report_without_a_usage_log_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "no usage log yet" in err and err.count("\n") == 1


# --- token counting ------------------------------------------------------------------------------------------


def test_plan_counts_tokens_once_per_distinct_prompt(
    emulator: RunningEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    tasks = tmp_path / "tasks.jsonl"
    rows = [
        {"task_id": f"t{i}", "task_type": "classify_bulk", "input_data": {"text": f"doc {i % 5}"}} for i in range(20)
    ]
    tasks.write_bytes(b"\n".join(orjson.dumps(row) for row in rows))
    args = ["plan", str(tasks), "--json", "--count-tokens", "--state-dir", str(tmp_path / "s")]
    assert main(args) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["input_tokens_source"] == "counted"
    assert summary["distinct_prompts_counted"] == 5
    assert emulator.stats()["calls"]["POST /v1/messages/count_tokens"] == {"200": 5}
    assert summary["input_tokens"] > 0 and summary["estimate_error_pct"] is not None


def test_plan_falls_back_to_the_estimate_when_counting_fails(
    emulator: RunningEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    emulator.configure(fault_endpoints=("count_tokens",), fault_rate_429=1.0, fault_retry_after_s=0)
    tasks = tmp_path / "tasks.jsonl"
    rows = [{"task_id": f"t{i}", "task_type": "classify_bulk", "input_data": {"text": f"doc {i}"}} for i in range(3)]
    tasks.write_bytes(b"\n".join(orjson.dumps(row) for row in rows))
    assert main(["plan", str(tasks), "--count-tokens", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "input tokens (offline estimate)" in out
    assert "note: token counting failed for" in out and "the offline estimate is used" in out


def test_report_with_a_plan_prices_its_recommendations(
    emulator: RunningEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _low_hit_rate_run(emulator, tmp_path)
    capsys.readouterr()
    plan = ROOT / "samples" / "nightly_tasks.json"
    args = ["report", "--state-dir", str(state), "--analyze-only", "--plan", str(plan)]
    assert main([*args, "--config", str(ROOT / "samples" / "config.toml")]) == 0
    text = capsys.readouterr().out
    assert f"## Plan: {plan}" in text and "304 tasks (241 batch, 63 realtime)" in text
    # The sample's realtime task types (chat, user_query) default to realtime: the plan says what batching saves.
    assert re.search(r"\*\*Plan: send `user_query` through Message Batches\*\* — \$0\.\d{4}", text)


def _usage(at: float, task_type: str, output_tokens: int) -> UsageRecord:
    return UsageRecord(
        at, "run", f"t{at}", task_type, "batch", "claude-haiku-5-5", "succeeded", 10, output_tokens, 0, 0, 0, 0,
        0.0, 0.0, None, 512, None, 0, None, None, "",
    )  # fmt: skip


def test_the_output_history_is_the_newest_observations_of_each_task_type(tmp_path: Path) -> None:
    with UsageLog.open(tmp_path) as log:
        # Long ago "a" answered 500 tokens; lately 20. "b" was seen once, before the newest rows.
        log.append([_usage(float(at), "a", 500) for at in range(0, 50)])
        log.append([_usage(50.0, "b", 77)])
        log.append([_usage(float(at), "a", 20) for at in range(100, 110)])

        assert [row[2] for row in log.recent_outputs(limit=3)] == [20, 20, 20]
        assert list(log.recent_outputs(since=105, limit=100)) == [("a", "claude-haiku-5-5", 20)] * 5
        assert output_history(log.recent_outputs(), per_key=10) == {
            ("a", "claude-haiku-5-5"): 20,
            ("b", "claude-haiku-5-5"): 77,
        }
        # Uncapped, the old answers of "a" still dominate its 95th percentile.
        assert output_history(log.recent_outputs())[("a", "claude-haiku-5-5")] == 500
        # Capped by rows: "b" falls out of a window of the 10 newest.
        assert output_history(log.recent_outputs(limit=10)) == {("a", "claude-haiku-5-5"): 20}
