"""`batch-engine batches list | status | cancel | delete | collect`: Message Batches and the runs that own them."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from batch_engine.cli.args import add_state_url, positive_int, state_of
from batch_engine.files import dumps
from batch_engine.runner import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from batch_engine.client import AsyncClient
    from batch_engine.operations import BatchView
    from batch_engine.state.backend import RunLedger


T = TypeVar("T")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `batches` and its verbs on the `batch-engine` parser."""
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
        add_state_url(parser)
        return parser

    listing = verb("list", "recent batches (newest first), or every batch of one run with its live status")
    listing.add_argument("--run", metavar="RUN_KEY", help="only this run's batches (a unique key prefix will do)")
    listing.add_argument("--days", type=float, default=7.0, help="without --run: look back this many days")
    listing.add_argument("--limit", type=positive_int, default=50, help="without --run: at most this many")
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


def _with_api(
    args: argparse.Namespace, call: Callable[[AsyncClient, RunLedger], Awaitable[T]], *, need_ledger: bool
) -> T:
    """Run `call` with a client for the environment's API and the command's ledger (empty if there is none)."""
    import asyncio

    from batch_engine.client import api_from_environment, make_client
    from batch_engine.errors import ConfigError, LedgerError
    from batch_engine.state.backend import ledger_exists, open_ledger
    from batch_engine.state.ledger import LEDGER_FILE, Ledger

    api = api_from_environment()
    if api is None:
        raise ConfigError("no API key: set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL to use the emulator)")
    state = state_of(args)
    exists = ledger_exists(state)
    if need_ledger and not exists:
        path = args.state_dir / LEDGER_FILE
        raise LedgerError(f"{path}: no run ledger here; pass the --state-dir (or --state-url) the run used")

    async def go() -> T:
        client = make_client(api)
        # Without a ledger file nothing is ours: an empty in-memory one instead of creating files.
        ledger = open_ledger(state) if exists else Ledger(Path(":memory:"))
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
        args,
        lambda client, ledger: operations.list_views(
            client, ledger, run_key=args.run, days=args.days, limit=args.limit
        ),
        need_ledger=args.run is not None,
    )
    _print_views(views, args.json)
    return 0


def _batches_status(args: argparse.Namespace) -> int:
    from batch_engine import operations

    view = _with_api(args, lambda client, ledger: operations.status(client, ledger, args.batch_id), need_ledger=False)
    _print_views([view], args.json)
    return 0


def _batches_cancel(args: argparse.Namespace) -> int:
    from batch_engine import operations

    views = _with_api(
        args,
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

    _with_api(args, lambda client, ledger: operations.delete(client, ledger, args.batch_id), need_ledger=False)
    print(f"{args.batch_id}: deleted")
    return 0


def _batches_collect(args: argparse.Namespace) -> int:
    import asyncio

    from batch_engine import operations
    from batch_engine.client import api_from_environment
    from batch_engine.errors import ConfigError, RunBusyError
    from batch_engine.render.terminal import render_summary

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
        run = operations.reopen(args.state_dir, args.run, args.output, state_of(args))
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
