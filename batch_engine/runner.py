"""One run: plan the input, open (or resume) its ledger entry, run both lanes concurrently, send what the batch
lane left through the realtime lane, then merge everything into one output file in input order."""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson

from batch_engine.client import ApiSettings, Connection, RetryPolicy, preload_sdk
from batch_engine.config import Config, Route, load_config
from batch_engine.crashpoints import crash_point
from batch_engine.errors import ApiError, BatchUnfinishedError, BudgetError, LedgerError, RunChangedError
from batch_engine.files import atomic_write_chunks, file_digest
from batch_engine.lanes import LaneContext, Progress, SharedLimit, all_or_none
from batch_engine.lanes.batch import BatchLane, ChunkWork
from batch_engine.lanes.realtime import RealtimeLane
from batch_engine.lanes.sender import Sender
from batch_engine.models import ErrorInfo, RunSummary, TaskResult
from batch_engine.parallel_plan import plan_file
from batch_engine.planning import Plan, PlannedTask, over_context_window
from batch_engine.planning.budget import Budget, Estimator
from batch_engine.planning.identity import request_digests, run_identity
from batch_engine.planning.merge import in_input_order
from batch_engine.planning.outcome import failed
from batch_engine.planning.run_summary import Tally, encode_head, encode_rows, encode_tail
from batch_engine.state.backend import RunLedger, UsageStore, open_ledger, open_usage_log
from batch_engine.state.lease import RunLease
from batch_engine.state.ledger import ChunkRecord, RunRecord
from batch_engine.state.url import StateUrl, resolve_state_url
from batch_engine.state.usage_log import output_history
from batch_engine.token_count import count_plan_tokens

