"""Pure: the optimization report's analysis — from the usage log and the config, what each change would save on
the bill (ranked), what it would only free in budget, and what only a trial can price; typed for any renderer.

Every dollar figure is over the period the log covers; `Period.monthly` projects it to a 30-day month at the
log's volume. Savings are measured on the same tokens at list prices (the price table of the config)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

from batch_engine.config import Config, ModelSpec, Route, Thinking, Tier
from batch_engine.models import Usage
from batch_engine.planning import Plan, PlannedTask
from batch_engine.planning.budget import Estimator
from batch_engine.planning.params import system_prefix
from batch_engine.planning.pricing import cost
from batch_engine.state.usage_log import UsageRecord
from batch_engine.telemetry.cache_stats import caching_saved

Scope = Literal["caching", "model", "streaming", "thinking", "batching"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
# `--model` names the family; the config's tiers say which model that is today.
TARGET_TIERS: dict[str, Tier] = {"haiku": "cheap", "sonnet": "capable", "opus": "premium"}
# saving: priced on the bill. budget: frees budget, bills nothing less. trial: only a trial can price it.
# no_bill_change: changes how requests behave, not what they cost.
Kind = Literal["saving", "budget", "trial", "no_bill_change"]
ConfigValue = int | str | bool | Thinking

DAYS_PER_MONTH = 30
SHORT_OUTPUT_TOKENS = 300  # p95 output under this suggests the cheap tier can do the job
# Recommend a lower max_tokens only when today's is at least twice what the observations need: smaller cuts
# free little budget and leave no margin for a longer answer than any seen.
MAX_TOKENS_MARGIN = 2
MAX_TOKENS_STEP = 64  # recommended max_tokens are rounded up to a multiple of this
THINKING_SHARE = 0.5  # thinking at least half of a group's output tokens is worth a trial at lower effort
# A realtime caller waiting longer than this on a non-streamed reply sees nothing at all until the end, and idle
# HTTP connections are commonly cut at 60 s by proxies and load balancers; streaming keeps bytes flowing.
STREAM_LATENCY_S = 60.0
EFFORTS = ("low", "medium", "high", "xhigh", "max")
_PER_TOKEN = 1e-6
K = TypeVar("K", str, tuple[str, str])


@dataclass(frozen=True, slots=True)
class Period:
    """What the log covers: from its first request to `now`, in whole days (at least one)."""

    first_at: float
    now: float
    days: int

    @property
    def monthly_factor(self) -> float:
        return DAYS_PER_MONTH / self.days

    def monthly(self, usd: float) -> float:
        """`usd` over the period, projected to a 30-day month at the same volume."""
        return usd * self.monthly_factor


def period_of(records: Sequence[UsageRecord], now: float) -> Period:
    """The period of `records` as of `now` (epoch seconds)."""
    first = min((r.at for r in records), default=now)
    return Period(first, now, max(1, math.ceil((now - first) / 86_400)))


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """One key of one `[task_types.<name>]` table of the config, from its current value to the recommended one."""

    task_type: str
    key: str
    old: ConfigValue
    new: ConfigValue


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One change, with today's figure and what the change does to it (dollars over the period analysed)."""

    scope: Scope
    kind: Kind
    task_type: str
    model: str | None  # the model of the requests it concerns; None when they ran on several
    title: str
    reason: str  # why, in one clause (the comment of a written config line)
    current: str  # today's figure, in words
    change: str  # the recommended change, in words
    detail: str  # why, with the numbers behind it
    requests: int  # requests of the period it concerns
    before_usd: float  # what those requests cost
    after_usd: float  # what they would have cost with the change (== before_usd unless kind == "saving")
    at_stake_usd: float  # trial: the spend a trial could cut (the thinking cost); otherwise 0
    config_change: ConfigChange | None  # None when no config key expresses it

    @property
    def saved_usd(self) -> float:
        return self.before_usd - self.after_usd


