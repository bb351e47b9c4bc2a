"""The Prefect artifacts' content, built by pure functions from the run summary, the output rows and the live
counters: the Markdown run summary, the table by task type and route, and the progress figure."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from batch_engine.artifacts import RunBreakdown, progress_description, progress_percent, summary_markdown
from batch_engine.lanes import Progress
from batch_engine.models import BatchSummary, CostSummary, ErrorInfo, RunSummary, TaskResult, TokenTotals, Usage


def _row(index: int, task_type: str | None, route: str | None, status: str = "succeeded", **extra: Any) -> TaskResult:
    return TaskResult.model_validate(
        {"task_id": f"t{index}", "index": index, "task_type": task_type, "route": route, "status": status, **extra}
    )


ROWS = [
    _row(
        0, "summarize", "batch", usage=Usage(input_tokens=10, cache_read_input_tokens=90, output_tokens=5), cost_usd=0.5
    ),
    _row(1, "summarize", "batch", usage=Usage(input_tokens=100, output_tokens=7), cost_usd=0.25),
    _row(2, "chat", "realtime", "errored", error=ErrorInfo(type="overloaded_error", message="529 | Overloaded\n now")),
    _row(3, "chat", "realtime", "errored", error=ErrorInfo(type="overloaded_error", message="529 | Overloaded\n now")),
    _row(4, "summarize", "batch", "expired", error=ErrorInfo(type="expired", message="batch row expired")),
    _row(5, None, None, "rejected", error=ErrorInfo(type="rejected", message="line 6: task_type: unknown")),
]


def _summary(**changes: Any) -> RunSummary:
    summary = RunSummary(
        run_key="abc123",
        input_path="in.json",
        output_path="out.json",
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        finished_at=datetime(2026, 1, 1, 0, 5, tzinfo=UTC),
        counts={"total": 6, "succeeded": 2, "failed": 3, "rejected": 1, "by_route": {"batch": 3, "realtime": 2}},
        batches=[BatchSummary(id="msgbatch_1", chunk="c0", status="ended", request_counts={"succeeded": 2})],
        tokens=TokenTotals(input=110, output=12, cache_read=90),
        cost=CostSummary(total_usd=0.75, baseline_usd=3.0, savings_usd=2.25, savings_pct=75.0),
        cache_hit_rate=0.45,
        durations_s={"batch": 280.0, "total": 300.0},
    )
    return summary.model_copy(update=changes)


def test_the_table_has_one_row_per_task_type_and_route_and_a_total() -> None:
    table = RunBreakdown.of(ROWS).table()

    assert table == [
        {"task_type": "-", "route": "not sent", "tasks": 1, "succeeded": 0, "failed": 1}
        | {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0},
        {"task_type": "chat", "route": "realtime", "tasks": 2, "succeeded": 0, "failed": 2}
        | {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0},
        {"task_type": "summarize", "route": "batch", "tasks": 3, "succeeded": 2, "failed": 1}
        | {"input_tokens": 200, "output_tokens": 12, "cost_usd": 0.75},
        {"task_type": "total", "route": "", "tasks": 6, "succeeded": 2, "failed": 4}
        | {"input_tokens": 200, "output_tokens": 12, "cost_usd": 0.75},
    ]


def test_failures_are_grouped_by_reason_most_frequent_first_with_example_tasks() -> None:
    failures = RunBreakdown.of(ROWS).failures()

    assert [(f.status, f.error_type, f.count, f.examples) for f in failures] == [
        ("errored", "overloaded_error", 2, ("t2", "t3")),
        ("expired", "expired", 1, ("t4",)),
        ("rejected", "rejected", 1, ("t5",)),
    ]
    assert failures[0].message == "529 | Overloaded now"  # one line, whatever the API sent


def test_the_summary_shows_counts_cost_against_baseline_cache_batches_and_failure_reasons() -> None:
    markdown = summary_markdown(_summary(), RunBreakdown.of(ROWS).failures())

    assert markdown.startswith("# batch-orchestrator run `abc123`\n")
    assert "| tasks | 6: 2 succeeded, 3 failed, 1 rejected |" in markdown
    assert "| cost | $0.7500 |" in markdown
    assert "| all-realtime no-cache baseline | $3.0000 |" in markdown
    assert "| savings | $2.2500 (75.0%) |" in markdown
    assert "| cache hit rate (by tokens) | 45.0% |" in markdown
    assert "| c0 | `msgbatch_1` | ended | succeeded 2 |" in markdown
    # A `|` inside an error message must not break the Markdown table.
    assert "| errored | overloaded_error | 2 | 529 \\| Overloaded now | `t2`, `t3` |" in markdown
    assert "SIMULATED" not in markdown


def test_a_clean_simulated_run_says_so() -> None:
    clean = _summary(simulated=True, batches=[], counts={"total": 1, "succeeded": 1, "failed": 0, "rejected": 0})
    clean.counts["by_route"] = {"realtime": 1}

    markdown = summary_markdown(clean, [])

    assert "**SIMULATED**" in markdown
    assert "No batch: every task went realtime." in markdown
    assert "None: every task succeeded." in markdown


def test_progress_counts_rows_done_before_a_resume_and_never_passes_100() -> None:
    progress = Progress(batches_submitted=2, batches_ended=1, batch_rows_done=30, batch_rows_failed=5, realtime_done=15)

    assert progress_percent(progress, total=200) == 25.0
    assert progress_percent(progress, total=200, done_before=100) == 75.0
    assert progress_percent(progress, total=40, done_before=100) == 100.0
    assert progress_percent(Progress(), total=0) == 100.0
    description = progress_description(progress, total=200, done_before=100)
    assert "200 tasks (100 done before this process)" in description and "batches 1/2 ended" in description
