"""The `batch-engine` command: thin commands over the library; library errors become one `Error: ...` line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from batch_engine.config import Config, load_config
from batch_engine.errors import BatchEngineError
from batch_engine.io import dumps, iter_records
from batch_engine.planning import Plan, make_plan
from batch_engine.runner import DEFAULT_STATE_DIR
from batch_engine.schema import json_schema
from batch_engine.summary import plan_summary, render_plan_summary

if TYPE_CHECKING:
    from batch_engine.client import ApiSettings, AsyncClient
    from batch_engine.lanes import Progress
    from batch_engine.ledger import Ledger
    from batch_engine.models import RunSummary
    from batch_engine.operations import BatchView
    from batch_engine.runner import RunOptions
    from batch_engine.telemetry.advice import OptimizationReport
    from batch_engine.telemetry.usage_log import UsageRecord
    from batch_engine.token_count import TokenCounts

Command = Callable[[argparse.Namespace], int]
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one `Error:` line and exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {self.prog}: {message} (see {self.prog} --help)\n")


@functools.cache  # built once per process (argparse spends most of a small command's time building it)
def _build_parser() -> argparse.ArgumentParser:
    # Typed as the base class so the add_* helpers take it; its subparsers are _Parser too (argparse uses type(self)).
    parser: argparse.ArgumentParser = _Parser(prog="batch-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Each add_* function registers one noun/verb and sets `func`; keep them in this order.
    _add_plan_commands(sub)
    _add_emulator_command(sub)
    _add_run_command(sub)
    _add_batches_commands(sub)
    _add_insight_commands(sub)
    _add_bench_command(sub)
    return parser


# --- plan / validate / schema ------------------------------------------------------------------------------


def _add_plan_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = sub.add_parser("plan", help="show routes, batches and the estimated cost of a task file")
    plan.add_argument("input", type=Path)
    plan.add_argument("--config", type=Path, default=None)
    plan.add_argument("--json", action="store_true", help="print machine-readable JSON")
    plan.add_argument(
        "--count-tokens", action="store_true", help="exact input counts via messages.count_tokens (needs the API)"
    )
    plan.add_argument("--emulate", action="store_true", help="count against the built-in emulator")
    plan.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="its usage log informs output estimates"
    )
    plan.set_defaults(func=_plan)

    validate = sub.add_parser("validate", help="check a task file; list rejections")
    validate.add_argument("input", type=Path)
    validate.add_argument("--config", type=Path, default=None)
    validate.set_defaults(func=_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of the input or output")
    schema.add_argument("kind", choices=["input", "output"])
    schema.set_defaults(func=_schema)


def _load_plan(args: argparse.Namespace) -> tuple[Config, Plan]:
    config = load_config(args.config)
    return config, make_plan(iter_records(args.input), config, datetime.now(UTC))


def _plan(args: argparse.Namespace) -> int:
    from batch_engine.budget import Estimator
    from batch_engine.telemetry.usage_log import USAGE_FILE, UsageLog, output_history

    config, plan = _load_plan(args)
    history: dict[tuple[str, str], int] = {}
    if (args.state_dir / USAGE_FILE).exists():
        with UsageLog.open(args.state_dir) as log:
            history = output_history(log.recent_outputs())
    counts = _count_tokens(plan, config, args) if args.count_tokens else None
    estimator = Estimator(config, counts.by_index if counts else {}, history)
    summary = plan_summary(plan, config, estimator, counts)
    if args.json:
        sys.stdout.write(dumps(summary).decode() + "\n")
    else:
        print(render_plan_summary(summary))
    return 0


def _count_tokens(plan: Plan, config: Config, args: argparse.Namespace) -> TokenCounts:
    import asyncio

    from batch_engine.client import make_client
    from batch_engine.token_count import count_plan_tokens

    async def count(api: ApiSettings) -> TokenCounts:
        client = make_client(api)
        try:
            return await count_plan_tokens(client, plan.tasks, config.limits.count_tokens_rpm)
        finally:
            await client.close()

    with api_settings(args.emulate, args.config) as api:
        return asyncio.run(count(api))


@contextlib.contextmanager
def api_settings(emulate: bool, config_path: Path | None) -> Iterator[ApiSettings]:
    """The API to talk to: the built-in emulator (started here) with --emulate, else the environment's key."""
    from pydantic import SecretStr

    from batch_engine.client import ApiSettings, api_from_environment
    from batch_engine.errors import ConfigError

    if emulate:
        from batch_engine.emulator import EmulatorSettings, start_emulator

        with start_emulator(EmulatorSettings(config_path=config_path)) as emulator:
            print(f"SIMULATED: using the built-in emulator at {emulator.base_url}; nothing is billed.", file=sys.stderr)
            yield ApiSettings(SecretStr("emulated"), emulator.base_url)
        return
    api = api_from_environment()
    if api is None:
        raise ConfigError(
            "no API key: set ANTHROPIC_API_KEY to use the Anthropic API, "
            "or pass --emulate to use the built-in emulator (simulated results, nothing billed)"
        )
    yield api


