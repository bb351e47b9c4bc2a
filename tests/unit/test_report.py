"""The optimization report (`batch-engine report`) on a small hand-written usage log: every figure is pinned to
the arithmetic written next to it, at the shipped price table (USD per million tokens):

    claude-haiku-5-5   input 0.10  output 0.50  5m write 0.125  read 0.01
    claude-sonnet-5-5  input 2.00  output 10.00
    claude-opus-5-5    input 4.00  output 20.00

The log spans 2.5 days before `NOW`, so the period is 3 whole days and a month (30 days) is 10 x the period.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from batch_engine.cli import main
from batch_engine.client import ApiSettings, RetryPolicy
from batch_engine.config import Thinking, default_config_text, load_config, parse_config
from batch_engine.emulator import RunningEmulator
from batch_engine.render.advice_markdown import render_report
from batch_engine.runner import RunOptions, run
from batch_engine.state.usage_log import UsageLog, UsageRecord
from batch_engine.telemetry.advice import OptimizationReport, Recommendation, analyze
from tests.support.usage import usage_row

NOW = 1_800_000_000.0
DAY = 86_400.0
MONTH = 10  # 30 days / a 3-day period

# The shipped config, except that `summarize` does not cache its system prompt.
SUMMARIZE = '[task_types.summarize]\nmode = "batch"\ntier = "cheap"\nmax_tokens = 512\ncache_system = true'
CONFIG_TEXT = default_config_text().replace(SUMMARIZE, SUMMARIZE.replace("cache_system = true", "cache_system = false"))


def _record(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "at": NOW - 2.5 * DAY,
        "run_key": "run1",
        "task_type": "chat",
        "route": "realtime",
        "model": "claude-sonnet-5-5",
    }
    return usage_row(**(base | fields))


def hand_log() -> list[UsageRecord]:
    """Four task types, each cost written out."""
    # chat: realtime by its task type's default, sonnet, 1,000 in / 100 out, 90 s each, not streamed.
    #   (1000 x 2.00 + 100 x 10.00) / 1e6 = $0.0030 each, $0.0120 for 4.
    chat = [
        _record(
            task_id=f"chat{i}",
            at=NOW - 2.5 * DAY + i,
            input_tokens=1000,
            output_tokens=100,
            cost_usd=0.003,
            baseline_usd=0.003,
            latency_s=90.0,
            route_reason="task type chat defaults to realtime",
        )
        for i in range(4)
    ]
    # generate_tests: batch, sonnet, adaptive thinking at low effort, 2,000 in each.
    #   500 out (300 thinking): (2000 x 2 + 500 x 10) / 1e6 x 0.5 = $0.0045
    #   300 out (100 thinking): (2000 x 2 + 300 x 10) / 1e6 x 0.5 = $0.0035
    tests = [
        _record(
            task_id=f"gt{i}",
            task_type="generate_tests",
            route="batch",
            input_tokens=2000,
            output_tokens=out,
            thinking_tokens=thought,
            cost_usd=usd,
            max_tokens=2048,
            thinking="adaptive:low",
            route_reason="task type generate_tests defaults to batch",
        )
        for i, (out, thought, usd) in enumerate([(500, 300, 0.0045), (300, 100, 0.0035)])
    ]
    # critical_fix: realtime because of a deadline, opus, 1,000 in / 1,000 out of which 800 thinking, 30 s.
    #   (1000 x 4 + 1000 x 20) / 1e6 = $0.0240; its thinking: 800 x 20 / 1e6 = $0.0160.
    fix = _record(
        task_id="fix",
        task_type="critical_fix",
        model="claude-opus-5-5",
        input_tokens=1000,
        output_tokens=1000,
        thinking_tokens=800,
        cost_usd=0.024,
        latency_s=30.0,
        max_tokens=4096,
        thinking="adaptive:high",
        route_reason="deadline in 600s is sooner than the batch SLA of 86400s",
    )
    # summarize: batch, haiku, the same 1,000-token system prompt 3 times in one run, not marked for caching.
    #   (1200 x 0.10 + 50 x 0.50) / 1e6 x 0.5 = $0.0000725 each, $0.0002175 for 3.
    summarize = [
        _record(
            task_id=f"s{i}",
            task_type="summarize",
            route="batch",
            model="claude-haiku-5-5",
            input_tokens=1200,
            output_tokens=50,
            cost_usd=0.0000725,
            max_tokens=512,
            prefix_key="p1",
            prefix_tokens=1000,
            route_reason="task type summarize defaults to batch",
        )
        for i in range(3)
    ]
    return [*chat, *tests, fix, *summarize]


SPEND = 0.012 + 0.008 + 0.024 + 0.0002175


async def _no_wait(_: float) -> None:
    await asyncio.sleep(0)


POLICY = RetryPolicy(attempts=5, sleep=_no_wait)


def _report(**options: Any) -> OptimizationReport:
    return analyze(hand_log(), parse_config(CONFIG_TEXT), NOW, **options)


def _titled(recs: list[Recommendation], title: str) -> Recommendation:
    return next(r for r in recs if r.title == title)


def test_the_period_is_whole_days_and_a_month_is_thirty_of_them() -> None:
    report = _report()
    # First request 2.5 days before now: 3 whole days; 30 / 3 = 10.
    assert report.period.days == 3 and report.period.monthly_factor == MONTH
    assert report.requests == 10
    assert report.spend_usd == pytest.approx(SPEND)


def test_savings_are_ranked_by_money_saved_on_the_bill() -> None:
    savings = _report().savings
    assert [r.title for r in savings] == [
        "Try the cheap tier for `chat`",
        "Send `chat` through Message Batches",
        "Cache the system prompt of `summarize`",
    ]
    tier, batch, cache = savings
    # Same tokens on haiku: (1000 x 0.10 + 100 x 0.50) / 1e6 = $0.00015 each, $0.0006 for 4; saves $0.0114.
    assert (tier.before_usd, tier.after_usd) == pytest.approx((0.012, 0.0006))
    assert tier.saved_usd == pytest.approx(0.0114)
    # At the batch discount: $0.0120 x 0.5 = $0.0060; saves $0.0060.
    assert (batch.before_usd, batch.after_usd) == pytest.approx((0.012, 0.006))
    # One 5-minute write and two reads instead of three full-price prefixes, on the batch route:
    #   (3 x 1000 x 0.10 - (1000 x 0.125 + 2 x 1000 x 0.01)) / 1e6 x 0.5 = (300 - 145) / 1e6 x 0.5 = $0.0000775.
    assert cache.saved_usd == pytest.approx(0.0000775)
    assert cache.before_usd == pytest.approx(0.0002175)
    # Nothing but bill savings in this list: max_tokens, thinking and streaming are elsewhere.
    assert {r.kind for r in savings} == {"saving"}


def test_every_saving_applied_together_is_priced_once_not_summed() -> None:
    report = _report()
    # chat on haiku *and* batched: $0.00015 x 0.5 x 4 = $0.0003 (not $0.0120 - $0.0114 - $0.0060 < 0).
    # summarize cached: $0.0002175 - $0.0000775 = $0.00014. generate_tests and critical_fix unchanged.
    assert report.combined_after_usd == pytest.approx(0.0003 + 0.008 + 0.024 + 0.00014)


def test_a_cache_saving_on_a_task_type_that_also_moves_to_batches_is_counted_at_the_batch_price() -> None:
    # user_query: realtime by default, haiku, a 1,000-token system prompt repeated 3 times, not cached.
    #   (1200 x 0.10 + 50 x 0.50) / 1e6 = $0.000145 each, $0.000435 for 3.
    records = [
        _record(task_id=f"q{i}", task_type="user_query", model="claude-haiku-5-5", input_tokens=1200,
                output_tokens=50, cost_usd=0.000145, prefix_key="p2", prefix_tokens=1000,
                route_reason="task type user_query defaults to realtime")
        for i in range(3)
    ]  # fmt: skip
    report = analyze(records, load_config(), NOW)
    saved = {r.title: r.saved_usd for r in report.savings}
    # Batching: $0.000435 x 0.5 = $0.0002175 saved. Caching, realtime: (300 - 145) / 1e6 = $0.000155 saved.
    assert saved == {
        "Send `user_query` through Message Batches": pytest.approx(0.0002175),
        "Cache the system prompt of `user_query`": pytest.approx(0.000155),
    }
    # Together: batched $0.0002175, less the cache saving at the batch price ($0.000155 x 0.5): $0.00014.
    assert report.combined_after_usd == pytest.approx(0.0002175 - 0.0000775)


def test_the_markdown_reads_like_a_bill_per_month() -> None:
    text = render_report(_report())
    # Per month = 10 x the period: spend $0.0442175 -> $0.4422; the first saving $0.0120 -> $0.0060 ... x 10.
    assert "| Spend | $0.0442 | $0.4422 |" in text
    first = (
        '| 1 | **Try the cheap tier for `chat`**: tier = "cheap" (claude-haiku-5-5) | $0.1200 | $0.0060 | **$0.1140** |'
    )
    assert first in text
    assert "| 2 | **Send `chat` through Message Batches**" in text and "| $0.1200 | $0.0600 | **$0.0600** |" in text
    # All applied: ($0.0442175 - $0.03244) x 10 = $0.1178.
    assert "| Saved by applying them | $0.0118 | $0.1178 |" in text
    budget = text.index("## Budget freed (not billed: no saving on the bill)")
    assert text.index("## Savings on the bill") < budget
    # The budget section carries no dollar figure.
    section = text[budget : text.index("\n## ", budget + 1)]
    assert "$" not in section.replace("`--max-cost-usd`", "")


def test_max_tokens_counts_visible_output_and_thinking_and_frees_budget_only() -> None:
    report = _report()
    findings = {f.task_type: f for f in report.max_tokens}
    tests = findings["generate_tests"]
    # Visible output = output - thinking: 500 - 300 = 200 and 300 - 100 = 200; thinking at most 300.
    assert (tests.visible_p99, tests.thinking_max, tests.thinking_floor) == (200, 300, 300)
    # 2 x (200 + 300) = 1,000, rounded up to a multiple of 64: 1,024 (2 x 500 output would keep no room for the
    # thinking of the other request if it had been the longer answer).
    assert tests.recommended == 1024
    fix = findings["critical_fix"]
    # Visible 1000 - 800 = 200; 2 x (200 + 800) = 2,000 -> 2,048: never below the 800 thinking tokens it needed.
    assert (fix.visible_p99, fix.thinking_max, fix.recommended) == (200, 800, 2048)
    # chat: 2 x 100 = 200 -> 256; summarize: 2 x 50 = 100 -> 128.
    assert (findings["chat"].recommended, findings["summarize"].recommended) == (256, 128)
    budget = {r.task_type: r for r in report.budget}
    assert {t: r.config_change.new for t, r in budget.items() if r.config_change} == {
        "chat": 256,
        "generate_tests": 1024,
        "critical_fix": 2048,
        "summarize": 128,
    }
    assert all(r.kind == "budget" and r.saved_usd == 0 for r in budget.values())


def test_max_tokens_keeps_a_manual_thinking_budget_and_leaves_truncated_task_types_alone() -> None:
    deep = [
        _record(task_id=f"d{i}", task_type="deep", output_tokens=1600, thinking_tokens=1500, max_tokens=16000,
                thinking="manual:2000")
        for i in range(3)
    ]  # fmt: skip
    cut = [_record(task_id="c", task_type="cut", output_tokens=900, max_tokens=900)]
    report = analyze([*deep, *cut], load_config(), NOW)
    findings = {f.task_type: f for f in report.max_tokens}
    # Visible 100; thinking seen 1,500 but the manual budget lets it use 2,000: 2 x (100 + 2000) = 4,200 -> 4,224.
    assert (findings["deep"].thinking_floor, findings["deep"].recommended) == (2000, 4224)
    # An answer reached max_tokens: no advice to lower it.
    assert findings["cut"].truncated == 1
    assert [r.task_type for r in report.budget] == ["deep"]


def test_a_model_that_thinks_by_default_counts_its_thinking_even_when_the_task_type_asks_for_none() -> None:
    # classify_bulk asks for no thinking, but haiku 5.5 thinks by default: 50 of its 60 output tokens.
    #   (100 x 0.10 + 60 x 0.50) / 1e6 x 0.5 = $0.00002 each; thinking 50 x 0.50 / 1e6 x 0.5 = $0.0000125 each.
    records = [
        _record(task_id=f"c{i}", task_type="classify_bulk", route="batch", model="claude-haiku-5-5",
                input_tokens=100, output_tokens=60, thinking_tokens=50, cost_usd=0.00002, max_tokens=1024)
        for i in range(2)
    ]  # fmt: skip
    report = analyze(records, load_config(), NOW)
    finding = report.max_tokens[0]
    # Visible 60 - 50 = 10; 2 x (10 + 50) = 120 -> 128, not 2 x 10 = 20 which thinking alone would overrun.
    assert (finding.visible_p99, finding.thinking_floor, finding.recommended) == (10, 50, 128)
    trial = report.trials[0]
    # 100 of 120 output tokens (83%) are thinking, $0.000025 at stake: ask for adaptive thinking at low effort.
    assert trial.at_stake_usd == pytest.approx(0.000025)
    assert trial.config_change is not None
    assert trial.config_change.new == Thinking(mode="adaptive", effort="low")


def test_max_tokens_advice_stays_above_the_configs_manual_thinking_budget() -> None:
    base = load_config()
    legacy = base.task_types["summarize"].model_copy(
        update={"max_tokens": 16000, "thinking": Thinking(mode="manual", budget_tokens=3000)}
    )
    config = base.model_copy(
        update={"tiers": {**base.tiers, "cheap": "claude-haiku-4-5"}, "task_types": {"legacy": legacy}}
    )
    # Logged under an older budget of 1,024: 2 x (50 visible + 1,024) = 2,148 -> 2,176, which is not above the
    # 3,000 the config now gives thinking (the API needs budget_tokens < max_tokens): no advice.
    records = [
        _record(task_id=f"l{i}", task_type="legacy", model="claude-haiku-4-5", output_tokens=150,
                thinking_tokens=100, max_tokens=16000, thinking="manual:1024")
        for i in range(2)
    ]  # fmt: skip
    report = analyze(records, config, NOW)
    assert report.max_tokens[0].recommended == 2176
    assert report.budget == []


def test_thinking_at_stake_is_a_trial_and_low_effort_is_left_alone() -> None:
    report = _report()
    # critical_fix: thinking 800 of 1,000 output tokens (80%), 800 x 20 / 1e6 = $0.0160 at stake; effort high ->
    # medium. generate_tests thinks 400 of 800 (50%) but is already at low effort: nothing to lower.
    assert [(r.task_type, r.at_stake_usd) for r in report.trials] == [("critical_fix", pytest.approx(0.016))]
    trial = report.trials[0]
    assert trial.config_change is not None
    assert trial.config_change.new == Thinking(mode="adaptive", effort="medium")
    assert trial.saved_usd == 0


def test_slow_unstreamed_realtime_task_types_are_told_to_stream_at_the_same_price() -> None:
    report = _report()
    # chat: p95 latency 90 s >= 60 s, stream = false; critical_fix: 30 s.
    assert [(r.task_type, r.kind) for r in report.no_bill_change] == [("chat", "no_bill_change")]


def test_scope_keeps_only_its_section_and_its_savings() -> None:
    report = _report(scopes=("caching",))
    assert [s.scope for s in report.sections] == ["caching"]
    assert [r.title for r in report.savings] == ["Cache the system prompt of `summarize`"]
    assert report.budget == [] and report.trials == [] and report.max_tokens == ()
    assert report.combined_after_usd == pytest.approx(SPEND - 0.0000775)


def test_model_prices_the_workload_on_the_named_tier() -> None:
    report = _report(scopes=("model",), target="opus")
    assert report.target_model == "claude-opus-5-5"
    chat = next(row for row in report.tier_costs if row.task_type == "chat")
    # (1000 x 4.00 + 100 x 20.00) / 1e6 = $0.0060 each, $0.0240 for 4: dearer, so no recommendation.
    assert chat.on_target_usd == pytest.approx(0.024)
    tests = next(row for row in report.tier_costs if row.task_type == "generate_tests")
    # (2000 x 4 + 500 x 20) / 1e6 x 0.5 + (2000 x 4 + 300 x 20) / 1e6 x 0.5 = $0.0090 + $0.0070.
    assert tests.on_target_usd == pytest.approx(0.016)
    assert report.savings == []
    haiku = _report(scopes=("model",), target="haiku")
    assert [r.title for r in haiku.savings] == ["Try the cheap tier for `chat`"]


# --- the command ---------------------------------------------------------------------------------------------


def _state(tmp_path: Path) -> tuple[Path, Path]:
    """A state dir holding the hand log, shifted to end now, and the config file."""
    shift = time.time() - NOW
    state = tmp_path / "state"
    with UsageLog.open(state) as log:
        log.append([r._replace(at=r.at + shift) for r in hand_log()])
    config = tmp_path / "config.toml"
    config.write_text(CONFIG_TEXT)
    return state, config


def _tree(root: Path) -> dict[str, str]:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_write_config_applies_every_change_with_a_comment_and_loads(tmp_path: Path) -> None:
    state, config = _state(tmp_path)
    written = tmp_path / "recommended.toml"
    args = ["report", "--state-dir", str(state), "--config", str(config), "--output", str(tmp_path / "r.md")]
    assert main([*args, "--write-config", str(written)]) == 0

    before, after = load_config(config), load_config(written)
    chat = after.task_types["chat"]
    # chat moves to the cheap tier, so its max_tokens stays: how much haiku thinks on it is not in the log.
    assert (chat.mode, chat.tier, chat.max_tokens, chat.stream) == ("batch", "cheap", 1024, True)
    assert after.task_types["summarize"].cache_system is True
    assert after.task_types["summarize"].max_tokens == 128
    assert after.task_types["generate_tests"].max_tokens == 1024
    fix = after.task_types["critical_fix"]
    assert (fix.max_tokens, fix.thinking) == (2048, Thinking(mode="adaptive", effort="medium"))
    # Nothing else moved: the rest of the file is the config as it was.
    changed = {"chat", "summarize", "generate_tests", "critical_fix"}
    assert {k: v for k, v in after.task_types.items() if k not in changed} == {
        k: v for k, v in before.task_types.items() if k not in changed
    }
    assert (after.models, after.tiers, after.limits) == (before.models, before.tiers, before.limits)

    old_lines, new_lines = config.read_text().splitlines(), written.read_text().splitlines()
    added = [line for line in new_lines if line not in old_lines]
    # chat: mode, tier, stream (inserted: it was not set); summarize: cache_system, max_tokens;
    # generate_tests: max_tokens; critical_fix: max_tokens, thinking.
    assert len(added) == 8 and all("  # report: " in line for line in added)
    assert len(new_lines) == len(old_lines) + 1
    tier = next(line for line in added if line.startswith("tier = "))
    # The tier saving per month: $0.0114 x 10.
    assert tier.startswith('tier = "cheap"  # report: was "capable".') and "saves ~$0.1140/month" in tier
    budget = next(line for line in added if line.startswith("max_tokens = 1024"))
    # generate_tests: 2 x (visible 200 + thinking 300) = 1,000 -> 1,024.
    assert "was 2048. needs at most visible output p99 200 + thinking 300" in budget and "frees budget only" in budget


def test_analyze_only_never_writes_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, config = _state(tmp_path)
    before = _tree(tmp_path)
    output = tmp_path / "report.md"
    args = ["report", "--state-dir", str(state), "--config", str(config), "--output", str(output)]
    assert main([*args, "--analyze-only"]) == 0
    assert capsys.readouterr().out.startswith("# batch_engine optimization report")
    assert _tree(tmp_path) == before

    # Asked to write a config as well, it refuses in one line and still writes nothing.
    assert main([*args, "--analyze-only", "--write-config", str(tmp_path / "new.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: --analyze-only writes nothing") and err.count("\n") == 1
    assert _tree(tmp_path) == before


def test_scope_and_model_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, config = _state(tmp_path)
    args = ["report", "--state-dir", str(state), "--config", str(config), "--analyze-only"]
    assert main([*args, "--scope", "batching"]) == 0
    text = capsys.readouterr().out
    assert "## Batching" in text and "## Caching" not in text and "## Model" not in text
    assert "Send `chat` through Message Batches" in text and "cheap tier" not in text

    assert main([*args, "--scope", "model", "--model", "opus"]) == 0
    text = capsys.readouterr().out
    # The whole workload on opus per month: chat $0.024 + generate_tests $0.016 + critical_fix $0.024 +
    # summarize (1200 x 4 + 50 x 20) / 1e6 x 0.5 x 3 = $0.0087 -> $0.0727 x 10 = $0.7270.
    assert "on claude-opus-5-5 (the premium tier), same tokens: $0.4422 → $0.7270 per month" in text

    assert main([*args, "--scope", "caching", "--model", "haiku"]) == 2
    assert capsys.readouterr().err.startswith("Error: --model prices the model scope")


def test_a_run_on_the_written_config_truncates_nothing(emulator: RunningEmulator, tmp_path: Path) -> None:
    """Run, report, write the config, run again on it: the lowered max_tokens leave room for every answer and
    its thinking (the emulator's adaptive thinking spends up to half of max_tokens)."""
    text = default_config_text().replace("batch_poll_initial_s = 5.0", "batch_poll_initial_s = 0.05")
    config = tmp_path / "config.toml"
    config.write_text(text.replace("batch_poll_interval_s = 60.0", "batch_poll_interval_s = 0.2"))
    tasks = tmp_path / "tasks.jsonl"
    rows = [
        {"task_id": f"t{i}", "task_type": "generate_tests", "input_data": {"code": f"def f{i}(): return {i}"}}
        for i in range(6)
    ] + [
        {"task_id": f"f{i}", "task_type": "critical_fix", "input_data": {"incident": f"outage {i}", "code": "x = 1"}}
        for i in range(2)
    ]
    tasks.write_bytes(b"\n".join(orjson.dumps(row) for row in rows) + b"\n")
    api = ApiSettings(SecretStr("sk-test"), emulator.base_url)

    def run_on(config_file: Path, name: str) -> list[dict[str, Any]]:
        out = tmp_path / f"{name}.json"
        options = RunOptions(state_dir=tmp_path / name)
        asyncio.run(run(tasks, out, api=api, config=load_config(config_file), options=options, policy=POLICY))
        return list(orjson.loads(out.read_bytes())["results"])

    first = run_on(config, "first")
    assert all(row["usage"]["thinking_tokens"] > 0 for row in first)
    written = tmp_path / "recommended.toml"
    args = [
        "report",
        "--state-dir",
        str(tmp_path / "first"),
        "--config",
        str(config),
        "--output",
        str(tmp_path / "r.md"),
    ]
    # The thinking scope: max_tokens and thinking only (a tier move would keep max_tokens as it is).
    assert main([*args, "--scope", "thinking", "--write-config", str(written)]) == 0
    lowered = load_config(written).task_types
    assert lowered["generate_tests"].max_tokens < 2048 and lowered["critical_fix"].max_tokens < 4096

    second = run_on(written, "second")
    assert [row["stop_reason"] for row in second] == ["end_turn"] * len(rows)
    # generate_tests kept its effort: the same prompts think exactly as much as before, none squeezed out by the
    # lower max_tokens (advice sized on visible output alone would leave adaptive thinking half of ~128 tokens).
    thought = {row["task_id"]: row["usage"]["thinking_tokens"] for row in first if row["task_id"].startswith("t")}
    assert {row["task_id"]: row["usage"]["thinking_tokens"] for row in second if row["task_id"] in thought} == thought
