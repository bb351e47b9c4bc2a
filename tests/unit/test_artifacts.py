"""The Prefect UI's view of a run, built by pure functions from the run summary and the output rows: the final
state message, the Markdown run summary (with its card's headline) and the table by task type, route and model."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from batch_engine.models import BatchSummary, CostSummary, ErrorInfo, RunSummary, TaskResult, TokenTotals, Usage
from batch_engine.render.artifacts import (
    MAX_REASONS,
    RunBreakdown,
    outcome_message,
    summary_headline,
    summary_markdown,
)

HAIKU, SONNET = "claude-haiku-4-5", "claude-sonnet-4-6"


def _row(index: int, task_type: str | None, route: str | None, status: str = "succeeded", **extra: Any) -> TaskResult:
    return TaskResult.model_validate(
        {"task_id": f"t{index}", "index": index, "task_type": task_type, "route": route, "status": status, **extra}
    )


def _rejected(index: int, message: str) -> TaskResult:
    return _row(index, None, None, "rejected", error=ErrorInfo(type="rejected", message=message))


ROWS = [
    _row(
        0,
        "summarize",
        "batch",
        model=HAIKU,
        usage=Usage(input_tokens=10, cache_read_input_tokens=90, cache_creation_input_tokens=5, output_tokens=5),
        cost_usd=0.5,
    ),
    _row(1, "summarize", "batch", model=HAIKU, usage=Usage(input_tokens=100, output_tokens=7), cost_usd=0.25),
    _row(
        2,
        "chat",
        "realtime",
        "errored",
        model=SONNET,
        error=ErrorInfo(type="overloaded_error", message="529 | Overloaded\n now"),
    ),
    _row(
        3,
        "chat",
        "realtime",
        "errored",
        model=SONNET,
        error=ErrorInfo(type="overloaded_error", message="529 | Overloaded\n now"),
    ),
    _row(4, "summarize", "batch", "expired", model=HAIKU, error=ErrorInfo(type="expired", message="batch row expired")),
    _rejected(5, "line 6 (task_id t5): task_type: unknown"),
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
    return RunSummary.model_validate({**summary.model_dump(), **changes})


def test_the_table_has_one_row_per_task_type_route_and_model_with_formatted_figures_and_no_total_row() -> None:
    breakdown = RunBreakdown.of([*ROWS, _row(6, "summarize", "batch", model=HAIKU, cost_usd=1234.5)])

    table = breakdown.table()

    assert table == [
        {"task type": "(none)", "route": "not sent", "model": "(none)", "tasks": "1", "succeeded": "0", "failed": "0"}
        | {"rejected": "1", "input tokens": "0", "cache read": "0", "cache write": "0", "output tokens": "0"}
        | {"cost": "$0.0000"},
        {"task type": "chat", "route": "realtime", "model": SONNET, "tasks": "2", "succeeded": "0", "failed": "2"}
        | {"rejected": "0", "input tokens": "0", "cache read": "0", "cache write": "0", "output tokens": "0"}
        | {"cost": "$0.0000"},
        {"task type": "summarize", "route": "batch", "model": HAIKU, "tasks": "4", "succeeded": "3", "failed": "1"}
        # Input tokens are the uncached ones, as in the summary; cache reads and writes have columns of their own.
        | {"rejected": "0", "input tokens": "110", "cache read": "90", "cache write": "5", "output tokens": "12"}
        | {"cost": "$1,235.2500"},
    ]
    # The total is in the description, not a data row that sorting or filtering would mix in.
    assert breakdown.table_description().endswith(
        "Total: 7 tasks · 3 succeeded · 3 failed · 1 rejected · input 110 · cache read 90 · cache write 5 · "
        "output 12 tokens · $1,235.2500"
    )


def test_failures_are_grouped_by_reason_most_frequent_first_with_example_tasks() -> None:
    failures = RunBreakdown.of(ROWS).failures()

    assert [(f.status, f.error_type, f.count, f.examples) for f in failures] == [
        ("errored", "overloaded_error", 2, ("t2", "t3")),
        ("expired", "expired", 1, ("t4",)),
        ("rejected", "rejected", 1, ("t5 (line 6)",)),
    ]
    assert failures[0].message == "529 | Overloaded now"  # one line, whatever the API sent


def test_rejections_for_the_same_reason_on_different_lines_are_one_reason() -> None:
    rows = [
        _rejected(0, "line 1 (task_id t0): messages: field required"),
        _rejected(1, "line 2: messages: field required"),
        _rejected(2, "record 7: messages: field required"),
    ]

    (failure,) = RunBreakdown.of(rows).failures()

    assert (failure.message, failure.count) == ("messages: field required", 3)
    assert failure.examples == ("t0 (line 1)", "t1 (line 2)", "t2 (record 7)")


def test_the_summary_lists_at_most_max_reasons_and_counts_the_rest() -> None:
    rows = [_rejected(i, f"line {i + 1}: field_{i}: bad") for i in range(MAX_REASONS + 2)]
    rows += [_rejected(100, "line 101: field_0: bad")]  # the most frequent reason comes first
    summary = _summary(counts={"total": len(rows), "succeeded": 0, "failed": 0, "rejected": len(rows)})
    summary.counts.by_route = {}

    markdown = summary_markdown(summary, RunBreakdown.of(rows))

    assert "| rejected | rejected | field_0: bad | 2 | t0 (line 1), t100 (line 101) |" in markdown
    assert markdown.count("| rejected | rejected |") == MAX_REASONS
    assert "… and 2 more reasons (2 tasks)" in markdown


def test_text_that_looks_like_html_stays_visible_in_the_summary() -> None:
    rows = [_rejected(0, "line 1: <record>: not a JSON object & not a task")]
    summary = _summary(counts={"total": 1, "succeeded": 0, "failed": 0, "rejected": 1, "by_route": {}})

    markdown = summary_markdown(summary, RunBreakdown.of(rows))

    assert "&lt;record&gt;: not a JSON object &amp; not a task" in markdown
    assert "<record>" not in markdown


def test_the_summary_shows_counts_cost_against_baseline_cost_by_model_cache_batches_and_failure_reasons() -> None:
    markdown = summary_markdown(_summary(), RunBreakdown.of(ROWS))

    assert markdown.startswith("# batch-orchestrator run `abc123`\n")
    assert "| figure | value |\n|---|---|\n" in markdown  # a table header with names, not an empty row
    assert "| tasks | 6: 2 succeeded, 3 failed, 1 rejected |" in markdown
    assert "| cost | $0.7500 |" in markdown
    assert "| all-realtime no-cache baseline | $3.0000 |" in markdown
    assert "| savings | $2.2500 (75.0%) |" in markdown
    assert "| cache hit rate (by tokens) | 45.0% |" in markdown
    assert f"| {HAIKU} | 3 | $0.7500 |\n| {SONNET} | 2 | $0.0000 |" in markdown
    assert "| c0 | `msgbatch_1` | ended | succeeded 2 |" in markdown
    # A `|` inside an error message must not break the Markdown table.
    assert "| errored | overloaded_error | 529 \\| Overloaded now | 2 | t2, t3 |" in markdown
    assert "SIMULATED" not in markdown


def test_a_clean_simulated_run_says_so() -> None:
    clean = _summary(simulated=True, batches=[], counts={"total": 1, "succeeded": 1, "failed": 0, "rejected": 0})
    clean.counts.by_route = {"realtime": 1}

    markdown = summary_markdown(clean, RunBreakdown.of([_row(0, "chat", "realtime", model=HAIKU)]))

    assert "**SIMULATED**" in markdown
    assert "No batch: every task went realtime." in markdown
    assert "None: every task succeeded." in markdown
    assert summary_headline(clean).endswith("· SIMULATED")


def test_the_headline_and_the_final_state_message_carry_the_counts_cost_and_savings() -> None:
    summary = _summary(counts={"total": 1304, "succeeded": 1300, "failed": 3, "rejected": 1, "by_route": {}})

    assert summary_headline(summary) == "1,304 tasks · 3 failed · 1 rejected · $0.7500 · saved 75.0%"
    assert outcome_message(summary) == (
        "1,300 succeeded, 3 failed, 1 rejected of 1,304 tasks; cost $0.7500, saved 75.0% against all-realtime "
        "without caching"
    )
