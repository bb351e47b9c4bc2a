"""Pure: the optimization report — spend by model, route and task type from the usage log, the savings against
the all-realtime no-cache baseline, and recommendations that each carry the dollar figure behind them."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from batch_engine.budget import Estimator
from batch_engine.config import Config, ModelSpec, Route
from batch_engine.models import Usage
from batch_engine.planning import Plan, PlannedTask
from batch_engine.planning.params import system_prefix
from batch_engine.planning.pricing import cost
from batch_engine.telemetry.cache_stats import caching_saved
from batch_engine.telemetry.usage_log import UsageRecord

SHORT_OUTPUT_TOKENS = 300  # p95 output under this suggests the cheap tier can do the job
MAX_TOKENS_HEADROOM = 4  # max_tokens more than 4x the p99 output is headroom nobody uses
_PER_TOKEN = 1e-6
K = TypeVar("K", str, tuple[str, str], tuple[str, str, str])


@dataclass(frozen=True, slots=True)
class Recommendation:
    title: str
    detail: str
    usd: float  # what following it would have saved (or freed) over the period analysed


def _usage(record: UsageRecord) -> Usage:
    return Usage(
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
        cache_read_input_tokens=record.cache_read_tokens,
        cache_creation_input_tokens=record.cache_write_tokens,
        cache_write_5m_tokens=record.cache_write_5m_tokens,
        cache_write_1h_tokens=record.cache_write_1h_tokens,
        thinking_tokens=record.thinking_tokens,
    )


def _route(record: UsageRecord) -> Route:
    return "batch" if record.route == "batch" else "realtime"


def _discount(record: UsageRecord, config: Config) -> float:
    return config.batch_discount if record.route == "batch" else 1.0


def _quantile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def _by(records: Sequence[UsageRecord], key: Callable[[UsageRecord], K]) -> dict[K, list[UsageRecord]]:
    groups: dict[K, list[UsageRecord]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return dict(groups)


def recommendations(records: Sequence[UsageRecord], config: Config) -> list[Recommendation]:
    """Every recommendation the usage supports, largest dollar figure first."""
    found: list[Recommendation] = []
    found += _batch_eligible_sent_realtime(records, config)
    found += _cheaper_tier(records, config)
    found += _max_tokens_headroom(records, config)
    found += _uncached_prefixes(records, config)
    found += _thinking_spend(records, config)
    return sorted((r for r in found if r.usd > 0), key=lambda r: -r.usd)


def _batch_eligible_sent_realtime(records: Sequence[UsageRecord], config: Config) -> list[Recommendation]:
    # Realtime only because of the task type's default (no deadline, no max_latency, no explicit mode).
    eligible = [r for r in records if r.route == "realtime" and r.route_reason.startswith("task type ")]
    out = []
    for task_type, group in sorted(_by(eligible, lambda r: r.task_type).items()):
        spent = sum(r.cost_usd for r in group)
        out.append(
            Recommendation(
                f"Send `{task_type}` through Message Batches",
                f"{len(group)} requests went realtime only because the task type defaults to realtime (no deadline "
                f"asked for it); at the batch discount they would have cost ${spent * config.batch_discount:.4f} "
                f'instead of ${spent:.4f}. Set `mode = "batch"` for it if its callers can wait up to 24 h.',
                spent * (1 - config.batch_discount),
            )
        )
    return out


def _cheaper_tier(records: Sequence[UsageRecord], config: Config) -> list[Recommendation]:
    cheap_model = config.tiers["cheap"]
    cheap = config.models[cheap_model]
    out = []
    for (task_type, model), group in sorted(_by(records, lambda r: (r.task_type, r.model)).items()):
        if model == cheap_model or _quantile([r.output_tokens for r in group], 0.95) >= SHORT_OUTPUT_TOKENS:
            continue
        spent = sum(r.cost_usd for r in group)
        on_cheap = sum(cost(_usage(r), cheap, _route(r), config.batch_discount) for r in group)
        out.append(
            Recommendation(
                f"Try the cheap tier for `{task_type}`",
                f"{len(group)} {model} requests produced short outputs (p95 under {SHORT_OUTPUT_TOKENS} tokens); "
                f"the same tokens on {cheap_model} cost ${on_cheap:.4f} instead of ${spent:.4f}. "
                'Check quality on a sample before switching (`tier = "cheap"`).',
                spent - on_cheap,
            )
        )
    return out


def _max_tokens_headroom(records: Sequence[UsageRecord], config: Config) -> list[Recommendation]:
    out = []
    for task_type, group in sorted(_by(records, lambda r: r.task_type).items()):
        p99 = _quantile([r.output_tokens for r in group], 0.99)
        max_tokens = max(r.max_tokens for r in group)
        if p99 == 0 or max_tokens <= MAX_TOKENS_HEADROOM * p99:
            continue
        spec = config.models.get(group[0].model)
        if spec is None:
            continue
        tied_up = sum(
            (r.max_tokens - r.output_tokens)
            * spec.price.output
            * _PER_TOKEN
            * (config.batch_discount if r.route == "batch" else 1)
            for r in group
        )
        out.append(
            Recommendation(
                f"Lower `max_tokens` for `{task_type}`",
                f"max_tokens is {max_tokens} but the p99 output is {p99} tokens; budgets and pre-flight estimates "
                f"reserve ${tied_up:.4f} for output that never comes. Unused max_tokens is not billed, so this "
                f"frees budget rather than spend: try max_tokens = {2 * p99}.",
                tied_up,
            )
        )
    return out


def _uncached_prefixes(records: Sequence[UsageRecord], config: Config) -> list[Recommendation]:
    out = []
    # Per run and task type: one task type can share its prefix with another that does mark it for caching.
    groups = _by([r for r in records if r.prefix_key], lambda r: f"{r.run_key}\x00{r.task_type}\x00{r.prefix_key}")
    missing: dict[str, float] = defaultdict(float)
    wrong_ttl: dict[str, float] = defaultdict(float)
    for group in groups.values():
        first = group[0]
        spec = config.models.get(first.model)
        if spec is None or len(group) < 2 or first.prefix_tokens < spec.min_cacheable_tokens:
            continue
        discount = config.batch_discount if first.route == "batch" else 1.0
        if first.cache_ttl is None:
            missing[first.task_type] += _cache_gain(spec, first.prefix_tokens, len(group), "5m") * discount
        elif first.route == "batch" and first.cache_ttl == "5m":
            writes = sum(1 for r in group if r.cache_write_tokens)
            if writes > 1:
                now = sum(caching_saved(r, spec, config.batch_discount) for r in group)
                wrong_ttl[first.task_type] += _cache_gain(spec, first.prefix_tokens, len(group), "1h") * discount - now
    for task_type, usd in sorted(missing.items()):
        out.append(
            Recommendation(
                f"Cache the system prompt of `{task_type}`",
                f"its requests repeat a system prompt above the model's cache minimum with no breakpoint; caching it "
                f"would have saved ${usd:.4f} net of the write premium (set cache_system = true).",
                usd,
            )
        )
    for task_type, usd in sorted(wrong_ttl.items()):
        out.append(
            Recommendation(
                f"Use the 1 h cache TTL for `{task_type}` batches",
                f"its batch rows wrote 5-minute cache entries again and again; one 1 h write and reads after it "
                f"would have saved ${usd:.4f}.",
                usd,
            )
        )
    return out


def _cache_gain(spec: ModelSpec, prefix_tokens: int, requests: int, ttl: str) -> float:
    """Saving of one cache write then `requests - 1` reads of a prefix, against sending it uncached each time."""
    price = spec.price
    write = price.cache_write_1h if ttl == "1h" else price.cache_write_5m
    uncached = requests * prefix_tokens * price.input
    cached = prefix_tokens * write + (requests - 1) * prefix_tokens * price.cache_read
    return (uncached - cached) * _PER_TOKEN


def _thinking_spend(records: Sequence[UsageRecord], config: Config) -> list[Recommendation]:
    out = []
    thinking = [r for r in records if r.thinking and r.thinking_tokens and r.model in config.models]
    for task_type, group in sorted(_by(thinking, lambda r: r.task_type).items()):
        output = sum(r.output_tokens for r in group)
        thought = sum(r.thinking_tokens for r in group)
        if not output or thought / output < 0.5:
            continue
        # Thinking tokens are billed as output tokens, at the route's price.
        usd = sum(
            r.thinking_tokens
            * config.models[r.model].price_for_prompt(r.prompt_tokens).output
            * _PER_TOKEN
            * _discount(r, config)
            for r in group
        )
        out.append(
            Recommendation(
                f"Review thinking for `{task_type}`",
                f"thinking is {thought / output:.0%} of its output tokens ({group[0].thinking}) and cost ${usd:.4f}; "
                "a lower effort (or thinking off, where the model allows) saves up to that.",
                usd,
            )
        )
    return out


def plan_recommendations(plan: Plan, estimator: Estimator) -> list[Recommendation]:
    """What a plan could save before it runs, from the same estimates the budget uses."""
    config = estimator.config
    found: list[Recommendation] = []
    by_default = [t for t in plan.tasks if t.route == "realtime" and t.route_reason.startswith("task type ")]
    for task_type, group in sorted(_by_task_type(by_default).items()):
        realtime = sum(estimator.cost(t, "realtime") for t in group)
        batch = sum(estimator.cost(t, "batch") for t in group)
        found.append(
            Recommendation(
                f"Plan: send `{task_type}` through Message Batches",
                f"{len(group)} tasks of this plan go realtime only by the task type's default; estimated "
                f"${realtime:.4f} realtime vs ${batch:.4f} as batch rows.",
                realtime - batch,
            )
        )
    uncached: dict[str, list[PlannedTask]] = defaultdict(list)
    for task in plan.tasks:
        key, tokens, ttl = system_prefix(task.frame)
        if key is not None and ttl is None and tokens >= config.models[task.model].min_cacheable_tokens:
            uncached[f"{task.task_type}\x00{key}"].append(task)
    for _, group in sorted(uncached.items()):
        if len(group) < 2:
            continue
        first = group[0]
        tokens = system_prefix(first.frame)[1]
        spec = config.models[first.model]
        discount = config.batch_discount if first.route == "batch" else 1.0
        usd = _cache_gain(spec, tokens, len(group), "1h" if first.route == "batch" else "5m") * discount
        found.append(
            Recommendation(
                f"Plan: cache the system prompt of `{first.task_type}`",
                f"{len(group)} tasks share a ~{tokens}-token system prompt with no cache breakpoint.",
                usd,
            )
        )
    return sorted((r for r in found if r.usd > 0), key=lambda r: -r.usd)


def _by_task_type(tasks: Sequence[PlannedTask]) -> dict[str, list[PlannedTask]]:
    groups: dict[str, list[PlannedTask]] = defaultdict(list)
    for task in tasks:
        groups[task.task_type].append(task)
    return dict(groups)


def _attribute(name: str, record: UsageRecord) -> str:
    return str(getattr(record, name))


def render_report(
    records: Sequence[UsageRecord],
    config: Config,
    days: float,
    plan: tuple[str, Plan, Estimator] | None = None,
) -> str:
    """The Markdown report: spend tables, baseline and savings, recommendations with figures; with `plan`
    (its name, the plan, its estimator) also what that plan will cost and could save."""
    spent = sum(r.cost_usd for r in records)
    baseline = sum(r.baseline_usd for r in records)
    lines = [
        "# batch_engine optimization report",
        "",
        f"Usage log: {len(records)} billed requests over the last {days:g} days.",
        "",
        f"- Spend: **${spent:.4f}**",
        f"- All-realtime, no-cache baseline for the same tokens: ${baseline:.4f}",
        f"- Saved by batching and caching: **${baseline - spent:.4f}**"
        + (f" ({100 * (baseline - spent) / baseline:.1f}%)" if baseline else ""),
        "",
    ]
    for title, key in (("model", "model"), ("route", "route"), ("task type", "task_type")):
        lines += [
            f"## Spend by {title}",
            "",
            f"| {title} | requests | cost | baseline | saved |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, group in sorted(_by(records, functools.partial(_attribute, key)).items()):
            c = sum(r.cost_usd for r in group)
            b = sum(r.baseline_usd for r in group)
            lines.append(f"| {name} | {len(group)} | ${c:.4f} | ${b:.4f} | ${b - c:.4f} |")
        lines.append("")
    found = recommendations(records, config)
    if plan is not None:
        name, planned, estimator = plan
        expected = sum(estimator.cost(t, t.route) for t in planned.tasks)
        lines += [
            "",
            f"## Plan: {name}",
            "",
            f"{len(planned.tasks)} tasks ({len(planned.batch_tasks())} batch, {len(planned.realtime_tasks())} "
            f"realtime), estimated ${expected:.4f} before caching.",
        ]
        found += plan_recommendations(planned, estimator)
    lines += ["", "## Recommendations", ""]
    if not found:
        lines.append("None: no change the usage log supports would save money.")
    for number, rec in enumerate(found, 1):
        lines += [f"{number}. **{rec.title}** — ${rec.usd:.4f}", f"   {rec.detail}"]
    return "\n".join(lines) + "\n"