def _validate(args: argparse.Namespace) -> int:
    _, plan = _load_plan(args)
    for rejection in plan.rejections:
        print(rejection.one_line())
    for warning in plan.warnings:
        print(warning)
    print(f"{plan.total_records} records: {len(plan.tasks)} valid, {len(plan.rejections)} rejected")
    return 1 if plan.rejections else 0


def _schema(args: argparse.Namespace) -> int:
    sys.stdout.write(dumps(json_schema(args.kind)).decode() + "\n")
    return 0


# --- emulator ---------------------------------------------------------------------------------------------


def _add_emulator_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "emulator",
        help="serve the local Anthropic API emulator (simulated results, no key, no spend)",
        description="Serve a local emulator of the Anthropic Messages and Message Batches APIs. Point the "
        "SDK (or `batch-engine run`) at it with ANTHROPIC_BASE_URL. Durations accept 250ms, 2s, 5m, 1h.",
        epilog="Always on, from Anthropic's docs: the rules of the request's anthropic-version (2026-10-21, what "
        "SDK 2.x sends, refuses temperature/top_p/top_k on every model; 2023-06-01 keeps the old rules); per-model "
        "thinking defaults, off values and their 400s; forced tool_choice refused on Opus 5.5, Sonnet 5.5 and Fable "
        "5.1; a tokenizer of its own per model family (5.x counts ~1.3x); 400 'prompt is too long' over the context "
        "window; x-should-retry on every error. Scripted one-shot faults (POST /_emulator/faults {endpoint, kind, "
        "count}), kinds: 429, 529, 500, drop, error_event, spend_limit (a 429), spend_limit_400 (self-set), "
        "spend_limit_402 (linked organization), 500_no_retry (a 500 with x-should-retry false), after_commit (the "
        "work done, then a 500 or 529), after_commit_no_retry (the work done, then that 500).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    parser.add_argument("--latency", type=_duration, default=0.0, help="added to every Messages call")
    parser.add_argument("--jitter", type=_duration, default=0.0, help="random extra latency, 0..JITTER")
    for name in ("rpm", "itpm", "otpm", "batch-rpm", "count-tokens-rpm"):
        limit = name.replace("-", " ").upper()
        parser.add_argument(f"--{name}", type=int, help=f"enforce this {limit} limit")
    parser.add_argument(
        "--fault-rate",
        action="append",
        default=[],
        type=_fault_rate,
        metavar="KIND=RATE",
        help=f"inject faults, repeatable; KIND is one of {', '.join(_FAULT_SETTINGS)}",
    )
    parser.add_argument("--fault-endpoints", default="messages", help="endpoints random faults hit (*: all)")
    parser.add_argument(
        "--fault-after-commit",
        type=_rate,
        default=0.0,
        metavar="RATE",
        help="share of batches.create and Messages calls that do their work (the batch is created, the message "
        "answered and billed) and then answer 500 or 529, as an API without idempotency keys can",
    )
    parser.add_argument("--row-error-type", default="api_error", help="error type of injected errored rows")
    parser.add_argument("--batch-duration", type=_duration, default=2.0, help="time a batch takes to end")
    parser.add_argument("--batch-never-ends", action="store_true", help="batches end only by expiring")
    parser.add_argument("--time-scale", type=float, default=1.0, help="emulator clock speed (3600: 1 h/s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for faults and jitter")
    parser.add_argument("--reply-tokens", type=int, help="fixed reply length in tokens (default: varies)")
    parser.add_argument(
        "--invalid-output-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="share (0..1) of JSON answers (output_config.format or a forced tool) made not to match their schema: "
        "a required property left out, or prose (default 0: every JSON answer validates)",
    )
    parser.add_argument(
        "--refusal-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="share (0-1) of Messages and batch rows answered stop_reason refusal, billed (default 0)",
    )
    parser.add_argument(
        "--pause-turn-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="share (0-1) of Messages and batch rows with a server tool (web search, web fetch, code execution) "
        "answered stop_reason pause_turn, billed: the server tool loop hit its iteration limit (default 0)",
    )
    parser.add_argument(
        "--batch-queue-cap",
        type=int,
        metavar="N",
        help="requests allowed waiting in the batch processing queue; a create over it is a 429 (default: none)",
    )
    parser.add_argument(
        "--batch-cache-hit-rate",
        type=float,
        default=0.6,
        metavar="F",
        help="share (0-1) of batch rows that read a live cache entry; the rest write it again (default 0.6)",
    )
    parser.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    parser.add_argument("--config", help="ignored: the emulator serves its own models, from Anthropic's docs")
    parser.add_argument("--state-file", help="keep batches, cache and stats in this file across restarts")
    parser.set_defaults(func=_run_emulator)


