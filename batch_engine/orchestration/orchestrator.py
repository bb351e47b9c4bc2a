"""The `batch-orchestrator` flow (one run of a task file) and the `batch-collect` flow (finishes runs started with
wait=false once their batches have ended).

Both compose the phases of `batch_engine.runner.Run` exactly as `runner.run()` and `batches collect` do
(`Run.send`, `Run.collect_once`, `Run.finish`), with each phase a Prefect task run: plan, begin (estimate and
budget), submit each chunk, collect each batch, the realtime lane, the realtime leftovers, park, finish (merge +
write), artifacts. Task runs are per phase and per batch, never per request, and every task body is one call into
`Run`, which also makes every run status change. The run ledger, not Prefect's cache, decides what is done: a
retried task or a new flow run with the same inputs re-attaches to the batches already created.
"""

# No `from __future__ import annotations` here: `flow.serve()` runs a flow in a spawned process, and cloudpickle
# sends the flow's function by value with only the globals its body uses. String annotations would then name
# types (`NonNegativeFloat`, ...) the copy lacks, and every served run failed validating its parameters.

import logging
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed
from prefect.utilities.annotations import quote
from pydantic import Field

from batch_engine.config import Route, load_config
from batch_engine.crashpoints import crash_point
from batch_engine.errors import BatchEngineError, RunBusyError
from batch_engine.lanes import Progress, SharedLimit
from batch_engine.lanes.batch import ChunkWork
from batch_engine.models import RunSummary
from batch_engine.orchestration.api_key import DEFAULT_SECRET_BLOCK, api_settings
from batch_engine.orchestration.limits import GlobalRateLimit, check_models, shared_rate_limit
from batch_engine.render.artifacts import (
    SUMMARY_KEY,
    TABLE_KEY,
    RunBreakdown,
    outcome_message,
    summary_headline,
    summary_markdown,
)
from batch_engine.runner import (
    DEFAULT_STATE_DIR,
    Lanes,
    OutputFormat,
    Run,
    RunOptions,
    plural,
    run_options,
)
from batch_engine.state.backend import open_ledger
from batch_engine.state.ledger import ChunkRecord, RunRecord
from batch_engine.state.url import resolve_state_url

Logger = logging.Logger | logging.LoggerAdapter[Any]


