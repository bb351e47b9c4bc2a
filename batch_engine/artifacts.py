"""Pure: what a run looks like in the Prefect UI — the Markdown run summary, the table by task type and route and the
progress figure — built from the run summary, the output rows and the live counters. No Prefect, no IO.

Artifact keys are stable (the same for every run) so the UI can show one run next to the previous ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from batch_engine.lanes import Progress
from batch_engine.models import RunSummary, TaskResult

SUMMARY_KEY = "batch-orchestrator-summary"
TABLE_KEY = "batch-orchestrator-by-task-type"
PROGRESS_KEY = "batch-orchestrator-progress"

NOT_SENT = "not sent"  # the route column of rows that never reached a lane (rejected records)
_MAX_REASON_CHARS = 160
_MAX_EXAMPLES = 3


@dataclass
class _Group:
    tasks: int = 0
    succeeded: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class FailureReason:
    """Failed rows sharing a status and an error: how many, and a few task ids to look up."""

    status: str
    error_type: str
    message: str
    count: int
    examples: tuple[str, ...]


@dataclass
class RunBreakdown:
    """One pass over the output rows: totals per (task type, route) and failures grouped by reason."""

    groups: dict[tuple[str, str], _Group] = field(default_factory=dict)
    _failures: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _examples: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Iterable[TaskResult]) -> RunBreakdown:
        breakdown = cls()
        for row in rows:
            breakdown.add(row)
        return breakdown

    def add(self, row: TaskResult) -> None:
        group = self.groups.setdefault((row.task_type or "-", row.route or NOT_SENT), _Group())
        group.tasks += 1
        if row.status == "succeeded":
            group.succeeded += 1
        else:
            group.failed += 1
            error = row.error
            reason = (row.status, error.type if error else row.status, _one_line(error.message if error else ""))
            self._failures[reason] += 1
            examples = self._examples.setdefault(reason, [])
            if len(examples) < _MAX_EXAMPLES and row.task_id:
                examples.append(row.task_id)
        if row.usage is not None:
            group.input_tokens += row.usage.prompt_tokens
            group.output_tokens += row.usage.output_tokens
        group.cost_usd += row.cost_usd or 0.0

    def table(self) -> list[dict[str, Any]]:
        """The table artifact: one row per (task type, route), sorted, with a total row last."""
        rows: list[dict[str, Any]] = []
        total = _Group()
        for (task_type, route), group in sorted(self.groups.items()):
            rows.append(_table_row(task_type, route, group))
            total.tasks += group.tasks
            total.succeeded += group.succeeded
            total.failed += group.failed
            total.input_tokens += group.input_tokens
            total.output_tokens += group.output_tokens
            total.cost_usd += group.cost_usd
        rows.append(_table_row("total", "", total))
        return rows

    def failures(self) -> list[FailureReason]:
        """Failure reasons, most frequent first."""
        ranked = sorted(self._failures.items(), key=lambda item: (-item[1], item[0]))
        return [FailureReason(*reason, count, tuple(self._examples.get(reason, ()))) for reason, count in ranked]


def _table_row(task_type: str, route: str, group: _Group) -> dict[str, Any]:
    return {
        "task_type": task_type,
        "route": route,
        "tasks": group.tasks,
        "succeeded": group.succeeded,
        "failed": group.failed,
        "input_tokens": group.input_tokens,
        "output_tokens": group.output_tokens,
        "cost_usd": round(group.cost_usd, 6),
    }


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_REASON_CHARS else line[: _MAX_REASON_CHARS - 1] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def summary_markdown(summary: RunSummary, failures: Sequence[FailureReason]) -> str:
    """The Markdown run summary: counts, cost vs baseline, savings, cache hit rate, batches, failures."""
    counts, cost, tokens = summary.counts, summary.cost, summary.tokens
    routes = ", ".join(f"{route} {n}" for route, n in counts["by_route"].items()) or "none"
    durations = ", ".join(f"{lane} {seconds:.1f} s" for lane, seconds in summary.durations_s.items())
    lines = [f"# batch-orchestrator run `{summary.run_key}`", ""]
    if summary.simulated:
        lines += ["**SIMULATED** against the built-in emulator: no request reached Anthropic, nothing was billed.", ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| input | `{_cell(summary.input_path)}` |",
        f"| output | `{_cell(summary.output_path)}` |",
        f"| tasks | {counts['total']}: {counts['succeeded']} succeeded, {counts['failed']} failed, "
        f"{counts['rejected']} rejected |",
        f"| routes | {routes} |",
        f"| cost | ${cost.total_usd:.4f} |",
        f"| all-realtime no-cache baseline | ${cost.baseline_usd:.4f} |",
        f"| savings | ${cost.savings_usd:.4f} ({cost.savings_pct:.1f}%) |",
        f"| cache hit rate (by tokens) | {summary.cache_hit_rate:.1%} |",
        f"| tokens | input {tokens.input:,} · output {tokens.output:,} · cache read {tokens.cache_read:,} · "
        f"cache write {tokens.cache_write:,} |",
        f"| durations | {durations} |",
        "",
        f"## Batches ({len(summary.batches)})",
        "",
    ]
    if summary.batches:
        lines += ["| chunk | batch | status | request counts |", "|---|---|---|---|"]
        for batch in summary.batches:
            request_counts = ", ".join(f"{k} {v}" for k, v in (batch.request_counts or {}).items() if v) or "-"
            lines.append(f"| {batch.chunk} | `{batch.id}` | {batch.status} | {request_counts} |")
    else:
        lines.append("No batch: every task went realtime.")
    lines += ["", f"## Failures ({counts['total'] - counts['succeeded']})", ""]
    if failures:
        lines += ["| status | error | count | reason | example tasks |", "|---|---|---|---|---|"]
        for failure in failures:
            examples = ", ".join(f"`{_cell(task_id)}`" for task_id in failure.examples)
            lines.append(
                f"| {failure.status} | {_cell(failure.error_type)} | {failure.count} | {_cell(failure.message)} "
                f"| {examples} |"
            )
    else:
        lines.append("None: every task succeeded.")
    return "\n".join(lines) + "\n"


def progress_percent(progress: Progress, total: int, done_before: int = 0) -> float:
    """Share of the run's tasks with a result, 0 to 100: `done_before` (a resumed run) plus this process's rows."""
    if total <= 0:
        return 100.0
    done = progress.batch_rows_done + progress.batch_rows_failed + progress.realtime_done + progress.realtime_failed
    return round(min(100.0, 100.0 * (done_before + done) / total), 1)


def progress_description(progress: Progress, total: int, done_before: int = 0) -> str:
    """One line for the progress artifact: batches, rows finished per lane, cost so far."""
    resumed = f" ({done_before} done before this process)" if done_before else ""
    return (
        f"{total} tasks{resumed} · batches {progress.batches_ended}/{progress.batches_submitted} ended · "
        f"batch rows {progress.batch_rows_done} ok / {progress.batch_rows_failed} failed · "
        f"realtime {progress.realtime_done} ok / {progress.realtime_failed} failed "
        f"({progress.realtime_in_flight} in flight) · ${progress.cost_usd:.4f} so far"
    )