@dataclass(frozen=True, slots=True)
class MaxTokensFinding:
    """What one task type's requests on one model needed of max_tokens: visible output and thinking apart."""

    task_type: str
    model: str
    requests: int
    max_tokens: int  # the largest max_tokens its requests were sent with
    visible_p99: int  # output_tokens - thinking_tokens
    thinking_p99: int
    thinking_max: int
    thinking_floor: int  # what thinking needs: its largest observation, or the manual budget when larger
    truncated: int  # requests whose output reached max_tokens
    recommended: int  # MAX_TOKENS_MARGIN x (visible p99 + thinking floor), rounded up; never above max_tokens


@dataclass(frozen=True, slots=True)
class TierCost:
    """One task type's requests on one model: what they cost, and the same tokens on the target model."""

    task_type: str
    model: str
    requests: int
    cost_usd: float
    on_target_usd: float
    output_p95: int


@dataclass(frozen=True, slots=True)
class Section:
    """One scope: today's figure in words, and its recommendations."""

    scope: Scope
    current: str
    recommendations: tuple[Recommendation, ...]


@dataclass(frozen=True, slots=True)
class SpendRow:
    name: str
    requests: int
    cost_usd: float
    baseline_usd: float


@dataclass(frozen=True, slots=True)
class OptimizationReport:
    """Everything the report says, as data: renderers (Markdown, HTML) only lay it out."""

    period: Period
    requests: int
    spend_usd: float
    baseline_usd: float  # the same tokens all realtime, no caching
    scopes: tuple[Scope, ...]
    target_model: str  # the model the model scope compares against
    sections: tuple[Section, ...]
    tier_costs: tuple[TierCost, ...]
    max_tokens: tuple[MaxTokensFinding, ...]
    spend_by: dict[str, tuple[SpendRow, ...]]  # "model", "route", "task type", "status"
    combined_after_usd: float  # the period's spend with every saving applied together

    def _of(self, kind: Kind) -> list[Recommendation]:
        return [r for s in self.sections for r in s.recommendations if r.kind == kind]

    @property
    def savings(self) -> list[Recommendation]:
        """Changes that lower the bill, most money saved first."""
        return sorted((r for r in self._of("saving") if r.saved_usd > 0), key=lambda r: (-r.saved_usd, r.title))

    @property
    def budget(self) -> list[Recommendation]:
        return self._of("budget")

    @property
    def trials(self) -> list[Recommendation]:
        return sorted(self._of("trial"), key=lambda r: (-r.at_stake_usd, r.title))

    @property
    def no_bill_change(self) -> list[Recommendation]:
        return self._of("no_bill_change")

    @property
    def config_changes(self) -> list[Recommendation]:
        """The recommendations a config key expresses, one per key (the first in report order wins). A task type
        that moves to another tier keeps its max_tokens: how much the new model thinks has not been observed."""
        seen: set[tuple[str, str]] = set()
        out = []
        for rec in [*self.savings, *self.budget, *self.trials, *self.no_bill_change]:
            change = rec.config_change
            if change is not None and (change.task_type, change.key) not in seen:
                seen.add((change.task_type, change.key))
                out.append(rec)
        moved = {r.task_type for r in out if r.config_change is not None and r.config_change.key == "tier"}
        return [r for r in out if not (r.kind == "budget" and r.task_type in moved)]


def usd(amount: float) -> str:
    """Dollars: cents above a dollar, four decimals below (a test run's figures are fractions of a cent)."""
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    return f"{sign}${amount:,.2f}" if amount >= 1 else f"{sign}${amount:.4f}"


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


def _discount(route: str, config: Config) -> float:
    return config.batch_discount if route == "batch" else 1.0