DEFAULT_STATE_DIR = Path(".batch_engine")
HISTORY_DAYS = 30  # how far back the usage log informs output estimates
# "parsed-jsonl" (`--format jsonl --parsed-only`): one {"task_id", "status", "parsed"} line per input record.
OutputFormat = Literal["json", "jsonl", "parsed-jsonl"]
log = logging.getLogger("batch_engine")
Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Per-run choices on top of the config (CLI flags and flow parameters)."""

    state_dir: Path = DEFAULT_STATE_DIR
    mode: Route | None = None  # force every task onto one route
    concurrency: int | None = None
    batch_timeout_s: float | None = None
    poll_interval_s: float | None = None
    output_format: OutputFormat = "json"
    simulated: bool = False
    max_cost_usd: float | None = None  # refuse before sending, and stop sending, past this spend
    count_tokens: bool = False  # exact input counts (messages.count_tokens) for the pre-flight estimate
    config_path: Path | None = None  # recorded with the run so another process (`collect`) can reopen it
    resume_run: str | None = None  # finish this recorded run as it was (its recorded config), whatever changed
    supersede: bool = False  # replace an unfinished run of the same input whose requests differ
    # Where the ledger and the usage log live (`sqlite:///dir`, `postgresql://...`); None: $BATCH_ENGINE_STATE_URL,
    # else the config's `state_url`, else the SQLite files in `state_dir`.
    state_url: str | None = None


# Against the emulator a batch ends in seconds; polling every minute would only add waiting.
EMULATED_POLL_S = 1.0
# In the state dir: emulated batches outlive the process that created them, so `collect` can finish them.
EMULATOR_STATE_FILE = "emulator-state.json"


def process_started_at() -> float:
    """When this process started (epoch seconds, from Linux's /proc; elsewhere when this module was imported):
    where a CLI run's start-up is measured from."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
    return time.time() - uptime_s + ticks / os.sysconf("SC_CLK_TCK")


_IMPORTED_AT = time.time()


def plural(count: int, noun: str) -> str:
    """`1 chunk`, `2 chunks`, `2 batches`: log lines read as sentences."""
    if count == 1:
        return f"{count:,} {noun}"
    return f"{count:,} {noun}es" if noun.endswith(("ch", "s")) else f"{count:,} {noun}s"


def run_options(
    *,
    state_dir: str | Path,
    config_path: str | Path | None,
    mode: Route | None,
    concurrency: int | None,
    batch_timeout_s: float | None,
    poll_interval_s: float | None,
    output_format: OutputFormat,
    emulate: bool,
    max_cost_usd: float | None,
    count_tokens: bool,
    resume_run: str | None = None,
    supersede: bool = False,
    state_url: str | None = None,
) -> RunOptions:
    """The engine's options from the CLI's flags or the flow's parameters (the same for both)."""
    return RunOptions(
        state_dir=Path(state_dir),
        mode=mode,
        concurrency=concurrency,
        batch_timeout_s=batch_timeout_s,
        poll_interval_s=poll_interval_s or (EMULATED_POLL_S if emulate else None),
        output_format=output_format,
        simulated=emulate,
        max_cost_usd=max_cost_usd,
        count_tokens=count_tokens,
        config_path=Path(config_path) if config_path else None,
        resume_run=resume_run,
        supersede=supersede,
        state_url=state_url,
    )


@contextmanager
def emulated_api(state_dir: Path, config_path: Path | None) -> Iterator[ApiSettings]:
    """The built-in emulator, started in this process for a simulated run (its batches kept in the state dir)."""
    from pydantic import SecretStr

    from batch_engine.emulator import EmulatorSettings, start_emulator

    settings = EmulatorSettings(config_path=config_path, state_file=state_dir / EMULATOR_STATE_FILE)
    with start_emulator(settings) as emulator:
        yield ApiSettings(SecretStr("emulated"), emulator.base_url)


_ROWS_BUFFER = 1 << 20  # the output's rows are written to, and read back from, their temporary file in MiB blocks

# state_url: where the ledger is (it may carry a password), not what the run is.
_NOT_STORED = frozenset({"state_dir", "resume_run", "supersede", "state_url"})


def _stored_options(options: RunOptions, config: Config, input_digest: str) -> dict[str, Any]:
    # What `--resume-run` and `Run.reopen` need to rebuild the run as it was: the options (but the state dir,
    # where the ledger lives, and this invocation's choices), the whole config, and the input's digest.
    stored: dict[str, Any] = {f.name: getattr(options, f.name) for f in fields(options) if f.name not in _NOT_STORED}
    stored["config_path"] = None if options.config_path is None else str(options.config_path.resolve())
    stored[_CONFIG] = config.model_dump(mode="json")
    stored[_INPUT_DIGEST] = input_digest
    return stored


def state_location(options: RunOptions, config: Config) -> StateUrl:
    """Where the run's ledger and usage log live: `options.state_url`, $BATCH_ENGINE_STATE_URL, the config's
    `state_url`, or the SQLite files in `options.state_dir`."""
    return resolve_state_url(options.state_url, options.state_dir, config.state_url)


def _url_text(state: StateUrl) -> str:
    return state.dsn if state.dsn is not None else f"sqlite:///{state.directory}"


_CONFIG = "config"
_INPUT_DIGEST = "input_digest"


def effective_config(config: Config, options: RunOptions) -> Config:
    """The config with the run's overrides applied."""
    limits: dict[str, Any] = {}
    if options.concurrency is not None:
        limits["realtime_concurrency"] = options.concurrency
    if options.batch_timeout_s is not None:
        limits["batch_timeout_s"] = options.batch_timeout_s
    if options.poll_interval_s is not None:
        limits["batch_poll_interval_s"] = options.poll_interval_s
    if not limits:
        return config
    return config.model_copy(update={"limits": config.limits.model_copy(update=limits)})


@dataclass
class Run:
    """A planned run bound to its ledger entry; the phases below are what the CLI and the Prefect flow call."""

    input_path: Path
    output_path: Path
    config: Config
    options: RunOptions
    plan: Plan
    ledger: RunLedger
    record: RunRecord
    lease: RunLease
    state: StateUrl
    timeline: Timeline

    @property
    def key(self) -> str:
        return self.record.run_key

    @property
    def completed(self) -> bool:
        return self.record.status == "complete"

    @classmethod
    def prepare(
        cls,
        input_path: Path,
        output_path: Path,
        config: Config,
        options: RunOptions,
        *,
        launched_at: float | None = None,
    ) -> Run:
        """Plan the input and open its ledger entry: the unfinished run that sends the same requests (same key,
        start time and plan), `--resume-run KEY` as it was, or a new run (refused while an unfinished run of the
        same input that sent something would send other requests, unless `--supersede`).

        `launched_at`: when the invocation started (the CLI's process start), so the run's durations include its
        start-up; by default, now.
        """
        prepare_at = time.time()
        config = effective_config(config, options)
        state = state_location(options, config)
        ledger = open_ledger(state)
        lease: RunLease | None = None
        try:
            opened = _open_run(ledger, input_path, output_path, config, options)
            for idle in opened.idle:
                ledger.set_run_status(idle.run_key, "superseded", opened.record.started_at)
            crash_point("plan.started")
            # One process per run: a second `run`, an overlapping flow run or a collector stops here.
            lease = RunLease(ledger, opened.record.run_key)
            lease.take()
            if opened.superseded:
                opened = _supersede(ledger, opened, options)
        except BaseException:
            if lease is not None:
                lease.release()
            ledger.close()
            raise
        # The plan lives as long as the run: out of the collector's sight, so that every full collection while
        # results come in does not walk its millions of objects again (a quarter to a third of the CPU of storing
        # 100k results, `bench plan`). Unfrozen when the run closes, so a long-lived process does not keep it.
        gc.freeze()
        crash_point("plan.done")
        timeline = Timeline(launched_at if launched_at is not None else prepare_at, prepare_at, time.time())
        return cls(
            input_path, output_path, opened.config, options, opened.plan, ledger, opened.record, lease, state, timeline
        )

    @classmethod
    def reopen(cls, record: RunRecord, state_dir: Path, state: StateUrl | None = None) -> Run:
        """A recorded run, opened again in another process as it was started (`collect`), from the ledger at
        `state` (the SQLite files in `state_dir` when None)."""
        known = {f.name for f in fields(RunOptions)} - _NOT_STORED
        stored = {name: value for name, value in record.options.items() if name in known}
        config_path = stored.pop("config_path", None)
        options = RunOptions(
            state_dir=state_dir,
            config_path=Path(config_path) if config_path else None,
            resume_run=record.run_key,
            state_url=None if state is None else _url_text(state),
            **stored,
        )
        return cls.prepare(Path(record.input_path), Path(record.output_path), load_config(options.config_path), options)

    def describe(self) -> str:
        """One line on what the run will do: `run KEY: 304 tasks (241 batch, 63 realtime), 0 rejected, 1 chunk`."""
        plan = self.plan
        batch = sum(task.route == "batch" for task in plan.tasks)
        return (
            f"run {self.key}: {plural(len(plan.tasks), 'task')} ({batch} batch, {len(plan.tasks) - batch} realtime), "
            f"{len(plan.rejections)} rejected, {plural(len(plan.chunks), 'chunk')}"
        )

    def close(self) -> None:
        self.lease.release()
        self.ledger.close()
        gc.unfreeze()

    # --- what is left to do (from the plan and the ledger) ---------------------------------------------------

    def tasks_by_index(self) -> dict[int, PlannedTask]:
        return {task.index: task for task in self.plan.tasks}

    def chunk_works(self) -> list[ChunkWork]:
        """Batches to re-attach to, plan chunks not yet submitted, and unfinished batch rows no chunk covers."""
        finished = self.ledger.finished_indexes(self.key)
        recorded = {chunk.chunk_key: chunk for chunk in self.ledger.chunks(self.key)}
        works = [ChunkWork(c.chunk_key, c.task_indexes) for c in recorded.values() if c.open]
        covered = {index for work in works for index in work.task_indexes} | finished
        for chunk in self.plan.chunks:
            key = f"c{chunk.number}"
            if key in recorded:
                continue
            # Rows a superseded run's batch still carries, or already finished there, are not sent again.
            indexes = tuple(i for pos in chunk.task_positions if (i := self.plan.tasks[pos].index) not in covered)
            if indexes:
                works.append(ChunkWork(key, indexes))
                covered.update(indexes)
        # Rows of collected (or failed) chunks still unfinished: their resubmission was cut short by a crash.
        ever_chunked = {index for chunk in recorded.values() for index in chunk.task_indexes}
        orphans = tuple(t.index for t in self.plan.tasks if t.index in ever_chunked and t.index not in covered)
        if orphans and not self._late():
            works.append(ChunkWork(f"o{len(recorded)}", orphans))
        return works

    def _late(self) -> bool:
        return time.time() - self.record.started_at >= self.config.limits.batch_timeout_s / 2

    def realtime_tasks(self) -> list[PlannedTask]:
        """Realtime-route tasks without a finished row."""
        finished = self.ledger.finished_indexes(self.key)
        return [t for t in self.plan.tasks if t.route == "realtime" and t.index not in finished]

    @functools.cached_property
    def has_output_schemas(self) -> bool:
        return any(task.output is not None for task in self.plan.tasks)

    def leftovers(self) -> list[PlannedTask]:
        """Every task without a finished row and not waiting in an open batch, and every invalid_output row with a
        retry left: they go realtime. Callers send them until this is empty (each retry is recorded)."""
        waiting = {i for c in self.ledger.chunks(self.key) if c.open for i in c.task_indexes}
        again: set[int] = set()
        if self.has_output_schemas:
            limit = self.config.limits.invalid_output_retries
            again = {row.index for row in self.ledger.invalid_outputs(self.key) if row.output_retries < limit}
        # The finished indexes streamed in order beside the plan's tasks (in input order too): called when every
        # task of a million has finished, a set of them was ~60 MiB at the run's peak.
        finished = self.ledger.iter_finished_indexes(self.key)
        done = next(finished, None)
        leftovers: list[PlannedTask] = []
        for task in self.plan.tasks:
            while done is not None and done < task.index:
                done = next(finished, None)
            if (done != task.index or task.index in again) and task.index not in waiting:
                leftovers.append(task)
        if leftovers:
            crash_point("leftovers.before")
        return leftovers

    def attempts_so_far(self) -> dict[int, int]:
        attempts: dict[int, int] = {}
        for chunk in self.ledger.chunks(self.key):
            if chunk.batch_id is not None:
                for index in chunk.task_indexes:
                    attempts[index] = attempts.get(index, 0) + 1
        return attempts

    # --- execution ---------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def lanes(
        self,
        api: ApiSettings,
        *,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        progress: Progress | None = None,
        policy: RetryPolicy | None = None,
        shared_limit: SharedLimit | None = None,
    ) -> AsyncIterator[Lanes]:
        """Both lanes over one connection (closed on exit); `shared_limit` throttles realtime across processes.

        The lanes' context is complete here: the usage log, the cost estimator (exact input counts first when
        `count_tokens` is asked) and the budget (unlimited without `max_cost_usd`).
        """
        limits = self.config.limits
        logger = logger or log
        api = ApiSettings(api.api_key, api.base_url, limits.request_timeout_s)
        connection = Connection(api)
        sender = Sender(connection, limits.realtime_sender, logger)
        usage_log: UsageStore | None = None
        try:
            # Started first, so a sender process is ready by the time the realtime lane starts.
            await sender.expect(len(self.plan.tasks) - sum(len(chunk.task_positions) for chunk in self.plan.chunks))
            usage_log = open_usage_log(self.state)
            estimator = await self._estimator(connection, usage_log, logger)
            tasks = self.tasks_by_index()
            ctx = LaneContext(
                api=connection,
                sender=sender,
                config=self.config,
                ledger=self.ledger,
                run_key=self.key,
                tasks=tasks,
                attempts=self.attempts_so_far(),
                policy=policy or RetryPolicy(attempts=limits.max_retry_attempts, max_time_s=limits.max_retry_time_s),
                logger=logger,
                lease_check=self.lease.check,
                usage_log=usage_log,
                estimator=estimator,
                budget=self._budget(estimator, tasks),
                progress=progress or Progress(),
                shared_limit=shared_limit,
            )
            deadline = self.record.started_at + limits.batch_timeout_s
            async with self.lease.heartbeat():
                yield Lanes(BatchLane(ctx, deadline=deadline), RealtimeLane(ctx, limits.realtime_concurrency))
        finally:
            if usage_log is not None:
                usage_log.close()
            try:
                await sender.close()
            finally:
                await connection.aclose()

    async def _estimator(self, connection: Connection, usage_log: UsageStore, logger: Logger) -> Estimator:
        counted: dict[int, int] = {}
        if self.options.count_tokens:
            client = await connection.load_sdk()
            counts = await count_plan_tokens(client, self.plan.tasks, self.config.limits.count_tokens_rpm)
            counted = counts.by_index
            if counts.note:
                logger.warning("%s", counts.note)
        history = output_history(usage_log.recent_outputs(since=time.time() - HISTORY_DAYS * 86_400))
        return Estimator(self.config, counted, history)

    def _budget(self, estimator: Estimator, tasks: dict[int, PlannedTask]) -> Budget:
        limit = self.options.max_cost_usd
        if limit is None:
            return Budget.unlimited()
        # Open batches already hold their rows: reserve their estimate until they are collected.
        waiting = {i for c in self.ledger.chunks(self.key) if c.open and c.batch_id for i in c.task_indexes}
        reserved = sum(estimator.max_cost(tasks[i], "batch") for i in waiting if i in tasks)
        return Budget(limit, spent_usd=self.ledger.spent(self.key), reserved_usd=reserved)

    def estimate(self, lanes: Lanes) -> float:
        """What the run will have cost once everything left is sent; refuses a plan over the budget.

        Past this point the lanes enforce the budget request by request.
        """
        ctx = lanes.ctx
        finished = self.ledger.finished_indexes(self.key)
        self._reject_over_context_window(ctx, ctx.estimator.counted_input, finished)
        spent = self.ledger.spent(self.key)
        estimate = spent + sum(ctx.estimator.cost(t, t.route) for t in self.plan.tasks if t.index not in finished)
        crash_point("preflight.done")
        budget = ctx.budget
        if not budget.limited:
            return estimate
        if estimate > budget.limit_usd:
            raise BudgetError(
                f"estimated cost ${estimate:.4f} is over --max-cost-usd ${budget.limit_usd:.4f} "
                f"({len(self.plan.tasks) - len(finished)} tasks to send; nothing was sent)"
            )
        ctx.logger.info("budget: estimated $%.4f of $%.4f", estimate, budget.limit_usd)
        return estimate

    def _reject_over_context_window(self, ctx: LaneContext, counted: Mapping[int, int], finished: set[int]) -> None:
        """Tasks the count puts over their model's context window are rejected here, not sent: the API would
        answer 400 "prompt is too long" (in a batch, only after the whole batch ends)."""
        unsent = (task for task in self.plan.tasks if task.index not in finished)
        rows = [
            failed(task, "rejected", task.route, 0, ErrorInfo(type="rejected", message=f"{field}: {reason}"))
            for task, field, reason in over_context_window(unsent, counted, self.config)
        ]
        if rows:
            ctx.record(rows)
            finished.update(row.index for row in rows)
            ctx.logger.warning("%d tasks rejected: their counted prompt is over the context window", len(rows))

    def open_batches(self) -> list[ChunkRecord]:
        """Recorded batches still owing results (submitted or ended, not yet collected)."""
        return [chunk for chunk in self.ledger.chunks(self.key) if chunk.open and chunk.batch_id is not None]

    def unsubmitted_works(self) -> list[ChunkWork]:
        """Chunks with no batch recorded yet: never submitted, or a create interrupted by a crash."""
        submitted = {chunk.chunk_key for chunk in self.open_batches()}
        return [work for work in self.chunk_works() if work.key not in submitted]

    # --- the phases: every entry point composes these, and only these change the run's status ----------------

    def begin(self, lanes: Lanes) -> float:
        """Begin sending: the plan's warnings, the estimate (refused over the budget), status `running`."""
        for warning in self.plan.warnings:
            lanes.ctx.logger.warning("%s", warning.removeprefix("warning: "))
        estimate = self.estimate(lanes)
        self.ledger.set_run_status(self.key, "running")
        return estimate

    async def submit(self, lanes: Lanes, work: ChunkWork) -> ChunkRecord | None:
        """The chunk's batch, created exactly once (a retry re-attaches to the recorded one)."""
        return await lanes.batch.submit(work)

    async def collect(self, lanes: Lanes, record: ChunkRecord, *, wait: bool = True) -> bool:
        """Collect one batch once it has ended: waiting for it (cancelled at the batch timeout), or, without
        `wait`, only if it has already ended. True when it was collected."""
        if wait:
            await lanes.batch.wait_and_collect(record)
            return True
        return await lanes.batch.collect_if_ended(record)

    async def send_realtime(self, lanes: Lanes) -> int:
        """Send the realtime-route tasks without a finished row; returns how many were sent."""
        tasks = self.realtime_tasks()
        await lanes.realtime.run(tasks)
        return len(tasks)

    async def send_leftovers(self, lanes: Lanes) -> int:
        """One round of `leftovers()` sent realtime; returns how many were sent."""
        tasks = self.leftovers()
        await lanes.realtime.run(tasks)
        return len(tasks)

    def park(self) -> list[str]:
        """While batches are open, the run waits for a later collect: status `submitted`. Returns their ids."""
        running = [chunk.batch_id for chunk in self.open_batches() if chunk.batch_id is not None]
        if running:
            self.ledger.set_run_status(self.key, "submitted")
        return running

    # --- the phases in order ---------------------------------------------------------------------------------

    async def send(self, lanes: Lanes, phases: Phases | None = None, *, wait: bool = True) -> bool:
        """The run loop: begin, both lanes at once, park if batches are left open, then the leftovers realtime.

        Every entry point sends through here: `phases` says how each phase is called (directly by default, or
        as a Prefect task run by the flow). True when every batch has been collected; False when some were
        left running (wait=False) for a later `collect_once`.
        """
        phases = phases or DIRECT_PHASES
        await phases.begin(self, lanes)
        unfinished: dict[str, ApiError] = {}
        await all_or_none(self._batch_lane(lanes, phases, wait, unfinished), self._realtime_lane(lanes, phases))
        if unfinished:
            # The realtime lane has finished; so do the rows that are in no open batch. Then the run stops short
            # of its output, parked with its open batches for the same command to collect.
            await self._leftovers(lanes, phases)
            await phases.park(self)
            raise self._unfinished(unfinished)
        if await phases.park(self):
            return False
        await self._leftovers(lanes, phases)
        return True

    async def collect_once(self, lanes: Lanes, phases: Phases | None = None, *, wait: bool = False) -> list[str]:
        """Collect a run whose process is gone (`batches collect`, the `batch-collect` flow): submit chunks whose
        create was interrupted, collect every batch that has ended (every batch with `wait`), park if some still
        run, else send the leftovers realtime. Returns the batches still running (empty: ready to finish).

        Resubmitted rows are not waited for without `wait`: the next collect finishes their batch. The status
        stays as it was until `finish`, so a collector that dies leaves the run to the next one.
        """
        phases = phases or DIRECT_PHASES
        await phases.estimate(self, lanes)
        lanes.batch.wait_for_resubmissions = wait
        await all_or_none(*(self._submit(lanes, phases, work) for work in self.unsubmitted_works()))
        await all_or_none(*(self._collect(lanes, phases, record, wait) for record in self.open_batches()))
        running = await phases.park(self)
        if not running:
            await self._leftovers(lanes, phases)
        return running

    async def _submit(self, lanes: Lanes, phases: Phases, work: ChunkWork) -> None:
        await phases.submit(self, lanes, work)

    async def _collect(self, lanes: Lanes, phases: Phases, record: ChunkRecord, wait: bool) -> None:
        await phases.collect(self, lanes, record, wait)

    async def _batch_lane(self, lanes: Lanes, phases: Phases, wait: bool, unfinished: dict[str, ApiError]) -> None:
        async def chunk(work: ChunkWork) -> None:
            try:
                record = await phases.submit(self, lanes, work)
                if record is not None and wait:
                    await phases.collect(self, lanes, record, True)
            except ApiError as exc:
                # One batch's calls failing after every retry say nothing of the other batches, and must never
                # stop the realtime lane: the batch stays open in the ledger, for the run to report at the end.
                unfinished[work.key] = exc
                lanes.ctx.logger.warning("chunk %s: %s", work.key, self._unfinished_reason(work.key, exc))

        works = self.chunk_works()
        if works:
            await all_or_none(*(chunk(work) for work in works))
            progress = lanes.ctx.progress
            lanes.ctx.logger.info(
                "batch lane: %s submitted, %d ended; %d rows succeeded, %d failed",
                plural(progress.batches_submitted, "batch"),
                progress.batches_ended,
                progress.batch_rows_done,
                progress.batch_rows_failed,
            )

    def _unfinished_reason(self, chunk_key: str, exc: ApiError) -> str:
        chunk = self.ledger.chunk(self.key, chunk_key)
        batch = f"batch {chunk.batch_id}" if chunk is not None and chunk.batch_id else "its batch create"
        return f"{batch}: {exc.message} (after every retry); it stays open in the ledger"

    def _unfinished(self, unfinished: dict[str, ApiError]) -> BatchUnfinishedError:
        key, exc = next(iter(unfinished.items()))
        others = f" (and {len(unfinished) - 1} more chunks)" if len(unfinished) > 1 else ""
        error = BatchUnfinishedError(
            f"chunk {key}: {self._unfinished_reason(key, exc)}{others}; every other task finished. Its rows are "
            "paid for and not sent again: run the same command again to collect it"
        )
        error.__cause__ = exc
        return error

    async def _realtime_lane(self, lanes: Lanes, phases: Phases) -> None:
        if self.realtime_tasks():
            sent = await phases.send_realtime(self, lanes)
            progress = lanes.ctx.progress
            lanes.ctx.logger.info(
                "realtime lane: %d tasks, %d succeeded, %d failed",
                sent,
                progress.realtime_done,
                progress.realtime_failed,
            )

    async def _leftovers(self, lanes: Lanes, phases: Phases) -> None:
        # Until none is left: an invalid_output row retried once may have another retry left.
        while self.leftovers():
            sent = await phases.send_leftovers(self, lanes)
            lanes.ctx.logger.info(
                "realtime fallback: %d tasks (unfinished by the batch lane, or answers to ask again) sent realtime",
                sent,
            )

    # --- output ------------------------------------------------------------------------------------------------

    def rows(self) -> Iterator[TaskResult]:
        """One row per input record, in input order: ledger results merged with rejections."""
        return in_input_order(((row.index, row) for row in self.ledger.results(self.key)), self.plan.rejections)

    def output_rows(self, *observers: Callable[[dict[str, Any]], object]) -> Iterator[bytes]:
        """One row per input record, in input order, as its output JSON: ledger rows as stored, merged with the
        rejections; each row is handed, decoded, to every observer before it is yielded. Raises after the last row
        when a planned task has no row."""
        # The plan's tasks walked beside the rows, both in index order: a set of every finished index would make
        # writing the output grow with the number of results (~60 MiB at 1M rows), where it should stay flat.
        # One generator from the ledger to the encoder: a layer more, re-yielding each (row, decoded) pair, was a
        # share of each row's merge CPU.
        planned = iter(self.plan.tasks)
        task = next(planned, None)
        missing: list[PlannedTask] = []
        for row in in_input_order(self.ledger.result_json(self.key), self.plan.rejections):
            if isinstance(row, bytes):
                raw, decoded = row, orjson.loads(row)
            else:
                decoded = row.model_dump(mode="json")
                raw = orjson.dumps(decoded)
            for observe in observers:
                observe(decoded)
            index = decoded["index"]
            while task is not None and task.index < index:
                missing.append(task)
                task = next(planned, None)
            if task is not None and task.index == index:
                task = next(planned, None)
            yield raw
            crash_point("output.partial")  # killed with the output part written
        if task is not None:
            missing.append(task)
            missing.extend(planned)
        if missing:
            raise RuntimeError(f"{len(missing)} tasks have no result (first: {missing[0].task_id}); not writing")

    def finish(self, observe: Callable[[dict[str, Any]], object] | None = None) -> RunSummary:
        """Finish: write the merged output atomically, mark the run complete, and return its summary.

        One pass over the ledger: each row is written as stored and counted into the summary on the way (and
        handed, decoded, to `observe`: the flow's artifacts); the summary, which the output puts first, is then
        written with the rows after it.
        """
        crash_point("output.before")
        write_at = time.time()
        # Everything below comes from the ledger, so any process (a resumed run, `collect`, a re-run of a
        # completed run) writes the same bytes.
        started_at = self.record.started_at
        batches = [
            (c.chunk_key, c.batch_id, c.request_counts, c.status == "lost")
            for c in self.ledger.chunks(self.key)
            if c.batch_id
        ]
        output_format = self.options.output_format
        tally = Tally(self.config)
        observers = (tally.add,) if observe is None else (tally.add, observe)
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        # A 1 MiB buffer: with the default 8 KiB, a write call every ~11 rows was ~1.5 µs of each row's ~13 µs of
        # writing the output (`bench plan`, 100k rows).
        with tempfile.TemporaryFile(dir=self.output_path.parent, buffering=_ROWS_BUFFER) as rows:
            rows.writelines(encode_rows(self.output_rows(*observers), output_format))
            # The invocation that completes the run records its phases; a rewrite gets them back.
            kept = self.ledger.keep_durations(self.key, self.timeline.durations(write_at, time.time()))
            durations, finished_at = kept["durations_s"], kept["finished_at"]
            summary = tally.summary(
                run_key=self.key,
                input_path=self.record.input_path,
                output_path=self.record.output_path,
                simulated=self.options.simulated,
                started_at=started_at,
                finished_at=finished_at,
                total=self.plan.total_records,
                batches=batches,
                durations_s=durations,
            )
            rows.seek(0)
            body = iter(functools.partial(rows.read, _ROWS_BUFFER), b"")
            output = itertools.chain([encode_head(summary, output_format)], body, [encode_tail(output_format)])
            atomic_write_chunks(self.output_path, output)
        crash_point("output.renamed")
        self.ledger.set_run_status(self.key, "complete", finished_at)
        crash_point("run.complete")
        return summary


