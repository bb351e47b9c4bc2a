"""What a plan will do and cost: counts per task type / route / model, batches, estimates vs baseline."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from batch_engine.config import Config, Route
from batch_engine.models import Usage
from batch_engine.planning import Plan, over_context_window
from batch_engine.planning.budget import Estimator, cache_write_of
from batch_engine.planning.params import thinking_warning
from batch_engine.planning.pricing import baseline_cost, estimate_cost

if TYPE_CHECKING:
    from batch_engine.planning.tokens import TokenCounts


_FORM_LABELS = {
    "output_config": "structured outputs (output_config.format)",
    "tool": "forced tool (fallback)",
    "prompt": "schema in the system prompt (fallback)",
}


class PlanSummary(BaseModel):
    """What a plan will do and cost, before anything is sent (`batch-engine plan --json` prints it)."""

    records: int = Field(description="Input records, rejected ones included.")
    tasks: int
    rejected: int
    by_task_type: dict[str, int]
    by_route: dict[Route, int]
    by_model: dict[str, int]
    batches: int = Field(description="Message Batches the batch route will be split into.")
    output_schemas: dict[str, list[str]] = Field(description="Task type → how its output schema is requested.")
    estimated_input_tokens: int = Field(description="The offline estimate.")
    input_tokens_source: str = Field(description="'counted' (messages.count_tokens) or 'offline estimate'.")
    input_tokens: int
    estimate_error_pct: float | None = Field(description="How far the offline estimate was from the count.")
    distinct_prompts_counted: int | None
    note: str | None = Field(description="Why some prompts could not be counted.")
    expected_cost_usd: float = Field(description="Input as counted (or estimated), output from the usage log.")
    output_history_task_types: list[str] = Field(description="Task types whose output comes from the usage log.")
    # Upper bounds: every task is assumed to use its whole max_tokens, and no cache read is counted.
    estimated_cost_usd: float
    baseline_cost_usd: float = Field(description="The same requests all-realtime, with no prompt caching.")
    rejections: list[str]
    warnings: list[str]


def plan_summary(
    plan: Plan, config: Config, estimator: Estimator | None = None, counts: TokenCounts | None = None
) -> PlanSummary:
    """What a plan will do and cost (the `plan` command's output).

    Two cost figures: the upper bound (offline input estimate, every task using all of max_tokens) and the
    expected cost from `estimator` (counted input when asked, output from the usage log's history).
    """
    estimator = estimator or Estimator(config)
    counted_over = over_context_window(plan.tasks, counts.by_index, config) if counts else []
    by_type: Counter[str] = Counter()
    by_route: Counter[Route] = Counter()
    by_model: Counter[str] = Counter()
    outputs: dict[str, set[str]] = {}  # task type → how its schema is requested, per model
    input_tokens = 0
    counted_tokens = 0
    estimate = 0.0
    expected = 0.0
    baseline = 0.0
    for task in plan.tasks:
        by_type[task.task_type] += 1
        by_route[task.route] += 1
        by_model[task.model] += 1
        if task.output is not None:
            outputs.setdefault(task.task_type, set()).add(f"{_FORM_LABELS[task.output.form]} on {task.model}")
        input_tokens += task.estimated_input_tokens
        counted_tokens += estimator.input_tokens(task)
        expected += estimator.cost(task, task.route)
        spec = config.models[task.model]
        max_tokens = int(task.frame.get("max_tokens", 0))
        estimate += estimate_cost(
            task.estimated_input_tokens, max_tokens, spec, task.route, config, cache_write_of(task, spec)
        )
        baseline += baseline_cost(Usage(input_tokens=task.estimated_input_tokens, output_tokens=max_tokens), spec)
    return PlanSummary(
        records=plan.total_records,
        tasks=len(plan.tasks),
        rejected=len(plan.rejections) + len(counted_over),
        by_task_type=dict(sorted(by_type.items())),
        by_route=dict(sorted(by_route.items())),
        by_model=dict(sorted(by_model.items())),
        batches=len(plan.chunks),
        output_schemas={name: sorted(forms) for name, forms in sorted(outputs.items())},
        estimated_input_tokens=input_tokens,
        input_tokens_source="counted" if counts and counts.by_index else "offline estimate",
        input_tokens=counted_tokens,
        estimate_error_pct=round(100 * (input_tokens - counted_tokens) / counted_tokens, 2)
        if counts and counts.by_index and counted_tokens
        else None,
        distinct_prompts_counted=counts.distinct_prompts if counts else None,
        note=counts.note if counts else None,
        expected_cost_usd=round(expected, 6),
        output_history_task_types=sorted({t for t, _ in estimator.output_history}),
        estimated_cost_usd=round(estimate, 6),
        baseline_cost_usd=round(baseline, 6),
        rejections=[
            *(rejection.one_line() for rejection in plan.rejections),
            *(f"task_id {task.task_id}: {field}: {reason}" for task, field, reason in counted_over),
        ],
        warnings=[*plan.warnings, *(f"warning: {line}" for line in plan_warnings(plan, config))],
    )


def plan_warnings(plan: Plan, config: Config) -> list[str]:
    """One line per (task type, model) of the plan whose thinking may leave no answer."""
    warnings: list[str] = []
    seen: set[tuple[str, str]] = set()
    for task in plan.tasks:
        if task.user_text is None or (task.task_type, task.model) in seen:
            continue  # raw params say their own thinking
        seen.add((task.task_type, task.model))
        warning = thinking_warning(
            task.task_type, config.task_types[task.task_type], task.model, config.models[task.model]
        )
        if warning is not None:
            warnings.append(warning)
    return warnings


def render_plan_summary(summary: PlanSummary) -> str:
    """Plain-text rendering for the terminal."""
    lines = [
        f"{summary.records} records: {summary.tasks} tasks, {summary.rejected} rejected",
        "routes:  " + ", ".join(f"{k} {v}" for k, v in summary.by_route.items()),
        "models:  " + ", ".join(f"{k} {v}" for k, v in summary.by_model.items()),
        "types:   " + ", ".join(f"{k} {v}" for k, v in summary.by_task_type.items()),
        f"batches: {summary.batches}",
        *(f"schema:  {name}: {', '.join(forms)}" for name, forms in summary.output_schemas.items()),
        f"estimated input tokens: {summary.estimated_input_tokens:,}",
        f"input tokens ({summary.input_tokens_source}): {summary.input_tokens:,}"
        + (
            f"  (offline estimate off by {summary.estimate_error_pct:+.2f}%)"
            if summary.estimate_error_pct is not None
            else ""
        ),
        f"expected cost: ${summary.expected_cost_usd:.4f}"
        + (
            f"  (output from history for {len(summary.output_history_task_types)} task types)"
            if summary.output_history_task_types
            else "  (output assumed to use all of max_tokens)"
        ),
        f"estimated cost (upper bound): ${summary.estimated_cost_usd:.4f}"
        f"  vs all-realtime no-cache baseline ${summary.baseline_cost_usd:.4f}",
    ]
    if summary.note:
        lines.append(f"note: {summary.note}")
    lines.extend(summary.warnings)
    if summary.rejections:
        lines.append("rejections:")
        lines.extend(f"  {line}" for line in summary.rejections)
    return "\n".join(lines)
