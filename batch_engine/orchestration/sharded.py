"""The `batch-sharded` flow: split a large task file into N contiguous shards, run each as its own run of the
`batch-orchestrator/on-demand` deployment (so workers on different machines share the load), then merge the
shard outputs into one file in input order.

Each shard is its own task file, hence its own run key: no batch is shared by two shards. The shard files go
to `<state_dir>/shards/<input digest>-<N>/`, a path every worker must see; the same input split the same way
gives the same bytes, so a re-run of this flow re-attaches every shard to its ledger entry. A `max_cost_usd`
is split between the shards by their share of the records, and each shard run enforces its own part.

With a shared ledger (PostgreSQL `state_url`, or one SQLite `state_dir` every worker sees), a shard whose worker
dies is noticed by its run lease (held by nobody) while Prefect still shows its flow run `Running`: that flow
run is marked `Crashed` and the shard runs again as a new deployment run, on whichever worker picks it up, which
takes the lease over and re-attaches to the shard's recorded batches (no chunk is created twice).
"""

# No `from __future__ import annotations` here: `flow.serve()` runs a flow in a spawned process, and cloudpickle
# sends the flow's function by value with only the globals its body uses. String annotations would then name
# types (`NonNegativeFloat`, ...) the copy lacks, and every served run failed validating its parameters.

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as flow_run_runtime
from prefect.states import Crashed

from batch_engine.config import Route
from batch_engine.errors import BatchEngineError
from batch_engine.files import atomic_write_bytes, atomic_write_chunks, file_digest, iter_record_lines, read_bytes
from batch_engine.orchestration.api_key import DEFAULT_SECRET_BLOCK
from batch_engine.orchestration.limits import GlobalRateLimit
from batch_engine.orchestration.orchestrator import NonNegativeFloat, PositiveInt
from batch_engine.planning.run_summary import encode_output
from batch_engine.planning.shards import (
    ShardedRunSummary,
    ShardOutput,
    ShardSpec,
    merged_rows,
    merged_summary,
    parse_output,
    split_budget,
    split_lines,
)
from batch_engine.runner import DEFAULT_STATE_DIR, OutputFormat
from batch_engine.state.backend import ledger_exists, open_ledger
from batch_engine.state.lease import abandoned_leases
from batch_engine.state.url import StateUrl, resolve_state_url

DEFAULT_DEPLOYMENT = "batch-orchestrator/on-demand"
SHARDS_DIR = "shards"
# How often a running shard's lease is checked, and how many times a shard whose worker died is run again.
WORKER_CHECK_S = 15.0
SHARD_RERUNS = 3


@dataclass(frozen=True, slots=True)
class ShardFile:
    spec: ShardSpec
    input_path: Path
    output_path: Path


@task(name="split-input", cache_policy=NO_CACHE)
async def split_input(input_path: str, state_dir: str, shards: int) -> list[ShardFile]:
    """Write the shard files (unchanged bytes are left alone) and return where each shard reads and writes."""
    source = Path(input_path)
    directory = Path(state_dir) / SHARDS_DIR / f"{file_digest(source)[:16]}-{shards}"
    files = []
    for spec, content in split_lines(list(iter_record_lines(source)), shards):
        path = directory / f"shard-{spec.number:03d}.jsonl"
        if not path.exists() or read_bytes(path) != content:
            atomic_write_bytes(path, content)
        files.append(ShardFile(spec, path, directory / f"shard-{spec.number:03d}.results.json"))
    return files


def shard_parameters(
    files: Sequence[ShardFile],
    common: Mapping[str, Any],
    *,
    state_dir: str,
    shard_state_dir: str | None,
    max_cost_usd: float | None,
) -> list[dict[str, Any]]:
    """The deployment parameters of each shard run: `common` (None values left out), the shard's own paths and
    its share of `max_cost_usd`."""
    budgets: list[float | None] = [None] * len(files)
    if max_cost_usd is not None:
        budgets = list(split_budget(max_cost_usd, [shard.spec for shard in files]))
    runs = []
    for shard, budget in zip(files, budgets, strict=True):
        number = shard.spec.number
        parameters = {
            **{key: value for key, value in common.items() if value is not None},
            "input_path": str(shard.input_path),
            "output_path": str(shard.output_path),
            "state_dir": f"{shard_state_dir}/shard-{number:03d}" if shard_state_dir else state_dir,
            # The parent merges the shards' outputs, so every shard runs to the end.
            "wait": True,
            "output_format": "json",
        }
        if budget is not None:
            parameters["max_cost_usd"] = budget
        runs.append(parameters)
    return runs