@dataclass(frozen=True, slots=True)
class Timeline:
    """When this invocation of a run started, began planning and had planned (epoch seconds): with the write,
    its phases cover the whole wall time."""

    launched_at: float
    prepare_at: float
    planned_at: float

    def durations(self, write_at: float, written_at: float) -> dict[str, Any]:
        """`durations_s` (start-up, plan, send: both lanes and the leftovers, write; total = their sum, the
        invocation's wall time up to the output's rename) and `finished_at`."""
        phases = {
            "startup": self.prepare_at - self.launched_at,
            "plan": self.planned_at - self.prepare_at,
            "send": write_at - self.planned_at,
            "write": written_at - write_at,
        }
        durations = {phase: round(seconds, 3) for phase, seconds in phases.items()}
        durations["total"] = round(sum(durations.values()), 3)
        return {"durations_s": durations, "finished_at": written_at}


@dataclass(frozen=True, slots=True)
class Lanes:
    """The two lanes of one run, over one client and one lane context."""

    batch: BatchLane
    realtime: RealtimeLane

    @property
    def ctx(self) -> LaneContext:
        return self.batch.ctx


class Phases(Protocol):
    """How each phase of a run is called: directly (`run()`, `batches collect`), or as a Prefect task run each
    (the flows). Every implementation is one call into `Run` per phase, nothing more."""

    async def begin(self, run: Run, lanes: Lanes) -> float: ...
    async def estimate(self, run: Run, lanes: Lanes) -> float: ...
    async def submit(self, run: Run, lanes: Lanes, work: ChunkWork) -> ChunkRecord | None: ...
    async def collect(self, run: Run, lanes: Lanes, record: ChunkRecord, wait: bool) -> bool: ...
    async def send_realtime(self, run: Run, lanes: Lanes) -> int: ...
    async def send_leftovers(self, run: Run, lanes: Lanes) -> int: ...
    async def park(self, run: Run) -> list[str]: ...
    async def finish(self, run: Run, observe: Callable[[dict[str, Any]], object] | None = None) -> RunSummary: ...