class CurrentRunLogger(logging.LoggerAdapter[logging.Logger]):
    """The lanes' logger: each line goes to the Prefect run current when it is logged, so a batch's polling shows
    on its `collect-…` task run and the realtime lane's retries on `realtime-lane`, not all on the flow run."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("batch_engine"), {})

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        get_run_logger().log(level, msg, *args, **kwargs)


T = TypeVar("T")


def unwalked(value: T) -> T:
    """`quote(value)`, typed as the value: Prefect passes it to the task without walking it for futures.

    Arguments that carry the whole plan (the run, the lanes) or a chunk's row indexes (a `ChunkWork`, a
    `ChunkRecord`: ~47k each at 1M tasks) go through this: walking the plan costs about a second per task call at
    10,000 tasks; walking a chunk's indexes cost ~0.65 s of event-loop stall per call at 1M tasks (issue #22).
    """
    return cast(T, quote(value))


# --- tasks: each body is one call into Run ---------------------------------------------------------------
# NO_CACHE everywhere: results hold live objects (the ledger, the lanes) and the ledger is what makes a retry safe.


@task(name="plan", cache_policy=NO_CACHE)
async def plan_run(input_path: str, output_path: str, options: RunOptions) -> Run:
    """Load the config, plan the input and open (or re-open) its ledger entry."""
    run = Run.prepare(Path(input_path), Path(output_path), load_config(options.config_path), options)
    get_run_logger().info("%s", run.describe())
    return run


@task(name="find-waiting-runs", cache_policy=NO_CACHE)
async def find_waiting_runs(state_dir: str, include_running: bool, state_url: str | None = None) -> list[RunRecord]:
    """Runs left for `collect`: submitted with wait=false (and, if asked, runs whose process died)."""
    with open_ledger(resolve_state_url(state_url, Path(state_dir))) as ledger:
        return ledger.runs("submitted") + (ledger.runs("running") if include_running else [])


@task(name="reopen", task_run_name="reopen-{record.run_key}", cache_policy=NO_CACHE)
async def reopen_run(record: RunRecord, state_dir: str, state_url: str | None = None) -> Run:
    """Open a recorded run again with the options it started with."""
    return Run.reopen(record, Path(state_dir), resolve_state_url(state_url, Path(state_dir)))


@task(name="begin", cache_policy=NO_CACHE)
async def begin(run: Run, lanes: Lanes) -> float:
    """Estimate what is left to send, refuse a run over max_cost_usd before anything is sent; status running."""
    return run.begin(lanes)


@task(name="estimate-and-budget", cache_policy=NO_CACHE)
async def estimate_and_budget(run: Run, lanes: Lanes) -> float:
    """Estimate what is left to send; refuse a run over max_cost_usd before anything more is sent."""
    return run.estimate(lanes)


@task(name="submit-batch", task_run_name="submit-{work.key}", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
async def submit_chunk(run: Run, lanes: Lanes, work: ChunkWork) -> ChunkRecord | None:
    """The chunk's batch, created exactly once: the ledger's intent row makes a retry re-attach, not re-create."""
    return await run.submit(lanes, work)


@task(
    name="wait-and-collect",
    task_run_name="collect-{record.chunk_key}",
    retries=2,
    retry_delay_seconds=30,
    cache_policy=NO_CACHE,
)
async def collect_batch(run: Run, lanes: Lanes, record: ChunkRecord, wait: bool) -> bool:
    """Poll the batch until it ends (cancel it at the batch timeout), or only look once without `wait`; stream the
    results of an ended batch into the ledger."""
    return await run.collect(lanes, record, wait=wait)


@task(name="realtime-lane", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
async def realtime_lane(run: Run, lanes: Lanes) -> int:
    """Send the realtime-route tasks that have no result yet (a retry sends only what is still missing)."""
    return await run.send_realtime(lanes)


@task(name="realtime-leftovers", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
async def realtime_leftovers(run: Run, lanes: Lanes) -> int:
    """Send realtime whatever the batch lane did not finish (cancelled at the timeout, retries out of time), and
    answers that did not validate against their output schema."""
    return await run.send_leftovers(lanes)


@task(name="park", cache_policy=NO_CACHE)
async def park(run: Run) -> list[str]:
    """Leave a run whose batches still run to a later `batch-collect` (status submitted)."""
    return run.park()


@task(name="merge-and-write", cache_policy=NO_CACHE)
async def merge_and_write(run: Run, observe: Callable[[dict[str, Any]], object] | None = None) -> RunSummary:
    """Merge the ledger's rows with the rejections in input order, write the output atomically; run complete.
    Each row is handed to `observe` on the way (the artifacts' breakdown), so the ledger is read once."""
    return run.finish(observe)


@task(name="publish-artifacts", cache_policy=NO_CACHE)
async def publish_artifacts(summary: RunSummary, breakdown: RunBreakdown) -> None:
    """The run summary (Markdown) and the task type x route x model table, under keys that stay the same."""
    await acreate_markdown_artifact(
        summary_markdown(summary, breakdown), key=SUMMARY_KEY, description=summary_headline(summary)
    )
    await acreate_table_artifact(breakdown.table(), key=TABLE_KEY, description=breakdown.table_description())
    crash_point("flow.artifacts.published")


class TaskPhases:
    """`Run`'s phases, each as a Prefect task run of the flow (`runner.DirectPhases` calls them in-process).

    The run and the lanes carry the whole plan, a chunk its row indexes: they go to the tasks `unwalked`.
    """

    async def begin(self, run: Run, lanes: Lanes) -> float:
        return await begin(unwalked(run), unwalked(lanes))

    async def estimate(self, run: Run, lanes: Lanes) -> float:
        return await estimate_and_budget(unwalked(run), unwalked(lanes))

    async def submit(self, run: Run, lanes: Lanes, work: ChunkWork) -> ChunkRecord | None:
        return await submit_chunk(unwalked(run), unwalked(lanes), unwalked(work))

    async def collect(self, run: Run, lanes: Lanes, record: ChunkRecord, wait: bool) -> bool:
        return await collect_batch(unwalked(run), unwalked(lanes), unwalked(record), wait)

    async def send_realtime(self, run: Run, lanes: Lanes) -> int:
        return await realtime_lane(unwalked(run), unwalked(lanes))

    async def send_leftovers(self, run: Run, lanes: Lanes) -> int:
        return await realtime_leftovers(unwalked(run), unwalked(lanes))

    async def park(self, run: Run) -> list[str]:
        return await park(unwalked(run))

    async def finish(self, run: Run, observe: Callable[[dict[str, Any]], object] | None = None) -> RunSummary:
        return await merge_and_write(unwalked(run), unwalked(observe))


TASK_PHASES = TaskPhases()


# --- flows ----------------------------------------------------------------------------------------------------

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


@flow(name="batch-orchestrator", description="Run a task file through Message Batches and realtime; write one file.")
async def batch_orchestrator(
    input_path: str,
    output_path: str,
    config_path: str | None = None,
    state_dir: str = str(DEFAULT_STATE_DIR),
    batch_timeout_s: NonNegativeFloat | None = None,
    poll_interval_s: NonNegativeFloat | None = None,
    concurrency: PositiveInt | None = None,
    mode: Route | None = None,
    max_cost_usd: NonNegativeFloat | None = None,
    count_tokens: bool = False,
    emulate: bool = False,
    wait: bool = True,
    output_format: OutputFormat = "json",
    api_key_block: str = DEFAULT_SECRET_BLOCK,
    global_rate_limit: GlobalRateLimit | None = None,
    fail_on_task_failures: bool = False,
    resume_run: str | None = None,
    supersede: bool = False,
    state_url: str | None = None,
) -> RunSummary | None:
    """Plan, send both lanes, merge and write; with wait=false, submit and leave the batches to `batch-collect`.

    Returns the run summary, or None when the run was left for `batch-collect`. The final state's message holds
    the counts ("300 succeeded, 3 failed, 1 rejected of 304 tasks; ..."); a run where some tasks failed or were
    rejected ends `Completed`, or `Failed` with `fail_on_task_failures`. Paths are relative to the
    directory the flow runs in. `mode` forces one route; `max_cost_usd` refuses a plan estimated over it and
    stops sending at it; `emulate` runs against the built-in emulator (simulated, nothing billed).
    `global_rate_limit` names a Prefect global concurrency limit with slot decay (e.g. `anthropic-rpm`) that
    realtime requests also take slots from, shared by every worker and flow run; or maps each model to its own
    limit (`{"claude-haiku-4-5": "anthropic-rpm-haiku", "*": "anthropic-rpm"}`; a model with no entry and no
    `"*"` takes no shared slot). `resume_run` finishes that unfinished run as it was started; `supersede`
    replaces an unfinished run of the same input whose requests differ (see the README, "Crash safety").
    `state_url` says where the ledger and usage log live (`postgresql://user@host/db` for several workers); by
    default the worker's $BATCH_ENGINE_STATE_URL, else the SQLite files in `state_dir`.
    """
    logger = get_run_logger()
    options = run_options(
        state_dir=state_dir,
        config_path=config_path,
        mode=mode,
        concurrency=concurrency,
        batch_timeout_s=batch_timeout_s,
        poll_interval_s=poll_interval_s,
        output_format=output_format,
        emulate=emulate,
        max_cost_usd=max_cost_usd,
        count_tokens=count_tokens,
        resume_run=resume_run,
        supersede=supersede,
        state_url=state_url,
    )
    run = await plan_run(input_path, output_path, options)
    try:
        if run.completed:
            logger.info("run %s is already complete: its output is rewritten from the ledger, nothing is sent", run.key)
        elif not await _send(run, logger, wait=wait, block=api_key_block, global_rate_limit=global_rate_limit):
            logger.info("run %s: batches submitted; the `batch-collect` flow finishes it once they end", run.key)
            return None
        summary = await _finish(run, logger)
    finally:
        run.close()
    # Prefect makes a returned State the flow run's final state and hands its data to a direct caller (the CLI),
    # so callers still get the RunSummary.
    return cast(RunSummary, final_state(summary, fail_on_task_failures=fail_on_task_failures))


def final_state(summary: RunSummary, *, fail_on_task_failures: bool) -> State:
    """`Completed` with the counts as its message; `Failed` instead when asked to and some task did not succeed."""
    message = outcome_message(summary)
    if fail_on_task_failures and not summary.all_succeeded:
        return Failed(message=message, data=summary)
    return Completed(message=message, data=summary)


@flow(name="batch-collect", description="Finish every run started with wait=false whose batches have ended.")
async def collect(
    state_dir: str = str(DEFAULT_STATE_DIR),
    include_running: bool = False,
    api_key_block: str = DEFAULT_SECRET_BLOCK,
    global_rate_limit: GlobalRateLimit | None = None,
    state_url: str | None = None,
) -> list[RunSummary]:
    """Collect, send leftovers realtime, write and publish each waiting run whose batches have all ended.

    A run whose batches are still running is left for the next collect, so no process waits on a batch. One
    run that cannot be finished (its input changed, over budget...) does not hold up the others; the flow fails
    at the end, naming it. A run another live process holds (its lease) is skipped, and the log says so.
    `include_running` also takes runs left `running` by a flow run that died (a live one is skipped).
    `global_rate_limit` is as for `batch-orchestrator`: the realtime leftovers take slots from it; it is checked
    before any run is looked at.
    """
    logger = get_run_logger()
    shared = await _shared_limit(global_rate_limit)
    described: set[str] = set()
    records = await find_waiting_runs(state_dir, include_running, state_url)
    finished: list[RunSummary] = []
    failed: list[str] = []
    for record in records:
        try:
            run = await reopen_run(record, state_dir, state_url)
            try:
                summary = await _collect_one(run, logger, block=api_key_block, shared=shared, described=described)
            finally:
                run.close()
        except RunBusyError as exc:
            # Another live process (the run itself, another collector) works on it: not ours to touch.
            logger.warning("run %s: skipped: %s", record.run_key, exc)
            continue
        except BatchEngineError as exc:
            logger.error("run %s: cannot be finished: %s", record.run_key, exc)
            failed.append(record.run_key)
            continue
        if summary is not None:
            finished.append(summary)
    message = f"{len(finished)} of {plural(len(records), 'waiting run')} finished"
    logger.info("collect: %s", message)
    if failed:
        raise BatchEngineError(f"collect: could not finish {len(failed)} of {len(records)} runs: {', '.join(failed)}")
    return cast(list[RunSummary], Completed(message=message, data=finished))


# --- flow steps (composition only) ----------------------------------------------------------------------------


# The CLI's live display reads the lanes' counters; a flow run without one counts into a private Progress.
live_progress: ContextVar[Progress | None] = ContextVar("live_progress", default=None)


async def _send(
    run: Run, logger: Logger, *, wait: bool, block: str, global_rate_limit: GlobalRateLimit | None = None
) -> bool:
    """`Run.send` with each phase a task run; True when every batch has been collected (see `Run.send`)."""
    progress = live_progress.get() or Progress()
    options = run.options
    shared = await _shared_limit(global_rate_limit)
    if shared is not None:
        _describe_shared_limit(shared, run, logger, described=set())
    async with (
        api_settings(
            emulate=options.simulated, state_dir=options.state_dir, config_path=options.config_path, block_name=block
        ) as api,
        run.lanes(api, logger=CurrentRunLogger(), progress=progress, shared_limit=shared) as lanes,
    ):
        if options.simulated:
            # No address: the emulator lives only as long as this run, so a link to it would be dead in the UI.
            logger.warning("SIMULATED: running against the built-in emulator; nothing is billed")
        return await run.send(lanes, TASK_PHASES, wait=wait)


async def _collect_one(
    run: Run, logger: Logger, *, block: str, shared: SharedLimit | None, described: set[str]
) -> RunSummary | None:
    """`Run.collect_once` with each phase a task run, then finish; None while batches still run."""
    if not run.completed:
        options = run.options
        async with (
            api_settings(
                emulate=options.simulated,
                state_dir=options.state_dir,
                config_path=options.config_path,
                block_name=block,
            ) as api,
            run.lanes(api, logger=CurrentRunLogger(), shared_limit=shared) as lanes,
        ):
            if options.simulated:
                logger.warning("SIMULATED: collecting from the built-in emulator; nothing is billed")
            if shared is not None:
                _describe_shared_limit(shared, run, logger, described=described)
            running = await run.collect_once(lanes, TASK_PHASES)
        if running:
            logger.info("run %s: %s still running; left for the next collect", run.key, plural(len(running), "batch"))
            return None
    return await _finish(run, logger)


async def _shared_limit(spec: GlobalRateLimit | None) -> SharedLimit | None:
    """The global rate limits `spec` names, each checked before anything is sent; None without a spec."""
    return None if spec is None else await shared_rate_limit(spec)


def _describe_shared_limit(shared: SharedLimit, run: Run, logger: Logger, *, described: set[str]) -> None:
    """Refuse a limit for a model the config lacks; log once per model (not in `described`) what limits it."""
    check_models(shared, run.config.models)
    concurrency = run.config.limits.realtime_concurrency
    for model in sorted({planned.model for planned in run.plan.tasks} - described):
        described.add(model)
        name = shared.limit_for(model)
        if name is None:
            logger.info(
                'realtime: %s is under no global rate limit (global_rate_limit has no entry for it and no "*")',
                model,
            )
        else:
            block = min(shared.blocks[name], concurrency)
            logger.info("realtime: %s also under global rate limit %r, %d slots at a time", model, name, block)


async def _finish(run: Run, logger: Logger) -> RunSummary:
    breakdown = RunBreakdown()
    summary = await TASK_PHASES.finish(run, breakdown.add)
    await publish_artifacts(summary, unwalked(breakdown))
    counts, cost = summary.counts, summary.cost
    log = logger.info if summary.all_succeeded else logger.warning
    log(
        "run %s: %d tasks, %d succeeded, %d failed, %d rejected; cost $%.4f vs baseline $%.4f (saved %.1f%%); "
        "output %s",
        summary.run_key,
        counts.total,
        counts.succeeded,
        counts.failed,
        counts.rejected,
        cost.total_usd,
        cost.baseline_usd,
        cost.savings_pct,
        summary.output_path,
    )
    return summary