def _quantile(values: Sequence[int | float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def _by(records: Sequence[UsageRecord], key: Callable[[UsageRecord], K]) -> dict[K, list[UsageRecord]]:
    groups: dict[K, list[UsageRecord]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return dict(groups)


def _spent(records: Sequence[UsageRecord]) -> float:
    return sum(r.cost_usd for r in records)


def visible_output(record: UsageRecord) -> int:
    """Output tokens of the answer itself: the API bills thinking inside output_tokens and reports it apart in
    output_tokens_details.thinking_tokens (the usage log's thinking_tokens)."""
    return max(0, record.output_tokens - record.thinking_tokens)


def thinking_cost(record: UsageRecord, config: Config) -> float:
    """What the request's thinking cost: thinking tokens are billed as output, at the route's price."""
    spec = config.models.get(record.model)
    if spec is None:
        return 0.0
    price = spec.price_for_prompt(record.prompt_tokens).output
    return record.thinking_tokens * price * _PER_TOKEN * _discount(record.route, config)


def analyze(
    records: Sequence[UsageRecord],
    config: Config,
    now: float,
    scopes: Sequence[Scope] = SCOPES,
    target: str | None = None,
) -> OptimizationReport:
    """The report of `records` as of `now`: the sections of `scopes`; `target` ("haiku", "sonnet", "opus") is
    the tier the model scope prices the workload on (default: the cheap tier)."""
    target_tier: Tier = TARGET_TIERS[target] if target else "cheap"
    target_model = config.tiers[target_tier]
    period = period_of(records, now)
    tier_costs = _tier_costs(records, config, target_model)
    max_tokens = _max_tokens_findings(records, config)
    builders: dict[Scope, Callable[[], Section]] = {
        "caching": lambda: _caching(records, config, period),
        "model": lambda: _model(records, config, period, tier_costs, target_tier, explicit=target is not None),
        "streaming": lambda: _streaming(records, config),
        "thinking": lambda: _thinking(records, config, period, max_tokens),
        "batching": lambda: _batching(records, config, period),
    }
    sections = tuple(builders[scope]() for scope in SCOPES if scope in scopes)
    savings = [r for s in sections for r in s.recommendations if r.kind == "saving" and r.saved_usd > 0]
    invalid = [r for r in records if r.status == "invalid_output"]
    return OptimizationReport(
        period=period,
        requests=len(records),
        spend_usd=_spent(records),
        baseline_usd=sum(r.baseline_usd for r in records),
        scopes=tuple(scope for scope in SCOPES if scope in scopes),
        target_model=target_model,
        sections=sections,
        tier_costs=tier_costs if "model" in scopes else (),
        max_tokens=max_tokens if "thinking" in scopes else (),
        spend_by={
            "model": _spend_rows(records, lambda r: r.model),
            "route": _spend_rows(records, lambda r: r.route),
            "task type": _spend_rows(records, lambda r: r.task_type),
            # Billed answers that did not validate against their output schema (asked again, or lost).
            **({INVALID_OUTPUTS: _spend_rows(invalid, lambda r: r.task_type)} if invalid else {}),
            # Refused and incomplete answers are billed too, though they did not do the task (issue #15).
            "status": _spend_rows(records, lambda r: r.status),
        },
        combined_after_usd=_combined_after(records, config, savings, target_model),
    )


INVALID_OUTPUTS = "task type, answers that did not match their output schema (invalid_output)"


def _spend_rows(records: Sequence[UsageRecord], key: Callable[[UsageRecord], str]) -> tuple[SpendRow, ...]:
    return tuple(
        SpendRow(name, len(group), _spent(group), sum(r.baseline_usd for r in group))
        for name, group in sorted(_by(records, key).items())
    )


# --- batching ----------------------------------------------------------------------------------------------


def _realtime_by_default(record: UsageRecord) -> bool:
    # Realtime only because of the task type's default (no deadline, no max_latency, no explicit mode).
    return record.route == "realtime" and record.route_reason.startswith("task type ")


def _batching(records: Sequence[UsageRecord], config: Config, period: Period) -> Section:
    realtime = [r for r in records if r.route == "realtime"]
    by_default = [r for r in realtime if _realtime_by_default(r)]
    current = (
        f"{len(records) - len(realtime)} of {len(records)} requests went through Message Batches; "
        f"{len(realtime)} went realtime ({usd(period.monthly(_spent(realtime)))}/month), "
        f"{len(by_default)} of them only because their task type defaults to realtime."
    )
    out = []
    for task_type, group in sorted(_by(by_default, lambda r: r.task_type).items()):
        spent = _spent(group)
        task = config.task_types.get(task_type)
        out.append(
            Recommendation(
                scope="batching",
                kind="saving",
                task_type=task_type,
                model=_one_model(group),
                title=f"Send `{task_type}` through Message Batches",
                reason="realtime only because the task type defaults to realtime",
                current=f"{len(group)} realtime requests, ${spent:.4f}",
                change='mode = "batch" (results within 24 h instead of seconds)',
                detail=f"its requests went realtime only because the task type defaults to realtime (no deadline "
                f"asked for it); Message Batches bill every token at {config.batch_discount:.0%} of the realtime "
                "price. Only if its callers can wait up to 24 h.",
                requests=len(group),
                before_usd=spent,
                after_usd=spent * config.batch_discount,
                at_stake_usd=0.0,
                config_change=ConfigChange(task_type, "mode", task.mode, "batch") if task else None,
            )
        )
    return Section("batching", current, tuple(out))


# --- model -------------------------------------------------------------------------------------------------


def _tier_costs(records: Sequence[UsageRecord], config: Config, target_model: str) -> tuple[TierCost, ...]:
    target = config.models[target_model]
    out = []
    for (task_type, model), group in sorted(_by(records, lambda r: (r.task_type, r.model)).items()):
        on_target = sum(cost(_usage(r), target, _route(r), config.batch_discount) for r in group)
        p95 = int(_quantile([r.output_tokens for r in group], 0.95))
        out.append(TierCost(task_type, model, len(group), _spent(group), on_target, p95))
    return tuple(out)


def _model(
    records: Sequence[UsageRecord],
    config: Config,
    period: Period,
    tier_costs: Sequence[TierCost],
    target_tier: Tier,
    explicit: bool,
) -> Section:
    target_model = config.tiers[target_tier]
    spend = ", ".join(
        f"{m}: {usd(period.monthly(_spent(g)))}" for m, g in sorted(_by(records, lambda r: r.model).items())
    )
    on_target = sum(row.on_target_usd for row in tier_costs)
    current = f"spend by model per month: {spend or 'none'}." + (
        f" The whole workload on {target_model} (the {target_tier} tier), same tokens: "
        f"{usd(period.monthly(_spent(records)))} → {usd(period.monthly(on_target))} per month."
        if explicit
        else ""
    )
    out = []
    for row in tier_costs:
        if row.model == target_model or row.on_target_usd >= row.cost_usd or row.output_p95 >= SHORT_OUTPUT_TOKENS:
            continue
        task = config.task_types.get(row.task_type)
        out.append(
            Recommendation(
                scope="model",
                kind="saving",
                task_type=row.task_type,
                model=row.model,
                title=f"Try the {target_tier} tier for `{row.task_type}`",
                reason=f"its outputs are short (p95 {row.output_p95} tokens) and {target_model} costs less",
                current=f"{row.requests} {row.model} requests, ${row.cost_usd:.4f}",
                change=f'tier = "{target_tier}" ({target_model})',
                detail=f"its outputs are short (p95 {row.output_p95} tokens, under {SHORT_OUTPUT_TOKENS}); the same "
                f"tokens on {target_model} cost ${row.on_target_usd:.4f} instead of ${row.cost_usd:.4f}. Check "
                "quality on a sample before switching.",
                requests=row.requests,
                before_usd=row.cost_usd,
                after_usd=row.on_target_usd,
                at_stake_usd=0.0,
                config_change=ConfigChange(row.task_type, "tier", task.tier, target_tier) if task else None,
            )
        )
    return Section("model", current, tuple(out))


# --- caching -----------------------------------------------------------------------------------------------


def _caching(records: Sequence[UsageRecord], config: Config, period: Period) -> Section:
    read = sum(r.cache_read_tokens for r in records)
    prompt = sum(r.prompt_tokens for r in records)
    saved = sum(
        caching_saved(r, config.models[r.model], config.batch_discount) for r in records if r.model in config.models
    )
    current = (
        f"cache hit rate {read / prompt if prompt else 0:.1%} by input tokens; caching saves "
        f"{usd(period.monthly(saved))}/month net of the write premium."
    )
    # Per run and task type: one task type can share its prefix with another that does mark it for caching.
    groups = _by([r for r in records if r.prefix_key], lambda r: f"{r.run_key}\x00{r.task_type}\x00{r.prefix_key}")
    missing: dict[str, list[tuple[list[UsageRecord], float]]] = defaultdict(list)
    wrong_ttl: dict[str, list[tuple[list[UsageRecord], float]]] = defaultdict(list)
    for group in groups.values():
        first = group[0]
        spec = config.models.get(first.model)
        if spec is None or len(group) < 2 or first.prefix_tokens < spec.min_cacheable_tokens:
            continue
        discount = _discount(first.route, config)
        if first.cache_ttl is None:
            missing[first.task_type].append(
                (group, _cache_gain(spec, first.prefix_tokens, len(group), "5m") * discount)
            )
        elif first.route == "batch" and first.cache_ttl == "5m" and sum(1 for r in group if r.cache_write_tokens) > 1:
            now = sum(caching_saved(r, spec, config.batch_discount) for r in group)
            gain = _cache_gain(spec, first.prefix_tokens, len(group), "1h") * discount - now
            wrong_ttl[first.task_type].append((group, gain))
    out = []
    for task_type, found in sorted(missing.items()):
        concerned = [r for group, _ in found for r in group]
        gain = sum(usd for _, usd in found)
        task = config.task_types.get(task_type)
        out.append(
            Recommendation(
                scope="caching",
                kind="saving",
                task_type=task_type,
                model=_one_model(concerned),
                title=f"Cache the system prompt of `{task_type}`",
                reason="a repeated system prompt above the cache minimum is sent uncached",
                current=f"{len(concerned)} requests repeat a system prompt above the model's cache minimum, uncached",
                change="cache_system = true (a cache breakpoint on the system prompt)",
                detail="one cache write per run (1.25x the input price) and cache reads after it instead of the full "
                f"input price each time would have saved ${gain:.4f} net of the write premium.",
                requests=len(concerned),
                before_usd=_spent(concerned),
                after_usd=_spent(concerned) - gain,
                at_stake_usd=0.0,
                config_change=ConfigChange(task_type, "cache_system", False, True)
                if task is not None and not task.cache_system
                else None,
            )
        )
    for task_type, found in sorted(wrong_ttl.items()):
        concerned = [r for group, _ in found for r in group]
        gain = sum(usd for _, usd in found)
        out.append(
            Recommendation(
                scope="caching",
                kind="saving",
                task_type=task_type,
                model=_one_model(concerned),
                title=f"Use the 1 h cache TTL for `{task_type}` batches",
                reason="batches rewrote 5-minute cache entries",
                current=f"{len(concerned)} batch requests wrote 5-minute cache entries again and again",
                change='"ttl": "1h" on the cache_control of the params these tasks send',
                detail=f"batches outlast a 5-minute entry; one 1 h write and reads after it would have saved "
                f"${gain:.4f}. The engine uses 1 h on the batch path itself: these tasks send their own params.",
                requests=len(concerned),
                before_usd=_spent(concerned),
                after_usd=_spent(concerned) - gain,
                at_stake_usd=0.0,
                config_change=None,
            )
        )
    return Section("caching", current, tuple(out))


def _cache_gain(spec: ModelSpec, prefix_tokens: int, requests: int, ttl: str) -> float:
    """Saving of one cache write then `requests - 1` reads of a prefix, against sending it uncached each time."""
    price = spec.price
    write = price.cache_write_1h if ttl == "1h" else price.cache_write_5m
    uncached = requests * prefix_tokens * price.input
    cached = prefix_tokens * write + (requests - 1) * prefix_tokens * price.cache_read
    return (uncached - cached) * _PER_TOKEN


# --- thinking and max_tokens -------------------------------------------------------------------------------


def _manual_budget(record: UsageRecord) -> int:
    label = record.thinking or ""
    return int(label.split(":", 1)[1]) if label.startswith("manual:") and label[7:].isdigit() else 0


def _max_tokens_findings(records: Sequence[UsageRecord], config: Config) -> tuple[MaxTokensFinding, ...]:
    out = []
    for (task_type, model), group in sorted(_by(records, lambda r: (r.task_type, r.model)).items()):
        max_tokens = max(r.max_tokens for r in group)
        visible = int(_quantile([visible_output(r) for r in group], 0.99))
        thinking = [r.thinking_tokens for r in group]
        # Thinking counts toward max_tokens: what it used (or may use, under a manual budget) must stay available.
        floor = max(max(thinking), max(_manual_budget(r) for r in group))
        needed = MAX_TOKENS_MARGIN * (visible + floor)
        recommended = min(max_tokens, MAX_TOKENS_STEP * math.ceil(needed / MAX_TOKENS_STEP))
        out.append(
            MaxTokensFinding(
                task_type=task_type,
                model=model,
                requests=len(group),
                max_tokens=max_tokens,
                visible_p99=visible,
                thinking_p99=int(_quantile(thinking, 0.99)),
                thinking_max=max(thinking),
                thinking_floor=floor,
                truncated=sum(1 for r in group if r.max_tokens and r.output_tokens >= r.max_tokens),
                recommended=recommended,
            )
        )
    return tuple(out)


def _max_tokens_advice(findings: Sequence[MaxTokensFinding], config: Config) -> list[Recommendation]:
    out = []
    for task_type, rows in sorted(_group_findings(findings).items()):
        task = config.task_types.get(task_type)
        current = task.max_tokens if task else max(f.max_tokens for f in rows)
        # One max_tokens per task type: the largest any of its models needs.
        top = max(rows, key=lambda f: f.recommended)
        recommended = top.recommended
        budget = task.thinking.budget_tokens if task and task.thinking.mode == "manual" else None
        if any(f.truncated for f in rows) or MAX_TOKENS_MARGIN * recommended > current:
            continue
        if budget is not None and recommended <= budget:
            continue  # the config's thinking budget must stay below max_tokens
        per_model = "; ".join(
            f"{f.model}: visible output p99 {f.visible_p99}, thinking p99 {f.thinking_p99} (max {f.thinking_max}"
            + (f", manual budget {f.thinking_floor}" if f.thinking_floor > f.thinking_max else "")
            + f") → {f.recommended}"
            for f in rows
        )
        out.append(
            Recommendation(
                scope="thinking",
                kind="budget",
                task_type=task_type,
                model=rows[0].model if len(rows) == 1 else None,
                title=f"Lower `max_tokens` for `{task_type}`",
                reason=f"needs at most visible output p99 {top.visible_p99} + thinking {top.thinking_floor} "
                f"({top.model}), x {MAX_TOKENS_MARGIN}",
                current=f"max_tokens = {current}; the most any model needed: visible output p99 {top.visible_p99} "
                f"+ thinking {top.thinking_floor} ({top.model})",
                change=f"max_tokens = {recommended}",
                detail=f"{per_model}. Recommended = {MAX_TOKENS_MARGIN} x (visible output p99 + the most thinking "
                f"seen), rounded up to a multiple of {MAX_TOKENS_STEP}, since thinking counts toward max_tokens; "
                "observed on these models, so re-check after a tier change. Unused max_tokens is not billed: this "
                "frees budget reservations and pre-flight estimates, not spend.",
                requests=sum(f.requests for f in rows),
                before_usd=0.0,
                after_usd=0.0,
                at_stake_usd=0.0,
                config_change=ConfigChange(task_type, "max_tokens", current, recommended) if task else None,
            )
        )
    return out


def _group_findings(findings: Sequence[MaxTokensFinding]) -> dict[str, list[MaxTokensFinding]]:
    groups: dict[str, list[MaxTokensFinding]] = defaultdict(list)
    for finding in findings:
        groups[finding.task_type].append(finding)
    return dict(groups)


def _lower_thinking(thinking: Thinking) -> Thinking | None:
    """One effort step down, or adaptive at low effort for a model that thinks by default; None at the bottom."""
    if thinking.mode == "off":
        return Thinking(mode="adaptive", effort="low")
    if thinking.mode == "adaptive":
        effort = thinking.effort or "high"
        if effort == "low":
            return None
        return Thinking(mode="adaptive", effort=EFFORTS[EFFORTS.index(effort) - 1])
    return None


def _thinking_text(thinking: Thinking) -> str:
    if thinking.mode == "adaptive":
        return f"adaptive, effort {thinking.effort or 'the model default'}"
    if thinking.mode == "manual":
        return f"manual, budget {thinking.budget_tokens}"
    return "not set (the model thinks by default)"


def _thinking(
    records: Sequence[UsageRecord], config: Config, period: Period, findings: Sequence[MaxTokensFinding]
) -> Section:
    thought = sum(r.thinking_tokens for r in records)
    output = sum(r.output_tokens for r in records)
    spent = sum(thinking_cost(r, config) for r in records)
    current = (
        f"thinking is {thought:,} of {output:,} output tokens ({thought / output if output else 0:.0%}) and costs "
        f"{usd(period.monthly(spent))}/month."
    )
    out = []
    thinking = [r for r in records if r.thinking_tokens and r.model in config.models]
    for task_type, group in sorted(_by(thinking, lambda r: r.task_type).items()):
        group_thought = sum(r.thinking_tokens for r in group)
        group_output = sum(r.output_tokens for r in group)
        task = config.task_types.get(task_type)
        lower = _lower_thinking(task.thinking) if task else None
        if task is None or lower is None or group_thought / group_output < THINKING_SHARE:
            continue
        at_stake = sum(thinking_cost(r, config) for r in group)
        out.append(
            Recommendation(
                scope="thinking",
                kind="trial",
                task_type=task_type,
                model=_one_model(group),
                title=f"Try less thinking for `{task_type}`",
                reason=f"thinking is {group_thought / group_output:.0%} of its output tokens",
                current=f"thinking {_thinking_text(task.thinking)}: {group_thought / group_output:.0%} of its "
                f"output tokens, {usd(at_stake)}",
                change=f"thinking {_thinking_text(lower)}",
                detail="how much less a lower effort thinks cannot be read from the log; try it on a sample and "
                "compare quality and thinking tokens.",
                requests=len(group),
                before_usd=_spent(group),
                after_usd=_spent(group),
                at_stake_usd=at_stake,
                config_change=ConfigChange(task_type, "thinking", task.thinking, lower),
            )
        )
    return Section("thinking", current, (*out, *_max_tokens_advice(findings, config)))


# --- streaming ---------------------------------------------------------------------------------------------


def _streaming(records: Sequence[UsageRecord], config: Config) -> Section:
    timed = [r for r in records if r.route == "realtime" and r.latency_s is not None]
    streamed = {name for name, task in config.task_types.items() if task.stream}
    p95 = _quantile([r.latency_s or 0.0 for r in timed], 0.95)
    current = (
        f"{len(timed)} realtime requests, {sum(1 for r in timed if r.task_type in streamed)} of them of task types "
        f"with stream = true; p95 latency {p95:.1f} s. Streaming does not change the price of a token."
    )
    out = []
    for task_type, group in sorted(_by(timed, lambda r: r.task_type).items()):
        task = config.task_types.get(task_type)
        latency = _quantile([r.latency_s or 0.0 for r in group], 0.95)
        if task is None or task.stream or latency < STREAM_LATENCY_S:
            continue
        out.append(
            Recommendation(
                scope="streaming",
                kind="no_bill_change",
                task_type=task_type,
                model=_one_model(group),
                title=f"Stream `{task_type}`",
                reason=f"realtime p95 latency {latency:.0f} s, not streamed",
                current=f"{len(group)} realtime requests, not streamed, p95 latency {latency:.0f} s",
                change="stream = true",
                detail=f"a reply that takes over {STREAM_LATENCY_S:.0f} s arrives all at once at the end, and an idle "
                "connection that long is often cut by a proxy (the request is billed, the answer lost); streamed, "
                "bytes flow from the first token. Same price.",
                requests=len(group),
                before_usd=_spent(group),
                after_usd=_spent(group),
                at_stake_usd=0.0,
                config_change=ConfigChange(task_type, "stream", False, True),
            )
        )
    return Section("streaming", current, tuple(out))


# --- all savings together ----------------------------------------------------------------------------------


def _combined_after(
    records: Sequence[UsageRecord], config: Config, savings: Sequence[Recommendation], target_model: str
) -> float:
    """The period's spend with every saving applied at once: each request repriced on its recommended model and
    route; cache savings scaled to the input price of the model and route the request ends on."""
    to_batch = {r.task_type for r in savings if r.scope == "batching"}
    to_target = {(r.task_type, r.model) for r in savings if r.scope == "model"}
    total = 0.0
    scale: dict[str, float] = {}
    for record in records:
        model = target_model if (record.task_type, record.model) in to_target else record.model
        route: Route = "batch" if record.task_type in to_batch and _realtime_by_default(record) else _route(record)
        spec, old = config.models.get(model), config.models.get(record.model)
        if spec is None or old is None or (model == record.model and route == record.route):
            total += record.cost_usd
            continue
        total += cost(_usage(record), spec, route, config.batch_discount)
        scale[record.task_type] = (spec.price.input * _discount(route, config)) / (
            old.price.input * _discount(record.route, config)
        )
    for rec in savings:
        if rec.scope == "caching":
            total -= rec.saved_usd * scale.get(rec.task_type, 1.0)
    return total


def plan_recommendations(plan: Plan, estimator: Estimator) -> list[Recommendation]:
    """What a plan could save before it runs, from the same estimates the budget uses (dollars for the plan)."""
    config = estimator.config
    found: list[Recommendation] = []
    by_default = [t for t in plan.tasks if t.route == "realtime" and t.route_reason.startswith("task type ")]
    for task_type, group in sorted(_by_task_type(by_default).items()):
        realtime = sum(estimator.cost(t, "realtime") for t in group)
        batch = sum(estimator.cost(t, "batch") for t in group)
        found.append(
            Recommendation(
                scope="batching",
                kind="saving",
                task_type=task_type,
                model=_one_model_of_tasks(group),
                title=f"Plan: send `{task_type}` through Message Batches",
                reason="realtime only because the task type defaults to realtime",
                current=f"{len(group)} tasks realtime by the task type's default, estimated ${realtime:.4f}",
                change='mode = "batch"',
                detail=f"{len(group)} tasks of this plan go realtime only by the task type's default; estimated "
                f"${realtime:.4f} realtime vs ${batch:.4f} as batch rows.",
                requests=len(group),
                before_usd=realtime,
                after_usd=batch,
                at_stake_usd=0.0,
                config_change=None,
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
        usd = _cache_gain(spec, tokens, len(group), "1h" if first.route == "batch" else "5m")
        usd *= _discount(first.route, config)
        before = sum(estimator.cost(t, t.route) for t in group)
        found.append(
            Recommendation(
                scope="caching",
                kind="saving",
                task_type=first.task_type,
                model=_one_model_of_tasks(group),
                title=f"Plan: cache the system prompt of `{first.task_type}`",
                reason="a repeated system prompt is sent with no cache breakpoint",
                current=f"{len(group)} tasks share a ~{tokens}-token system prompt with no cache breakpoint",
                change="cache_system = true",
                detail=f"{len(group)} tasks share a ~{tokens}-token system prompt with no cache breakpoint.",
                requests=len(group),
                before_usd=before,
                after_usd=before - usd,
                at_stake_usd=0.0,
                config_change=None,
            )
        )
    return sorted((r for r in found if r.saved_usd > 0), key=lambda r: -r.saved_usd)


def _by_task_type(tasks: Sequence[PlannedTask]) -> dict[str, list[PlannedTask]]:
    groups: dict[str, list[PlannedTask]] = defaultdict(list)
    for task in tasks:
        groups[task.task_type].append(task)
    return dict(groups)


def _one_model(records: Sequence[UsageRecord]) -> str | None:
    models = {r.model for r in records}
    return models.pop() if len(models) == 1 else None


def _one_model_of_tasks(tasks: Sequence[PlannedTask]) -> str | None:
    models = {t.model for t in tasks}
    return models.pop() if len(models) == 1 else None
