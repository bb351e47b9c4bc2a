"""`batch-engine run`: a task file through both lanes, in this process or as the `batch-orchestrator` flow."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from batch_engine.cli.args import add_state_url, dollars, positive_duration, positive_int
from batch_engine.config import Config, load_config
from batch_engine.files import count_records
from batch_engine.runner import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from batch_engine.lanes import Progress
    from batch_engine.models import RunSummary
    from batch_engine.runner import RunOptions


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `run` on the `batch-engine` parser."""
    parser = sub.add_parser(
        "run",
        help="run a task file through Message Batches and realtime; write one merged result file",
        description="Run every task of INPUT (batch or realtime per task), resume after a crash from the run "
        "ledger, and write one merged result file. Needs ANTHROPIC_API_KEY, or --emulate for a simulated run. "
        "Exit 0: every task succeeded; 1: some failed (all are in the output); 2: bad input or config.",
    )
    parser.add_argument("input", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="result file (JSON, or JSONL)")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="run ledger directory")
    add_state_url(parser)
    parser.add_argument("--concurrency", type=positive_int, help="realtime requests in flight at most")
    parser.add_argument("--batch-timeout", type=positive_duration, help="cancel batches not ended by then (e.g. 24h)")
    parser.add_argument("--poll-interval", type=positive_duration, help="longest wait between batch polls (e.g. 60s)")
    routes = parser.add_mutually_exclusive_group()
    routes.add_argument("--realtime-only", dest="mode", action="store_const", const="realtime")
    routes.add_argument("--batch-only", dest="mode", action="store_const", const="batch")
    parser.add_argument("--format", dest="output_format", choices=["json", "jsonl"], default="json")
    parser.add_argument(
        "--parsed-only",
        action="store_true",
        help="with --format jsonl: one {task_id, status, parsed} line per task (output-schema task types), no run line",
    )
    parser.add_argument(
        "--max-cost-usd", type=dollars, metavar="USD", help="refuse a plan estimated over this; stop sending at it"
    )
    parser.add_argument(
        "--count-tokens", action="store_true", help="count input tokens exactly (messages.count_tokens) first"
    )
    parser.add_argument(
        "--emulate", action="store_true", help="run against the built-in API emulator (simulated, nothing billed)"
    )
    parser.add_argument(
        "--prefect",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run as the batch-orchestrator Prefect flow (a temporary local server unless PREFECT_API_URL is set); "
        "default: only when PREFECT_API_URL is set, else the same run loop in this process, without Prefect",
    )
    changed = parser.add_mutually_exclusive_group()
    changed.add_argument(
        "--resume-run",
        metavar="KEY",
        help="finish this unfinished run exactly as it was started (its recorded config), whatever changed since",
    )
    changed.add_argument(
        "--supersede",
        action="store_true",
        help="replace an unfinished run of the same input whose requests differ: keep its batches and results for "
        "every unchanged task, send only what changed",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Run a task file: in this process, or as the `batch-orchestrator` Prefect flow (--prefect, PREFECT_API_URL)."""
    from batch_engine.lanes import Progress
    from batch_engine.render.terminal import render_summary
    from batch_engine.runner import run_options

    # Bad config, input or key: one `Error:` line and exit 2 before anything starts.
    if args.parsed_only and args.output_format != "jsonl":
        from batch_engine.errors import ConfigError

        raise ConfigError("--parsed-only needs --format jsonl")
    config = load_config(args.config)
    records = count_records(args.input)
    with_prefect = _with_prefect(args)
    _check_api_key(args.emulate, with_prefect)
    options = run_options(
        state_dir=args.state_dir,
        config_path=args.config,
        mode=args.mode,
        concurrency=args.concurrency,
        batch_timeout_s=args.batch_timeout,
        poll_interval_s=args.poll_interval,
        output_format="parsed-jsonl" if args.parsed_only else args.output_format,
        emulate=args.emulate,
        max_cost_usd=args.max_cost_usd,
        count_tokens=args.count_tokens,
        resume_run=args.resume_run,
        supersede=args.supersede,
        state_url=args.state_url,
    )
    progress = Progress()
    if with_prefect:
        summary = _run_flow(args, progress, records)
    else:
        summary = _run_here(args, config, options, progress, records)
    print(render_summary(summary))
    return 0 if summary.all_succeeded else 1


def _with_prefect(args: argparse.Namespace) -> bool:
    """--prefect / --no-prefect when given; else Prefect exactly when a server is configured (PREFECT_API_URL)."""
    import os

    return bool(os.environ.get("PREFECT_API_URL")) if args.prefect is None else bool(args.prefect)


def _run_here(
    args: argparse.Namespace, config: Config, options: RunOptions, progress: Progress, records: int
) -> RunSummary:
    """The run loop in this process, no Prefect: the same phases the flow runs as task runs, called directly."""
    import asyncio

    from batch_engine.client import api_from_environment
    from batch_engine.render.terminal import live_progress
    from batch_engine.runner import emulated_api, process_started_at, run

    api_context = (
        emulated_api(args.state_dir, args.config) if args.emulate else contextlib.nullcontext(api_from_environment())
    )
    with _run_log() as logger, api_context as api:
        assert api is not None  # _check_api_key
        if args.emulate:
            logger.warning("SIMULATED: running against the built-in emulator at %s; nothing is billed", api.base_url)

        async def go() -> RunSummary:
            async with live_progress(progress, records):
                return await run(
                    args.input,
                    args.output,
                    api=api,
                    config=config,
                    options=options,
                    logger=logger,
                    progress=progress,
                    launched_at=process_started_at(),
                )

        return asyncio.run(go())


@contextlib.contextmanager
def _run_log() -> Iterator[logging.Logger]:
    """The run's lines (batch state changes, lane summaries) on stderr while it runs, as the flow shows them."""
    logger = logging.getLogger("batch_engine")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _StderrHandler(logging.Handler):
    # Writes to whatever sys.stderr is now: the live progress display swaps it for a proxy that keeps lines
    # from tearing the table.
    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _run_flow(args: argparse.Namespace, progress: Progress, records: int) -> RunSummary:
    """Run the `batch-orchestrator` Prefect flow in this process, exactly as a deployment run would."""
    import asyncio

    from batch_engine.orchestration import orchestrator
    from batch_engine.orchestration.ephemeral import start_ephemeral_server
    from batch_engine.render.terminal import live_progress

    quiet_prefect_console()
    start_ephemeral_server(args.state_dir)

    async def go() -> RunSummary | None:  # None only for wait=false
        # Set inside the task asyncio.run makes, so it ends with this run (tests call `main` again in-process).
        orchestrator.live_progress.set(progress)
        async with live_progress(progress, records):
            return await orchestrator.batch_orchestrator(
                input_path=str(args.input),
                output_path=str(args.output),
                config_path=None if args.config is None else str(args.config),
                state_dir=str(args.state_dir),
                batch_timeout_s=args.batch_timeout,
                poll_interval_s=args.poll_interval,
                concurrency=args.concurrency,
                mode=args.mode,
                max_cost_usd=args.max_cost_usd,
                count_tokens=args.count_tokens,
                emulate=args.emulate,
                output_format="parsed-jsonl" if args.parsed_only else args.output_format,
                resume_run=args.resume_run,
                supersede=args.supersede,
                state_url=args.state_url,
            )

    summary = asyncio.run(go())
    assert summary is not None  # only wait=false leaves a run unfinished
    return summary


def _check_api_key(emulate: bool, with_prefect: bool) -> None:
    from batch_engine.client import api_from_environment
    from batch_engine.errors import ConfigError

    if emulate or api_from_environment() is not None:
        return
    if with_prefect:
        from prefect.settings import PREFECT_API_URL

        # With a Prefect server the key may be in its Secret block, which only the flow can read.
        if PREFECT_API_URL.value():
            return
    raise ConfigError(
        "no API key: set ANTHROPIC_API_KEY to run against the Anthropic API, "
        "or pass --emulate to dry-run against the built-in emulator (simulated results, nothing billed)"
    )


def quiet_prefect_console() -> None:
    """On the terminal, show the run's lines (batch state changes, lane summaries) and nothing of Prefect's own.

    Prefect's engine and temporary-server messages (start/stop banners, task state lines, event-flush warnings at
    exit) would otherwise bury the closing summary. They still reach the Prefect API; only the console drops them.
    """
    import logging
    import os

    from prefect.logging.handlers import PrefectConsoleHandler

    import batch_engine

    root = str(Path(str(batch_engine.__file__)).parent) + os.sep

    def run_lines_only(record: logging.LogRecord) -> bool:
        return record.pathname.startswith(root)

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(run_lines_only)