_FAULT_SETTINGS = {
    "429": "fault_rate_429",
    "529": "fault_rate_529",
    "500": "fault_rate_500",
    "drop": "fault_rate_drop",
    "row_error": "batch_row_error_rate",
    "row_expire": "batch_row_expire_rate",
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    """Seconds from '2', '2s', '250ms', '5m' or '1h'."""
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number, scale = text[: -len(unit)], _DURATION_UNITS[unit]
            break
    else:
        number, scale = text, 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 250ms, 2s, 5m, 1h)") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"negative duration: {text!r}")
    return seconds


def _positive_duration(text: str) -> float:
    seconds = _duration(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return seconds


def _dollars(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"not an amount of dollars (0 or more): {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: RATE must be a number between 0 and 1")
    return rate


def _fault_rate(text: str) -> tuple[str, float]:
    kind, _, rate = text.partition("=")
    if kind not in _FAULT_SETTINGS:
        raise argparse.ArgumentTypeError(f"unknown fault kind {kind!r}; use {', '.join(_FAULT_SETTINGS)}")
    try:
        return _FAULT_SETTINGS[kind], float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: RATE must be a number between 0 and 1") from None


def _run_emulator(args: argparse.Namespace) -> int:
    import contextlib

    from pydantic import ValidationError

    from batch_engine.emulator import EmulatorSettings, serve_forever
    from batch_engine.errors import ConfigError

    options = {
        "latency_s": args.latency,
        "jitter_s": args.jitter,
        "rpm": args.rpm,
        "itpm": args.itpm,
        "otpm": args.otpm,
        "batch_rpm": args.batch_rpm,
        "count_tokens_rpm": args.count_tokens_rpm,
        "fault_endpoints": tuple(args.fault_endpoints.split(",")),
        "fault_after_commit_rate": args.fault_after_commit,
        "batch_row_error_type": args.row_error_type,
        "batch_duration_s": args.batch_duration,
        "batch_never_ends": args.batch_never_ends,
        "time_scale": args.time_scale,
        "seed": args.seed,
        "reply_tokens": args.reply_tokens,
        "invalid_output_rate": args.invalid_output_rate,
        "refusal_rate": args.refusal_rate,
        "pause_turn_rate": args.pause_turn_rate,
        "batch_queue_cap": args.batch_queue_cap,
        "batch_cache_hit_rate": args.batch_cache_hit_rate,
        "api_key": args.api_key,
        "config_path": args.config,
        "state_file": args.state_file,
        **dict(args.fault_rate),
    }
    try:
        settings = EmulatorSettings.model_validate(options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise ConfigError(f"emulator: {where}: {first['msg']}") from None

    def ready(base_url: str) -> None:
        print(f"Anthropic API emulator listening on {base_url} (simulated: any key works, nothing is billed)")
        print(f"  export ANTHROPIC_BASE_URL={base_url}", flush=True)

    # Ctrl-C is the normal way to stop it; uvicorn shuts down gracefully (and saves --state-file) first.
    with contextlib.suppress(KeyboardInterrupt):
        serve_forever(settings, host=args.host, port=args.port, on_ready=ready)
    print("Emulator stopped.", flush=True)
    return 0


# --- run --------------------------------------------------------------------------------------------------


def _add_run_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    parser.add_argument("--concurrency", type=_positive_int, help="realtime requests in flight at most")
    parser.add_argument("--batch-timeout", type=_positive_duration, help="cancel batches not ended by then (e.g. 24h)")
    parser.add_argument("--poll-interval", type=_positive_duration, help="longest wait between batch polls (e.g. 60s)")
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
        "--max-cost-usd", type=_dollars, metavar="USD", help="refuse a plan estimated over this; stop sending at it"
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    """Run a task file: in this process, or as the `batch-orchestrator` Prefect flow (--prefect, PREFECT_API_URL)."""
    from batch_engine.display import render_summary
    from batch_engine.lanes import Progress
    from batch_engine.runner import run_options

    # Bad config, input or key: one `Error:` line and exit 2 before anything starts.
    if args.parsed_only and args.output_format != "jsonl":
        from batch_engine.errors import ConfigError

        raise ConfigError("--parsed-only needs --format jsonl")
    config = load_config(args.config)
    records = sum(1 for _ in iter_records(args.input))
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

    from rich.console import Console

    from batch_engine.client import api_from_environment
    from batch_engine.display import live_progress
    from batch_engine.runner import emulated_api, run

    api_context = (
        emulated_api(args.state_dir, args.config) if args.emulate else contextlib.nullcontext(api_from_environment())
    )
    with _run_log() as logger, api_context as api:
        assert api is not None  # _check_api_key
        if args.emulate:
            logger.warning("SIMULATED: running against the built-in emulator at %s; nothing is billed", api.base_url)

        async def go() -> RunSummary:
            async with live_progress(Console(stderr=True), progress, records):
                return await run(
                    args.input, args.output, api=api, config=config, options=options, logger=logger, progress=progress
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

    from rich.console import Console

    from batch_engine.display import live_progress
    from flows import batch_orchestrator as orchestrator
    from flows.ephemeral import start_ephemeral_server

    _quiet_prefect_console()
    start_ephemeral_server(args.state_dir)

    async def go() -> RunSummary | None:  # None only for wait=false
        # Set inside the task asyncio.run makes, so it ends with this run (tests call `main` again in-process).
        orchestrator.live_progress.set(progress)
        async with live_progress(Console(stderr=True), progress, records):
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


def _quiet_prefect_console() -> None:
    """On the terminal, show the run's lines (batch state changes, lane summaries) and nothing of Prefect's own.

    Prefect's engine and temporary-server messages (start/stop banners, task state lines, event-flush warnings at
    exit) would otherwise bury the closing summary. They still reach the Prefect API; only the console drops them.
    """
    import logging
    import os

    from prefect.logging.handlers import PrefectConsoleHandler

    import batch_engine
    import flows

    roots = tuple(str(Path(str(package.__file__)).parent) + os.sep for package in (batch_engine, flows))

    def run_lines_only(record: logging.LogRecord) -> bool:
        return record.pathname.startswith(roots)

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(run_lines_only)


# --- cache-stats / report ---------------------------------------------------------------------------------


def _add_insight_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stats = sub.add_parser("cache-stats", help="prompt-cache hit rate by tokens, savings, and why it is low")
    stats.add_argument("--days", type=float, default=7.0, help="look back this many days (default 7)")
    stats.add_argument("--by", choices=["task_type", "model", "route"], default="task_type")
    stats.add_argument("--json", action="store_true", help="print machine-readable JSON")
    stats.add_argument("--config", type=Path, default=None, help="price table (default: the shipped one)")
    stats.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    stats.set_defaults(func=_cache_stats)

    report = sub.add_parser("report", help="optimization report from the usage log (Markdown)")
    report.add_argument("--days", type=float, default=30.0, help="look back this many days (default 30)")
    report.add_argument("--output", type=Path, default=Path("report.md"), help="where to write it")
    report.add_argument(
        "--analyze-only", action="store_true", help="print the report; write nothing (no report file, no config)"
    )
    report.add_argument("--html", type=Path, metavar="FILE", help="also write one self-contained page of charts")
    report.add_argument(
        "--prefect-artifact",
        action="store_true",
        help="also publish the charts as a Markdown artifact on the Prefect server in PREFECT_API_URL",
    )
    report.add_argument("--config", type=Path, default=None, help="price table and tiers (default: the shipped one)")
    report.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    report.add_argument("--plan", type=Path, metavar="INPUT", help="also analyse this task file before it runs")
    report.add_argument(
        "--scope",
        choices=["caching", "model", "streaming", "thinking", "batching", "all"],
        default="all",
        help="only this part of the report (thinking includes max_tokens; default all)",
    )
    report.add_argument(
        "--model",
        choices=["haiku", "sonnet", "opus"],
        default=None,
        help="price the workload on this tier of the config (model scope; default: the cheap tier)",
    )
    report.add_argument(
        "--write-config",
        type=Path,
        metavar="FILE",
        help="write the config (--config, or the shipped one) with the recommended changes applied and commented",
    )
    report.set_defaults(func=_report)


def _usage_records(state_dir: Path, days: float) -> list[UsageRecord]:
    import time

    from batch_engine.errors import ConfigError
    from batch_engine.telemetry.usage_log import USAGE_FILE, UsageLog

    if not (state_dir / USAGE_FILE).exists():
        raise ConfigError(f"{state_dir / USAGE_FILE}: no usage log yet (it is written by `batch-engine run`)")
    with UsageLog.open(state_dir) as log:
        return log.records(since=time.time() - days * 86_400)


def _cache_stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from batch_engine.telemetry.cache_stats import cache_stats

    rows = cache_stats(_usage_records(args.state_dir, args.days), args.by, load_config(args.config))
    if args.json:
        sys.stdout.write(dumps([row.as_json() for row in rows]).decode() + "\n")
        return 0
    table = Table(title=f"Prompt cache, last {args.days:g} days, by {args.by}", title_justify="left")
    for column in (args.by, "requests", "hit rate (tokens)", "read", "written", "uncached", "saved"):
        table.add_column(column, justify="left" if column == args.by else "right")
    for row in rows:
        table.add_row(
            row.group,
            str(row.requests),
            f"{row.hit_rate:.1%}",
            f"{row.cache_read:,}",
            f"{row.cache_write:,}",
            f"{row.uncached_input:,}",
            f"${row.saved_usd:.4f}",
        )
    console = Console()
    console.print(table)
    for row in rows:
        for reason in row.diagnosis:
            console.print(f"[bold]{row.group}[/bold] ({row.hit_rate:.0%}): {reason}", highlight=False)
    return 0


def _report(args: argparse.Namespace) -> int:
    import time

    from batch_engine.budget import Estimator
    from batch_engine.config import default_config_text
    from batch_engine.errors import ConfigError
    from batch_engine.io import atomic_write_bytes, read_text
    from batch_engine.telemetry.advice import SCOPES, analyze
    from batch_engine.telemetry.advice_markdown import render_report
    from batch_engine.telemetry.config_patch import apply_changes, change_comment
    from batch_engine.telemetry.usage_log import observations, output_history

    if args.analyze_only and args.write_config is not None:
        raise ConfigError("--analyze-only writes nothing: drop --write-config, or drop --analyze-only")
    if args.analyze_only and args.html is not None:
        raise ConfigError("--analyze-only writes nothing: drop --html, or drop --analyze-only")
    for path in (args.output, args.write_config):
        if path is not None and path.is_dir() and not args.analyze_only:
            raise ConfigError(f"{path}: is a directory; give a file name")
    scopes = SCOPES if args.scope == "all" else (args.scope,)
    if args.model is not None and "model" not in scopes:
        raise ConfigError(f"--model prices the model scope: use it with --scope model or all, not {args.scope}")
    records = _usage_records(args.state_dir, args.days)
    config = load_config(args.config)
    planned = None
    if args.plan is not None:
        plan = make_plan(iter_records(args.plan), config, datetime.now(UTC))
        planned = (str(args.plan), plan, Estimator(config, output_history=output_history(observations(records))))
    report = analyze(records, config, time.time(), scopes, args.model)
    markdown = render_report(report, planned)
    if args.analyze_only:
        sys.stdout.write(markdown)
        _report_charts(args, records, report)
        return 0
    written = None
    if args.write_config is not None:
        text = default_config_text() if args.config is None else read_text(args.config)
        changes = [(rec.config_change, change_comment(rec, report.period)) for rec in report.config_changes]
        source = "default_config.toml" if args.config is None else str(args.config)
        written = apply_changes(text, config, [(c, note) for c, note in changes if c is not None], source)
    atomic_write_bytes(args.output, markdown.encode())
    print(f"wrote {args.output}")
    if written is not None:
        atomic_write_bytes(args.write_config, written.encode())
        print(f"wrote {args.write_config} ({len(report.config_changes)} changes; review, then use it with --config)")
    _report_charts(args, records, report)
    return 0


def _report_charts(args: argparse.Namespace, records: list[UsageRecord], report: OptimizationReport) -> None:
    """The report's charts: one self-contained HTML page (--html), a Prefect Markdown artifact (--prefect-artifact)."""
    import os

    from batch_engine.errors import ConfigError
    from batch_engine.io import atomic_write_bytes
    from batch_engine.telemetry.charts import Advice, html_page, markdown_charts

    if args.html is None and not args.prefect_artifact:
        return
    found = [Advice(r.title, r.detail, r.saved_usd, "saves") for r in report.savings]
    found += [Advice(r.title, r.detail, r.at_stake_usd, "at stake") for r in report.trials]
    found += [Advice(r.title, r.detail, None, "frees budget, not the bill") for r in report.budget]
    found += [Advice(r.title, r.detail, None, "no change to the bill") for r in report.no_bill_change]
    if args.html is not None:
        atomic_write_bytes(args.html, html_page(records, found, args.days).encode())
        print(f"wrote {args.html}")
    if args.prefect_artifact:
        if not os.environ.get("PREFECT_API_URL"):
            raise ConfigError("--prefect-artifact needs a Prefect server: set PREFECT_API_URL")
        from flows.report import CHARTS_ARTIFACT_KEY, publish_report_charts

        _quiet_prefect_console()
        publish_report_charts(markdown_charts(records, found))
        print(f"published the Prefect artifact {CHARTS_ARTIFACT_KEY}")


# --- batches -----------------------------------------------------------------------------------------------


def _add_batches_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    batches = sub.add_parser(
        "batches",
        help="list, inspect, cancel or delete Message Batches; collect a run whose process is gone",
        description="Operate on Message Batches and the runs that own them (the run ledger in --state-dir). "
        "Needs ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for the emulator).",
    )
    verbs = batches.add_subparsers(dest="verb", required=True)

    def verb(name: str, summary: str) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, help=summary, description=summary)
        parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="run ledger directory")
        return parser

    listing = verb("list", "recent batches (newest first), or every batch of one run with its live status")
    listing.add_argument("--run", metavar="RUN_KEY", help="only this run's batches (a unique key prefix will do)")
    listing.add_argument("--days", type=float, default=7.0, help="without --run: look back this many days")
    listing.add_argument("--limit", type=_positive_int, default=50, help="without --run: at most this many")
    listing.add_argument("--json", action="store_true", help="print machine-readable JSON")
    listing.set_defaults(func=_batches_list)

    status = verb("status", "one batch: status, request counts, times, and the run and chunk it belongs to")
    status.add_argument("batch_id", metavar="BATCH_ID")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.set_defaults(func=_batches_status)

    cancel = verb("cancel", "cancel one batch, or every in-flight batch of a run (a mistaken run)")
    target = cancel.add_mutually_exclusive_group(required=True)
    target.add_argument("batch_id", metavar="BATCH_ID", nargs="?")
    target.add_argument("--run", metavar="RUN_KEY", help="every batch of this run still in progress")
    cancel.set_defaults(func=_batches_cancel)

    delete = verb("delete", "delete an ended batch and its results (e.g. a duplicate no run has recorded)")
    delete.add_argument("batch_id", metavar="BATCH_ID")
    delete.set_defaults(func=_batches_delete)

    collect = verb(
        "collect",
        "finish a run whose process is gone: fetch its ended batches' results, send what is left realtime, "
        "write OUT. Exit 0/1 as `run`; 3 when batches are still running or another live process holds the run "
        "(nothing written: collect again later).",
    )
    collect.add_argument("--run", metavar="RUN_KEY", required=True, help="the run (a unique key prefix will do)")
    collect.add_argument("-o", "--output", type=Path, required=True, help="result file to write")
    collect.add_argument("--wait", action="store_true", help="wait for running batches instead of exiting 3")
    collect.set_defaults(func=_batches_collect)


_STILL_RUNNING = 3


def _with_api(state_dir: Path, call: Callable[[AsyncClient, Ledger], Awaitable[T]], *, need_ledger: bool) -> T:
    """Run `call` with a client for the environment's API and the state dir's ledger (empty if there is none)."""
    import asyncio

    from batch_engine.client import api_from_environment, make_client
    from batch_engine.errors import ConfigError, LedgerError
    from batch_engine.ledger import LEDGER_FILE, Ledger

    api = api_from_environment()
    if api is None:
        raise ConfigError("no API key: set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL to use the emulator)")
    path = state_dir / LEDGER_FILE
    if need_ledger and not path.exists():
        raise LedgerError(f"{path}: no run ledger here; pass the --state-dir the run used")

    async def go() -> T:
        client = make_client(api)
        # Without a ledger file nothing is ours: an empty in-memory one instead of creating files.
        ledger = Ledger.open(state_dir) if path.exists() else Ledger(Path(":memory:"))
        try:
            return await call(client, ledger)
        finally:
            ledger.close()
            await client.close()

    return asyncio.run(go())


def _batch_line(view: BatchView) -> str:
    info = view.info
    created = datetime.fromtimestamp(info.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    state = f"{info.status} (archived)" if info.archived else info.status
    counts = " ".join(f"{name}={count}" for name, count in info.request_counts.items() if count) or "-"
    owner = f"run {view.run_key} chunk {view.chunk_key}" if view.run_key else "not in this ledger"
    return f"{info.id}  {state:<18} {counts:<40} created {created}  {owner}"


def _print_views(views: Sequence[BatchView], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(dumps([view.as_json() for view in views]).decode() + "\n")
        return
    for view in views:
        print(_batch_line(view))


def _batches_list(args: argparse.Namespace) -> int:
    from batch_engine import operations

    views = _with_api(
        args.state_dir,
        lambda client, ledger: operations.list_views(
            client, ledger, run_key=args.run, days=args.days, limit=args.limit
        ),
        need_ledger=args.run is not None,
    )
    _print_views(views, args.json)
    return 0


def _batches_status(args: argparse.Namespace) -> int:
    from batch_engine import operations

    view = _with_api(
        args.state_dir, lambda client, ledger: operations.status(client, ledger, args.batch_id), need_ledger=False
    )
    _print_views([view], args.json)
    return 0


def _batches_cancel(args: argparse.Namespace) -> int:
    from batch_engine import operations

    views = _with_api(
        args.state_dir,
        lambda client, ledger: operations.cancel(client, ledger, run_key=args.run, batch_id=args.batch_id),
        need_ledger=args.run is not None,
    )
    for view in views:
        print(_batch_line(view))
    if not views:
        print(f"run {args.run}: no batch in flight")
    return 0


def _batches_delete(args: argparse.Namespace) -> int:
    from batch_engine import operations

    _with_api(
        args.state_dir, lambda client, ledger: operations.delete(client, ledger, args.batch_id), need_ledger=False
    )
    print(f"{args.batch_id}: deleted")
    return 0


def _batches_collect(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from batch_engine import operations
    from batch_engine.client import api_from_environment
    from batch_engine.display import render_summary
    from batch_engine.errors import ConfigError, RunBusyError

    api = api_from_environment()
    if api is None:
        raise ConfigError("no API key: set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL to use the emulator)")
    logger = logging.getLogger("batch_engine")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        run = operations.reopen(args.state_dir, args.run, args.output)
    except RunBusyError as exc:
        print(f"skipped: {exc}")
        return _STILL_RUNNING
    try:
        collected = asyncio.run(operations.collect(run, api, wait=args.wait, logger=logger))
    finally:
        run.close()
    if collected.summary is None:
        print(
            f"run {run.key}: {len(collected.running)} batches still running ({', '.join(collected.running)}); "
            "nothing written. Collect again later, or pass --wait."
        )
        return _STILL_RUNNING
    print(render_summary(collected.summary))
    return 0 if collected.summary.all_succeeded else 1


# --- bench ------------------------------------------------------------------------------------------------


def _add_bench_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Everything after the name goes to the benchmark's own parser (`batch-engine bench plan --help`).
    bench = sub.add_parser("bench", help="benchmarks: plan, batch, cost, realtime, ratelimit, prefect")
    bench.add_argument("benchmark", help="plan, batch, cost, realtime, ratelimit or prefect")
    bench.add_argument("arguments", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from batch_engine.bench import main as bench_main

    return bench_main([args.benchmark, *args.arguments])


# --- entry point ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 1 when some tasks failed, 2 on bad input/config."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except BatchEngineError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