class DirectPhases:
    """Each phase called in this process: `run()`, `batches collect`, and `batch-engine run` without Prefect."""

    async def begin(self, run: Run, lanes: Lanes) -> float:
        return run.begin(lanes)

    async def estimate(self, run: Run, lanes: Lanes) -> float:
        return run.estimate(lanes)

    async def submit(self, run: Run, lanes: Lanes, work: ChunkWork) -> ChunkRecord | None:
        return await run.submit(lanes, work)

    async def collect(self, run: Run, lanes: Lanes, record: ChunkRecord, wait: bool) -> bool:
        return await run.collect(lanes, record, wait=wait)

    async def send_realtime(self, run: Run, lanes: Lanes) -> int:
        return await run.send_realtime(lanes)

    async def send_leftovers(self, run: Run, lanes: Lanes) -> int:
        return await run.send_leftovers(lanes)

    async def park(self, run: Run) -> list[str]:
        return run.park()

    async def finish(self, run: Run, observe: Callable[[dict[str, Any]], object] | None = None) -> RunSummary:
        return run.finish(observe)


DIRECT_PHASES = DirectPhases()


# --- which run a `run` opens -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Opened:
    record: RunRecord
    config: Config
    plan: Plan
    superseded: tuple[RunRecord, ...] = ()  # unfinished runs of the same input this one replaces
    idle: tuple[RunRecord, ...] = ()  # unfinished runs of the same input that sent nothing: simply replaced


