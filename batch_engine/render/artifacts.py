"""Pure: what a run looks like in the Prefect UI — the flow run's final state message, the Markdown run summary
and the table by task type, route and model — built from the run summary and the output rows. No Prefect, no IO.

Artifact keys are stable (the same for every run) so the UI can show one run next to the previous ones. The
summary and the table use the same definitions: `failed` excludes `rejected` (records that never became a
task), and input tokens are the uncached ones, with cache reads and writes in columns of their own.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batch_engine.models import RunSummary, TaskResult

SUMMARY_KEY = "batch-orchestrator-summary"
TABLE_KEY = "batch-orchestrator-by-task-type"

NOT_SENT = "not sent"  # the route column of rows that never reached a lane (rejected records)
# The task type or model of a record rejected before it had one. Not "-": the UI's table renders that as a bullet.
NONE = "(none)"
_MAX_REASON_CHARS = 160
_MAX_EXAMPLES = 3
MAX_REASONS = 10  # failure reasons listed in the summary; the rest are counted in one line
# "line 6 (task_id t5): " / "record 3: " in front of a rejection: where, not why, so not part of the reason.
_WHERE = re.compile(r"^(?P<where>(?:line|record) \d+)(?: \(task_id [^)]*\))?: ")


@dataclass
class _Group:
    tasks: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: _Group) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True, slots=True)
class FailureReason:
    """Rows that did not succeed sharing a status, an error type and a message: how many, and a few examples."""

    status: str
    error_type: str
    message: str
    count: int
    examples: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelCost:
    model: str
    tasks: int
    cost_usd: float


@dataclass
class RunBreakdown:
    """One pass over the output rows: totals per (task type, route, model) and failures grouped by reason."""

    groups: dict[tuple[str, str, str], _Group] = field(default_factory=dict)
    _failures: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _examples: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Iterable[TaskResult]) -> RunBreakdown:
        breakdown = cls()
        for row in rows:
            breakdown.add(row.model_dump(mode="json"))
        return breakdown

    def add(self, row: Mapping[str, Any]) -> None:
        """Count one output row, as the output file holds it (decoded JSON): `Run.finish` hands each row here on
        its one pass over the ledger, so the artifacts cost no pass of their own."""
        key = (row.get("task_type") or NONE, row.get("route") or NOT_SENT, row.get("model") or NONE)
        group = self.groups.setdefault(key, _Group())
        group.tasks += 1
        status = row["status"]
        if status == "succeeded":
            group.succeeded += 1
        else:
            if status == "rejected":
                group.rejected += 1
            else:
                group.failed += 1
            self._add_failure(row)
        usage = row.get("usage")
        if usage is not None:
            group.input_tokens += usage.get("input_tokens", 0)
            group.cache_read_tokens += usage.get("cache_read_input_tokens", 0)
            group.cache_write_tokens += usage.get("cache_creation_input_tokens", 0)
            group.output_tokens += usage.get("output_tokens", 0)
        group.cost_usd += row.get("cost_usd") or 0.0

    def _add_failure(self, row: Mapping[str, Any]) -> None:
        error = row.get("error")
        status = row["status"]
        message = _one_line((error.get("message") or "") if error else "")
        where = _WHERE.match(message)
        if where:
            message = message[where.end() :]
        reason = (status, error["type"] if error else status, message)
        self._failures[reason] += 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            example = " ".join(part for part in (row.get("task_id"), where and f"({where['where']})") if part)
            examples.append(example or f"(record {row['index']})")

    def total(self) -> _Group:
        total = _Group()
        for group in self.groups.values():
            total.add(group)
        return total

    def table(self) -> list[dict[str, str]]:
        """The table artifact: one row per (task type, route, model), sorted; figures formatted, no total row."""
        return [_table_row(key, group) for key, group in sorted(self.groups.items())]

    def table_description(self) -> str:
        """The table artifact's description: what a row is, and the totals (kept out of the rows)."""
        total = self.total()
        return (
            "Tasks, tokens and cost by task type, route and model. Total: "
            f"{total.tasks:,} tasks · {total.succeeded:,} succeeded · {total.failed:,} failed · "
            f"{total.rejected:,} rejected · input {total.input_tokens:,} · cache read {total.cache_read_tokens:,} · "
            f"cache write {total.cache_write_tokens:,} · output {total.output_tokens:,} tokens · "
            f"{_usd(total.cost_usd)}"
        )

    def cost_by_model(self) -> list[ModelCost]:
        """Tasks and cost per model, most expensive first; rejected records (no model) are left out."""
        tasks: Counter[str] = Counter()
        cost: dict[str, float] = {}
        for (_, _, model), group in self.groups.items():
            if model == NONE:
                continue
            tasks[model] += group.tasks
            cost[model] = cost.get(model, 0.0) + group.cost_usd
        return sorted((ModelCost(m, tasks[m], cost[m]) for m in tasks), key=lambda m: (-m.cost_usd, m.model))

    def failures(self) -> list[FailureReason]:
        """Failure reasons, most frequent first."""
        ranked = sorted(self._failures.items(), key=lambda item: (-item[1], item[0]))
        return [FailureReason(*reason, count, tuple(self._examples.get(reason, ()))) for reason, count in ranked]


