"""Terminal rendering for `batch-engine run`: a live per-lane progress table and the closing summary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from batch_engine.lanes import Progress
    from batch_engine.models import RunSummary

REFRESH_S = 0.25  # how often the live table is redrawn


def progress_table(progress: Progress, total: int) -> Table:
    """One row per lane: batches, rows done/failed, in flight; tokens and cost so far."""
    from rich.table import Table

    table = Table(title=f"batch_engine: {total} tasks", title_justify="left")
    for column in ("lane", "batches (submitted/ended)", "done", "failed", "in flight"):
        table.add_column(column, justify="right" if column != "lane" else "left")
    table.add_row(
        "batch",
        f"{progress.batches_submitted}/{progress.batches_ended}",
        str(progress.batch_rows_done),
        str(progress.batch_rows_failed),
        "",
    )
    table.add_row(
        "realtime", "", str(progress.realtime_done), str(progress.realtime_failed), str(progress.realtime_in_flight)
    )
    table.caption = (
        f"tokens in {progress.input_tokens:,} / out {progress.output_tokens:,}  ·  cost so far ${progress.cost_usd:.4f}"
    )
    return table


@asynccontextmanager
async def live_progress(progress: Progress, total: int) -> AsyncIterator[None]:
    """Redraw the progress table on stderr while the body runs (only on a terminal; logs stay clean elsewhere).

    The table first shows one refresh interval into the body, once its first requests are on their way: rich is
    imported then, not on the way to the first request (a tenth of a second of a run's start-up), and never when
    stderr cannot be a terminal.
    """
    if not _may_be_terminal():
        yield
        return
    display = asyncio.create_task(_redraw(progress, total))
    try:
        yield
    finally:
        display.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await display


def _may_be_terminal() -> bool:
    # False only where rich's `Console(stderr=True).is_terminal` is False too: no tty, and neither of the variables
    # that make rich treat a non-tty as a terminal (TTY_COMPATIBLE=1, a non-empty FORCE_COLOR).
    environ = os.environ
    if environ.get("TTY_COMPATIBLE") == "1" or environ.get("FORCE_COLOR"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


async def _redraw(progress: Progress, total: int) -> None:
    await asyncio.sleep(REFRESH_S)
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    if not console.is_terminal:
        return
    with Live(progress_table(progress, total), console=console, transient=True) as live:
        while True:
            await asyncio.sleep(REFRESH_S)
            live.update(progress_table(progress, total))


def render_summary(summary: RunSummary) -> str:
    """The closing lines: counts, cost against the baseline, where the output is."""
    counts = summary.counts
    cost = summary.cost
    by_status = ", ".join(f"{k} {v}" for k, v in counts.by_status.items())
    by_route = ", ".join(f"{k} {v}" for k, v in counts.by_route.items())
    lines = [
        f"{counts.total} tasks: {counts.succeeded} succeeded, {counts.failed} failed, "
        f"{counts.rejected} rejected  ({by_status})",
        f"routes: {by_route or 'none'}; batches: {len(summary.batches)}",
        f"cost ${cost.total_usd:.4f} vs all-realtime no-cache baseline ${cost.baseline_usd:.4f} "
        f"(saved ${cost.savings_usd:.4f}, {cost.savings_pct:.1f}%); "
        f"cache hit rate {summary.cache_hit_rate:.1%} by tokens",
        f"output: {summary.output_path}  (run {summary.run_key})",
    ]
    if summary.simulated:
        lines.insert(
            0, "SIMULATED run against the built-in emulator: no request reached Anthropic, nothing was billed."
        )
    return "\n".join(lines)