def _plan_at(input_path: Path, config: Config, started_at: float, mode: Route | None) -> Plan:
    # Planning with the run's own start time keeps deadline-based routing, and so the chunks, stable.
    now = datetime.fromtimestamp(started_at, UTC)
    return plan_file(input_path, config, now, route=mode, on_batch_work=preload_sdk)


def _recorded_config(record: RunRecord, fallback: Config) -> Config:
    snapshot = record.options.get(_CONFIG)
    return fallback if snapshot is None else Config.model_validate(snapshot)


def _open_run(ledger: RunLedger, input_path: Path, output_path: Path, config: Config, options: RunOptions) -> _Opened:
    digest = file_digest(input_path)
    # Absolute paths: `collect` and `batches collect` reopen the run from any working directory.
    paths = str(input_path.resolve()), str(output_path.resolve())
    if options.resume_run is not None:
        record = _find_run(ledger, options.resume_run)
        recorded = effective_config(_recorded_config(record, config), options)
        mode = record.options.get("mode")
        plan = _plan_at(input_path, recorded, record.started_at, mode)
        if run_identity(digest, plan) != record.run_key:
            raise LedgerError(
                f"run {record.run_key}: {input_path} no longer gives the requests that run sent (the file, or the "
                "engine's rendering, changed); it cannot be finished as it was: run the file as a new run"
            )
        record = ledger.begin(record.run_key, *paths, record.options, record.started_at)
        return _Opened(record, recorded, plan)
    # The unfinished runs of this input: one that sends the same requests is this run.
    unfinished = [
        record
        for record in ledger.runs()
        if record.status in ("running", "submitted") and _same_input(record, digest, paths[0])
    ]
    for record in unfinished:
        plan = _plan_at(input_path, config, record.started_at, options.mode)
        if run_identity(digest, plan) == record.run_key:
            record = ledger.begin(record.run_key, *paths, record.options, record.started_at)
            return _Opened(record, config, plan)
    now = time.time()
    plan = _plan_at(input_path, config, now, options.mode)
    key = run_identity(digest, plan)
    existing = ledger.run(key)
    if existing is not None:  # a completed run of the same requests: its output is written again
        existing = ledger.begin(key, *paths, existing.options, existing.started_at)
        plan = _plan_at(input_path, config, existing.started_at, options.mode)
        return _Opened(existing, config, plan)
    busy = [record for record in unfinished if ledger.has_work(record.run_key)]
    if busy and not options.supersede:
        raise _changed(ledger, busy[0], input_path)
    record = ledger.begin(key, *paths, _stored_options(options, config, digest), now)
    # Unfinished runs that sent nothing are simply replaced (`Run.prepare`); the others hand over their work
    # (`_supersede`).
    idle = tuple(run for run in unfinished if run not in busy)
    return _Opened(record, config, plan, tuple(busy), idle)