def _table_row(key: tuple[str, str, str], group: _Group) -> dict[str, str]:
    task_type, route, model = key
    return {
        "task type": task_type,
        "route": route,
        "model": model,
        "tasks": f"{group.tasks:,}",
        "succeeded": f"{group.succeeded:,}",
        "failed": f"{group.failed:,}",
        "rejected": f"{group.rejected:,}",
        "input tokens": f"{group.input_tokens:,}",
        "cache read": f"{group.cache_read_tokens:,}",
        "cache write": f"{group.cache_write_tokens:,}",
        "output tokens": f"{group.output_tokens:,}",
        "cost": _usd(group.cost_usd),
    }


def _usd(amount: float) -> str:
    return f"${amount:,.4f}"


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_REASON_CHARS else line[: _MAX_REASON_CHARS - 1] + "…"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: `<record>` stays visible (not taken for HTML), `|` does not end the cell."""
    return html.escape(text, quote=False).replace("|", "\\|")


def outcome_message(summary: RunSummary) -> str:
    """The run's outcome in one line, for the flow run's final state: counts, cost and savings."""
    counts, cost = summary.counts, summary.cost
    return (
        f"{counts.succeeded:,} succeeded, {counts.failed:,} failed, {counts.rejected:,} rejected "
        f"of {counts.total:,} tasks; cost {_usd(cost.total_usd)}, saved {cost.savings_pct:.1f}% "
        "against all-realtime without caching"
    )


def summary_headline(summary: RunSummary) -> str:
    """The summary artifact's description, the line shown on its card: tasks, failed, cost, saved."""
    counts, cost = summary.counts, summary.cost
    simulated = " · SIMULATED" if summary.simulated else ""
    return (
        f"{counts.total:,} tasks · {counts.failed:,} failed · {counts.rejected:,} rejected · "
        f"{_usd(cost.total_usd)} · saved {cost.savings_pct:.1f}%{simulated}"
    )


def summary_markdown(summary: RunSummary, breakdown: RunBreakdown) -> str:
    """The Markdown run summary: counts, cost vs baseline, savings, cost by model, cache, batches, failures."""
    counts, cost, tokens = summary.counts, summary.cost, summary.tokens
    routes = ", ".join(f"{route} {n:,}" for route, n in counts.by_route.items()) or "none"
    durations = ", ".join(f"{lane} {seconds:.1f} s" for lane, seconds in summary.durations_s.items())
    lines = [f"# batch-orchestrator run `{summary.run_key}`", ""]
    if summary.simulated:
        lines += ["**SIMULATED** against the built-in emulator: no request reached Anthropic, nothing was billed.", ""]
    lines += [
        "| figure | value |",
        "|---|---|",
        f"| input | `{_cell(summary.input_path)}` |",
        f"| output | `{_cell(summary.output_path)}` |",
        f"| tasks | {counts.total:,}: {counts.succeeded:,} succeeded, {counts.failed:,} failed, "
        f"{counts.rejected:,} rejected |",
        f"| routes | {routes} |",
        f"| cost | {_usd(cost.total_usd)} |",
        f"| all-realtime no-cache baseline | {_usd(cost.baseline_usd)} |",
        f"| savings | {_usd(cost.savings_usd)} ({cost.savings_pct:.1f}%) |",
        f"| cache hit rate (by tokens) | {summary.cache_hit_rate:.1%} |",
        f"| tokens | input {tokens.input:,} · output {tokens.output:,} · cache read {tokens.cache_read:,} · "
        f"cache write {tokens.cache_write:,} |",
        f"| durations | {durations} |",
        "",
    ]
    models = breakdown.cost_by_model()
    lines += ["## Cost by model", ""]
    if models:
        lines += ["| model | tasks | cost |", "|---|---:|---:|"]
        lines += [f"| {_cell(m.model)} | {m.tasks:,} | {_usd(m.cost_usd)} |" for m in models]
    else:
        lines.append("No task reached a model.")
    lines += ["", f"## Batches ({len(summary.batches)})", ""]
    if summary.batches:
        lines += ["| chunk | batch | status | request counts |", "|---|---|---|---|"]
        for batch in summary.batches:
            request_counts = ", ".join(f"{k} {v:,}" for k, v in (batch.request_counts or {}).items() if v) or "-"
            lines.append(f"| {batch.chunk} | `{batch.id}` | {batch.status} | {request_counts} |")
    else:
        lines.append("No batch: every task went realtime.")
    lines += ["", *_failure_lines(counts.total - counts.succeeded, breakdown.failures())]
    return "\n".join(lines) + "\n"


def _failure_lines(not_succeeded: int, failures: Sequence[FailureReason]) -> list[str]:
    lines = [f"## Failures ({not_succeeded:,})", ""]
    if not failures:
        return [*lines, "None: every task succeeded."]
    lines += ["| status | error | reason | tasks | examples |", "|---|---|---|---:|---|"]
    for failure in failures[:MAX_REASONS]:
        examples = ", ".join(_cell(example) for example in failure.examples)
        lines.append(
            f"| {failure.status} | {_cell(failure.error_type)} | {_cell(failure.message) or '-'} "
            f"| {failure.count:,} | {examples} |"
        )
    rest = failures[MAX_REASONS:]
    if rest:
        lines += [
            "",
            f"… and {len(rest):,} more reasons ({sum(f.count for f in rest):,} tasks); the output file has each.",
        ]
    return lines