@task(name="merge-shards", cache_policy=NO_CACHE)
async def merge_shards(
    files: list[ShardFile], input_path: str, output_path: str, output_format: OutputFormat
) -> ShardedRunSummary:
    """Read every shard's output, write them as one output in input order, and return the merged summary."""
    outputs = []
    for shard in files:
        summary, rows = parse_output(read_bytes(shard.output_path))
        outputs.append(ShardOutput(shard.spec, str(shard.input_path), summary, rows))
    summary = merged_summary(outputs, input_path=input_path, output_path=output_path)
    atomic_write_chunks(Path(output_path), encode_output(summary, merged_rows(outputs), output_format))
    return summary


@flow(name="batch-sharded", description="Split a task file into shards, run each as a deployment run, merge.")
async def batch_sharded(
    input_path: str,
    output_path: str,
    shards: PositiveInt = 2,
    deployment: str = DEFAULT_DEPLOYMENT,
    config_path: str | None = None,
    state_dir: str = str(DEFAULT_STATE_DIR),
    shard_state_dir: str | None = None,
    batch_timeout_s: NonNegativeFloat | None = None,
    poll_interval_s: NonNegativeFloat | None = None,
    concurrency: PositiveInt | None = None,
    mode: Route | None = None,
    max_cost_usd: NonNegativeFloat | None = None,
    emulate: bool = False,
    output_format: OutputFormat = "json",
    api_key_block: str = DEFAULT_SECRET_BLOCK,
    global_rate_limit: GlobalRateLimit | None = None,
    state_url: str | None = None,
    worker_check_s: NonNegativeFloat = WORKER_CHECK_S,
) -> ShardedRunSummary:
    """Run `input_path` as `shards` runs of `deployment` side by side and write one merged output.

    Paths must be ones every worker sees (absolute, on a shared filesystem). The shard runs keep their ledger in
    `state_dir`, or each in `<shard_state_dir>/shard-NNN` when given (e.g. a local-disk path on each worker:
    SQLite must not live on a network filesystem). `global_rate_limit` is passed to every shard run.
    `max_cost_usd` caps the whole input: each shard run gets a share proportional to its records (the shares add
    up to at most the cap) and enforces it on its own, so a shard cannot spend what another leaves unused.
    `state_url` (default: each worker's $BATCH_ENGINE_STATE_URL) puts every shard's ledger in one database
    (`postgresql://...`): no shared filesystem for state, and a shard whose worker dies is run again on another
    worker (checked every `worker_check_s`; 0 turns it off), re-attaching to its batches.
    """
    logger = get_run_logger()
    files = await split_input(input_path, state_dir, shards)
    logger.info("%s: %d records in %d shards", input_path, sum(f.spec.count for f in files), len(files))
    common: dict[str, Any] = {
        "config_path": config_path,
        "batch_timeout_s": batch_timeout_s,
        "poll_interval_s": poll_interval_s,
        "concurrency": concurrency,
        "mode": mode,
        "emulate": emulate,
        "api_key_block": api_key_block,
        "global_rate_limit": global_rate_limit,
        "state_url": state_url,
    }

    runs = shard_parameters(
        files, common, state_dir=state_dir, shard_state_dir=shard_state_dir, max_cost_usd=max_cost_usd
    )
    if max_cost_usd is not None:
        shares = ", ".join(f"${parameters['max_cost_usd']:.6f}" for parameters in runs)
        logger.info("max_cost_usd $%.6f split by records into per-shard caps: %s", max_cost_usd, shares)

    # The shards' ledger, when this process can see it: every shard in one database, or in one state dir.
    shared = (
        None if shard_state_dir is not None or not worker_check_s else resolve_state_url(state_url, Path(state_dir))
    )

    async def run_shard(shard: ShardFile, parameters: dict[str, Any]) -> None:
        number = shard.spec.number
        dead_owners: set[str] = set()
        for attempt in range(SHARD_RERUNS + 1):
            flow_run = await _start_shard_run(deployment, parameters, number, attempt)
            flow_run, lost = await _watch_shard(flow_run, shard, shared, worker_check_s, dead_owners)
            if not lost:
                break
            logger.warning(
                "shard %d: the worker running flow run %s is gone (its run lease is held by nobody): marked "
                "Crashed; the shard runs again and re-attaches to its batches",
                number,
                flow_run.name,
            )
        state = flow_run.state
        if state is None or not state.is_completed():
            raise BatchEngineError(
                f"shard {number} ({deployment} run {flow_run.name}) ended {state.name if state else 'without a state'}"
            )
        logger.info("shard %d: %d records done by flow run %s", number, shard.spec.count, flow_run.name)

    results = await asyncio.gather(
        *(run_shard(shard, parameters) for shard, parameters in zip(files, runs, strict=True)), return_exceptions=True
    )
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        # Every shard ran to its end first: the finished ones are in their ledgers, and a re-run re-attaches.
        raise BatchEngineError(f"{len(failures)} of {len(files)} shards failed: {failures[0]}") from failures[0]
    summary = await merge_shards(files, input_path, output_path, output_format)
    counts = summary.counts
    logger.info(
        "sharded run %s: %d tasks, %d succeeded, %d failed, %d rejected; cost $%.4f; output %s",
        summary.run_key,
        counts.total,
        counts.succeeded,
        counts.failed,
        counts.rejected,
        summary.cost.total_usd,
        output_path,
    )
    return summary