def _same_input(record: RunRecord, digest: str, input_path: str) -> bool:
    recorded = record.options.get(_INPUT_DIGEST)
    # A run recorded before runs kept their input's digest (and keyed by the config): the same file path is
    # taken as the same input, so an upgrade never starts a silent second run beside it.
    return recorded == digest if recorded is not None else record.input_path == input_path


def _find_run(ledger: RunLedger, key: str) -> RunRecord:
    record = ledger.run(key)
    matches = [record] if record is not None else [r for r in ledger.runs() if key and r.run_key.startswith(key)]
    if len(matches) != 1:
        what = "is ambiguous" if matches else "is not"
        raise LedgerError(f"--resume-run {key!r} {what} a run in {ledger.where}")
    return matches[0]


def _changed(ledger: RunLedger, record: RunRecord, input_path: Path) -> RunChangedError:
    open_batches = [c.batch_id for c in ledger.chunks(record.run_key) if c.open and c.batch_id]
    batches = f"open batches: {', '.join(open_batches)}" if open_batches else "no open batch"
    return RunChangedError(
        f"run {record.run_key} of {input_path} is unfinished ({batches}) and sent other requests than this run "
        f"would (its config, mode or routing changed); finish it as it was with `--resume-run {record.run_key}`, "
        "or pass `--supersede` to keep its batches and results for every unchanged task and send only what changed"
    )


