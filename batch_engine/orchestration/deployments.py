"""Serve the batch-orchestrator deployments from one process, no work pool needed: `python flows/serve.py`.

The deployments match `prefect.yaml` (the work-pool path): `nightly` on a cron schedule, `on-demand` with no
schedule, `collect` every few minutes, and `batch-sharded/sharded`, which fans a large file out over on-demand
runs (start this process on several machines to share them). Needs a running `prefect server start` and
`PREFECT_API_URL`. `--global-rate-limit` makes every deployment's realtime requests, the scheduled ones included,
take slots from Prefect global concurrency limits (see batch_engine/orchestration/limits.py).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, cast

import orjson
from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval
from prefect.types.entrypoint import EntrypointType

from batch_engine.orchestration.limits import GlobalRateLimit
from batch_engine.orchestration.orchestrator import batch_orchestrator, collect
from batch_engine.orchestration.sharded import batch_sharded

NIGHTLY_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
COLLECT_EVERY_S = 300
TIMEZONE_ENV = "BATCH_ENGINE_TIMEZONE"
DEFAULT_STATE_DIR = ".batch_engine"

NIGHTLY_PARAMETERS: dict[str, Any] = {
    "input_path": "samples/nightly_tasks.json",
    "output_path": "out/nightly_results.json",
    "config_path": "samples/config.toml",
    "state_dir": DEFAULT_STATE_DIR,
}


def build_deployments(
    *,
    cron: str = NIGHTLY_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    collect_every_s: float = COLLECT_EVERY_S,
    nightly_parameters: dict[str, Any] | None = None,
    global_rate_limit: GlobalRateLimit | None = None,
) -> list[RunnerDeployment]:
    """The three deployments `prefect.yaml` also declares, ready for `serve(...)`; `global_rate_limit` becomes
    a default parameter of each (a run may still pass its own)."""
    limit = _limit_parameter(global_rate_limit)
    return [
        _deployment(
            batch_orchestrator,
            name="nightly",
            description="Nightly run of the task file through Message Batches and realtime.",
            schedules=[Cron(cron, timezone=timezone)],
            parameters={**(NIGHTLY_PARAMETERS if nightly_parameters is None else nightly_parameters), **limit},
            # Two nightly runs never overlap; a late one waits for the previous one to finish.
            concurrency_limit=1,
            tags=["batch-engine", "nightly"],
        ),
        _deployment(
            batch_orchestrator,
            name="on-demand",
            description="Run a task file now.",
            parameters=limit,
            tags=["batch-engine", "on-demand"],
        ),
        _deployment(
            collect,
            name="collect",
            description="Merge and write every run whose batches have ended; a no-op when none has.",
            schedules=[Interval(collect_every_s)],
            parameters={"state_dir": DEFAULT_STATE_DIR, **limit},
            concurrency_limit=1,
            tags=["batch-engine", "collect"],
        ),
    ]


def scale_out_deployments(global_rate_limit: GlobalRateLimit | None = None) -> list[RunnerDeployment]:
    """`batch-sharded/sharded`: splits a file into shards run as `batch-orchestrator/on-demand` runs."""
    return [
        _deployment(
            batch_sharded,
            name="sharded",
            description="Split a large task file into shards, run each as an on-demand run, merge the outputs.",
            parameters=_limit_parameter(global_rate_limit),
            tags=["batch-engine", "sharded"],
        )
    ]


def _limit_parameter(global_rate_limit: GlobalRateLimit | None) -> dict[str, Any]:
    return {} if global_rate_limit is None else {"global_rate_limit": global_rate_limit}


def _deployment(flow: Flow[..., Any], **options: Any) -> RunnerDeployment:
    # Module entrypoints load the flows the same way from any working directory.
    deployment = flow.to_deployment(entrypoint_type=EntrypointType.MODULE_PATH, **options)
    # Outside an event loop `to_deployment` is the sync variant; inside one it would hand back a coroutine.
    assert isinstance(deployment, RunnerDeployment), "build_deployments() must be called outside an event loop"
    return deployment


def _global_rate_limit(text: str) -> GlobalRateLimit:
    # A limit name, or a JSON object of model → limit name.
    if not text.lstrip().startswith("{"):
        return text
    try:
        names = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON object: {exc}") from None
    if not all(isinstance(name, str) for name in names.values()):
        raise argparse.ArgumentTypeError("every model must map to a limit name (a string)")
    return cast(dict[str, str], names)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python flows/serve.py", description=__doc__)
    parser.add_argument("--cron", default=NIGHTLY_CRON, help=f"nightly schedule (default {NIGHTLY_CRON!r})")
    parser.add_argument(
        "--timezone",
        default=os.environ.get(TIMEZONE_ENV, DEFAULT_TIMEZONE),
        help=f"IANA timezone of the cron schedule (default ${TIMEZONE_ENV} or {DEFAULT_TIMEZONE})",
    )
    parser.add_argument(
        "--collect-every",
        type=float,
        default=COLLECT_EVERY_S,
        metavar="SECONDS",
        help=f"how often the collect deployment runs (default {COLLECT_EVERY_S})",
    )
    parser.add_argument(
        "--global-rate-limit",
        type=_global_rate_limit,
        default=None,
        metavar="NAME|JSON",
        help='default global_rate_limit of every deployment: a limit name, or JSON {"model": "limit", "*": "limit"}',
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="run at most N flow runs at once in this process (default: no limit); 1 spreads a sharded job's "
        "shards over the serving processes, one each",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Register the deployments and run their flow runs until interrupted."""
    args = _parse_args(argv)
    limit = args.global_rate_limit
    deployments = build_deployments(
        cron=args.cron, timezone=args.timezone, collect_every_s=args.collect_every, global_rate_limit=limit
    )
    # Restarting this process (an upgrade, a reboot) must not silently pause the nightly schedule.
    serve(*deployments, *scale_out_deployments(limit), pause_on_shutdown=False, limit=args.limit)