async def _start_shard_run(deployment: str, parameters: dict[str, Any], number: int, attempt: int) -> FlowRun:
    """Create the flow run of one shard's attempt, once.

    Prefect's client sends the create again when an answer is slow to come (a busy server): without an idempotency
    key, the server then makes a second flow run of the same shard, which a worker starts beside the first (its run
    lease refuses it, and the shard is reported failed while its first run works on unwatched). With the key, the
    server answers the retry with the run it made ("a unique value to recognize retries of the same run, and
    prevent creating multiple flow runs": `run_deployment`'s docs). The key names this flow run and its retry
    count, the shard and the attempt: a rerun of a lost shard, or a retry of this flow, makes a new run.
    """
    parent = flow_run_runtime.get_id() or "no-flow-run"
    key = f"{parent}:{flow_run_runtime.get_run_count()}:shard-{number}:attempt-{attempt}"
    # Async-dispatched: called from async code it returns a coroutine (typed as either).
    started = run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=key)
    return await cast(Awaitable[FlowRun], started)


async def _watch_shard(
    flow_run: FlowRun, shard: ShardFile, shared: StateUrl | None, check_s: float, dead_owners: set[str]
) -> tuple[FlowRun, bool]:
    """Wait for a shard's flow run to end. Returns it, and True when its worker died first: the run held the lease
    of the shard's ledger run and nobody holds it now (the flow run is then marked Crashed)."""
    async with get_client() as client:
        while True:
            flow_run = await client.read_flow_run(flow_run.id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run, False
            if shared is not None and flow_run.state is not None and flow_run.state.is_running():
                gone = await asyncio.to_thread(_abandoned, shared, str(shard.input_path), dead_owners)
                if gone:
                    await client.set_flow_run_state(
                        flow_run.id, Crashed(message=f"worker gone: {gone}; the shard runs again"), force=True
                    )
                    return await client.read_flow_run(flow_run.id), True
            await asyncio.sleep(check_s or 1.0)


def _abandoned(state: StateUrl, input_path: str, dead_owners: set[str]) -> str | None:
    """Who held the lease of the shard's unfinished run and is gone (not already seen gone), or None."""
    if not ledger_exists(state):
        return None
    with open_ledger(state) as ledger:
        for lease in abandoned_leases(ledger, input_path):
            if lease.owner not in dead_owners:
                dead_owners.add(lease.owner)
                return f"pid {lease.pid} on {lease.host}"
    return None