def _supersede(ledger: RunLedger, opened: _Opened, options: RunOptions) -> _Opened:
    """Take the work of the unfinished runs `opened` replaces: their batches and results of unchanged tasks."""
    digests = request_digests(opened.plan)
    for old in opened.superseded:
        old_lease = RunLease(ledger, old.run_key)
        old_lease.take()  # a live process on the old run must not see its batches move
        try:
            if any(c.status == "intent" and c.sent_at is not None for c in ledger.chunks(old.run_key)):
                raise LedgerError(
                    f"run {old.run_key} has a batch create whose outcome is unknown; finish it first with "
                    f"`--resume-run {old.run_key}`"
                )
            old_config = effective_config(_recorded_config(old, opened.config), options)
            old_plan = _plan_at(Path(old.input_path), old_config, old.started_at, old.options.get("mode"))
            old_digests = request_digests(old_plan)
            unchanged = {i for i, d in old_digests.items() if digests.get(i) == d}
            moved = ledger.supersede(old.run_key, opened.record.run_key, unchanged, time.time())
            log.warning(
                "run %s supersedes run %s: %d of %d tasks unchanged; %d open batches kept (%s)",
                opened.record.run_key,
                old.run_key,
                len(unchanged),
                len(opened.plan.tasks),
                len(moved),
                ", ".join(moved) or "none",
            )
        finally:
            old_lease.release()
    return opened


async def run(
    input_path: Path | str,
    output_path: Path | str,
    *,
    api: ApiSettings,
    config: Config,
    options: RunOptions | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    progress: Progress | None = None,
    policy: RetryPolicy | None = None,
    launched_at: float | None = None,
) -> RunSummary:
    """Run a task file end to end (or resume it), write the merged output, and return the run summary.

    The phases in order, in this process, without Prefect: plan, send (begin, both lanes, leftovers), finish.
    A completed run is not sent again: its output is rewritten from the ledger without any API call.
    `launched_at`: when the invocation started (see `Run.prepare`).
    """
    prepared = Run.prepare(
        Path(input_path), Path(output_path), config, options or RunOptions(), launched_at=launched_at
    )
    try:
        if not prepared.completed:
            async with prepared.lanes(api, logger=logger, progress=progress, policy=policy) as lanes:
                await prepared.send(lanes)
        return prepared.finish()
    finally:
        prepared.close()
