"""The batch lane: for each chunk write the intent, create the batch once, poll with backoff until it ends or
the lane's deadline (then cancel), stream the results into the ledger, and resubmit what is retryable.

Rows this lane does not finish (cancelled at the deadline under the `realtime` policy, or retryable with no
time left for another batch) stay unfinished in the ledger; the runner sends them through the realtime lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, overload

from batch_engine.client import (
    RETRY_AFTER_JITTER,
    BatchBody,
    BatchInfo,
    BatchRow,
    batch_results,
    cancel_batch,
    create_batch,
    list_batches,
    retrieve_batch,
)
from batch_engine.crashpoints import crash_point
from batch_engine.errors import ApiError, LedgerError, PermanentApiError, TransientApiError
from batch_engine.lanes import LaneContext, all_or_none
from batch_engine.lanes.limiter import RateLimiter
from batch_engine.models import ErrorInfo
from batch_engine.planning import PlannedTask
from batch_engine.planning.outcome import FinishedRow, failed, succeeded
from batch_engine.planning.rows import RowEncoder
from batch_engine.state.ledger import ChunkRecord

if TYPE_CHECKING:
    from batch_engine.client import AsyncClient

T = TypeVar("T")
# A generator of our own: jitter must not disturb (or depend on) the global random state.
_JITTER = random.Random()
_UNLIMITED = 10**12  # the Batches API limits requests per minute only
_FLUSH_ROWS = 1000  # ledger transaction size while streaming results
_POLL_GROWTH = 1.5
# Creates in flight at once: their uploads (up to 256 MB each) overlap, and the next chunk's body is produced while
# the previous one is still being taken in.
_CONCURRENT_CREATES = 3
# How far outside its send window a batch of ours may seem to have been created (clock skew with the API).
_RECONCILE_SKEW_S = 60.0


@dataclass(frozen=True, slots=True)
class ChunkWork:
    """A chunk of batch rows to submit (or re-attach to) under a stable key."""

    key: str
    task_indexes: tuple[int, ...]


class _CreateGate:
    """Up to `limit` creates at once (`shared`), or one reconciliation with no create in flight (`alone`).

    A reconciliation waiting for its turn holds back new creates, so it is not starved by them.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._creating = 0
        self._waiting_alone = 0  # reconciliations waiting or running: no new create starts meanwhile
        self._turns = asyncio.Lock()  # fair (FIFO): one reconciliation at a time, in the order they came
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._waiting_alone and self._creating < self._limit)
            self._creating += 1
        try:
            yield
        finally:
            async with self._changed:
                self._creating -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_alone += 1
        try:
            # First come, first served: the create whose answer was lost first is reconciled first.
            async with self._turns:
                async with self._changed:
                    await self._changed.wait_for(lambda: not self._creating)
                yield
        finally:
            async with self._changed:
                self._waiting_alone -= 1
                self._changed.notify_all()


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


class BatchLane:
    """Submits, waits for and collects the batches of one run."""

    def __init__(
        self,
        ctx: LaneContext,
        *,
        deadline: float,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = _sleep,
    ) -> None:
        self.ctx = ctx
        self.deadline = deadline  # epoch seconds: past it, unfinished batches are cancelled
        self.clock = clock
        self.sleep = sleep
        limits = ctx.config.limits
        self.poll_initial_s = min(limits.batch_poll_initial_s, limits.batch_poll_interval_s)
        self.poll_interval_s = limits.batch_poll_interval_s
        self.timeout_s = limits.batch_timeout_s
        self.rpm = RateLimiter(limits.batch_rpm, _UNLIMITED, _UNLIMITED)
        self.rows = RowEncoder()  # each distinct frame (its ~5 KB system prompt) encoded once for all creates
        # Several creates at once (each streams its body, so the uploads overlap), but none while a create's
        # outcome is being reconciled: a fresh, not-yet-recorded batch of the same size could be mistaken for the
        # lost one.
        self._gate = _CreateGate(_CONCURRENT_CREATES)
        # False in `collect`: a resubmitted batch is only created, and a later collect finishes it, so no
        # process waits hours for it.
        self.wait_for_resubmissions = True

    @property
    def _client(self) -> AsyncClient:
        """The SDK client: each entry point below has it loaded off the event loop first (`Connection.load_sdk`)."""
        return self.ctx.api.sdk

    @overload
    async def _slot(self, call: None = None, requests: int = 1) -> None: ...
    @overload
    async def _slot(self, call: Awaitable[T], requests: int = 1) -> T: ...
    async def _slot(self, call: Awaitable[T] | None = None, requests: int = 1) -> T | None:
        """Wait for room under the Batches RPM (shared by every batch endpoint, polling included), then call."""
        for _ in range(requests):
            await self.rpm.acquire(0)
        return None if call is None else await call

    async def run(self, works: Sequence[ChunkWork]) -> None:
        """Process every chunk concurrently (each waits on its own batch)."""
        await all_or_none(*(self.process(work) for work in works))

    async def process(self, work: ChunkWork) -> None:
        record = await self.submit(work)
        if record is not None:
            await self.wait_and_collect(record)

    # --- submit --------------------------------------------------------------------------------------------

    async def submit(self, work: ChunkWork) -> ChunkRecord | None:
        """The chunk's batch: the recorded one, or a new one created exactly once. None if it cannot be created."""
        await self.ctx.api.load_sdk()
        ledger, key = self.ctx.ledger, self.ctx.run_key
        record = ledger.chunk(key, work.key)
        # An intent whose create was sent (a crash, or a lost answer, since): the batch may exist. One never sent
        # cannot have a batch, so nothing is looked for (and nobody else's batch can be mistaken for it).
        ambiguous = record is not None and record.status == "intent" and record.sent_at is not None
        if record is None:
            indexes = self._within_budget(work)
            if not indexes:
                return None
            record = ledger.record_intent(key, work.key, indexes, self.clock())
            crash_point("batch.intent")
        if record.batch_id is not None or record.status == "failed":
            return record if record.batch_id is not None else None
        if ambiguous:
            # An earlier process wrote the intent and died before recording an id: the batch may exist.
            async with self._gate.alone():
                adopted = await self._reconcile(record)
                if adopted is not None:
                    self._record_batch_id(record, adopted)
            if adopted is not None:
                return self._recorded(record, adopted, adopted=True)
        while True:
            try:
                info, was_adopted = await self.ctx.policy.call(lambda: self._create_once(record))
            except ApiError as exc:
                if isinstance(exc, TransientApiError) and exc.status == 429 and await self._wait_for_room(exc):
                    continue
                self._create_failed(record, exc)
                return None
            return self._recorded(record, info, adopted=was_adopted)

    async def _wait_for_room(self, exc: TransientApiError) -> bool:
        """After a 429 on create, wait for room (False at the lane deadline).

        Batch limits cap the requests waiting in the processing queue across all batches, and a create over the cap
        is a 429 (docs: /api/rate-limits). Room opens as earlier batches end, so the chunk waits for it: sending its
        rows realtime instead would pay twice the price for what the queue will take later.
        """
        left = self.deadline - self.clock()
        if left <= 0:
            return False
        wait = min(left, exc.retry_after_s if exc.retry_after_s is not None else self.poll_interval_s)
        self.ctx.logger.warning("batch create refused (%s); waiting %.1fs for room in the queue", exc.message, wait)
        await self.sleep(wait)
        return True

    def _within_budget(self, work: ChunkWork) -> tuple[int, ...]:
        """The chunk cut to what the budget still allows (each row's most it can cost, at batch prices); the rest
        is skipped."""
        budget, estimator = self.ctx.budget, self.ctx.estimator
        if not budget.limited:
            return work.task_indexes
        kept = 0
        for index in work.task_indexes:
            if not budget.reserve(estimator.max_cost(self.ctx.tasks[index], "batch")):
                break
            kept += 1
        skipped = work.task_indexes[kept:]
        if skipped:
            refusal = budget.refusal()
            self.ctx.record(
                [
                    failed(self.ctx.tasks[i], "skipped_budget", "batch", self.ctx.attempts.get(i, 0), refusal)
                    for i in skipped
                ]
            )
            self.ctx.logger.warning("chunk %s: %d rows skipped to stay within the budget", work.key, len(skipped))
        return work.task_indexes[:kept]

    def _settle(self, record: ChunkRecord, actual_usd: float) -> None:
        """Swap the chunk's reservation for what its rows really cost."""
        budget, estimator = self.ctx.budget, self.ctx.estimator
        if budget.limited:
            estimate = sum(estimator.max_cost(self.ctx.tasks[i], "batch") for i in record.task_indexes)
            budget.settle(estimate, actual_usd)

    async def _create_once(self, record: ChunkRecord) -> tuple[BatchInfo, bool]:
        """One create, its batch id recorded before another chunk's reconciliation can look (the batch, and
        whether it was adopted from an interrupted attempt)."""
        tasks, encode, size = self.ctx.tasks, self.rows.row, self.rows.size
        indexes = record.task_indexes
        body = BatchBody(
            lambda: map(encode, map(tasks.__getitem__, indexes)), lambda: map(size, map(tasks.__getitem__, indexes))
        )
        await self._slot()
        try:
            async with self._gate.shared():
                self.ctx.lease_check()
                self.ctx.ledger.record_send(record.run_key, record.chunk_key, self.clock())
                crash_point("batch.create.before")
                info = await create_batch(self._client, body)
                crash_point("batch.create.after")
                self._record_batch_id(record, info)
                return info, False
        except ApiError as exc:
            if not _outcome_unknown(exc):
                raise
            # The create may have landed (the API has no idempotency key): adopt it rather than pay twice, once
            # no other create is in flight (their batches are recorded by then, so none is taken for this one).
            async with self._gate.alone():
                sent = self.ctx.ledger.chunk(record.run_key, record.chunk_key)
                adopted = await self._reconcile(sent or record)
                if adopted is None:
                    raise
                self._record_batch_id(record, adopted)
            return adopted, True

    async def _reconcile(self, record: ChunkRecord) -> BatchInfo | None:
        """The batch an interrupted create made for this chunk, or None when the API has none.

        Only a batch proven ours is adopted. Candidates are batches no run in the ledger knows, created inside
        the chunk's send window (from its first create sent to its last plus a request timeout, widened by the
        clock skew), with the chunk's request count. An ended candidate is ours when its results' custom_ids
        are exactly the chunk's; a running candidate when it is the only candidate left and no other create of
        the chunk's size is in doubt (in any unfinished run of the ledger). Otherwise running candidates are
        waited for until they end (at most until the lane deadline), then told apart by their results. Two
        batches that both carry the chunk's rows need a human: LedgerError.
        """
        first_sent = record.sent_at if record.sent_at is not None else record.intent_at
        last_sent = record.last_sent_at if record.last_sent_at is not None else self.clock()
        window_end = last_sent + self.ctx.config.limits.request_timeout_s + _RECONCILE_SKEW_S
        found = await self.ctx.policy.call(
            lambda: self._slot(list_batches(self._client, created_after=first_sent - _RECONCILE_SKEW_S))
        )
        known = self.ctx.ledger.known_batch_ids()
        candidates = [
            b for b in found if b.id not in known and b.total == len(record.task_indexes) and b.created_at <= window_end
        ]
        custom_ids = {self.ctx.tasks[index].task_id for index in record.task_indexes}
        while candidates:
            matches: list[BatchInfo] = []
            running: list[BatchInfo] = []
            for candidate in candidates:
                if candidate.status != "ended":
                    running.append(candidate)
                elif not candidate.archived and await self._carries(candidate.id, custom_ids):
                    matches.append(candidate)
            if len(matches) > 1:
                ids = ", ".join(b.id for b in matches)
                raise LedgerError(
                    f"chunk {record.chunk_key} of run {record.run_key}: {len(matches)} batches the ledger does not "
                    f"know carry its rows ({ids}), so it was submitted more than once; delete all but one with "
                    "`batch-engine batches delete BATCH_ID`, then re-run: the one left is adopted"
                )
            # A lone running candidate is ours only if no other create of this size is in doubt: else it may be
            # that create's batch, and only its results (once it ends) can tell.
            lone = running[0] if len(running) == 1 and not self._peers_in_doubt(record) else None
            adopted = matches[0] if matches else lone
            if adopted is not None:
                self.ctx.logger.warning(
                    "chunk %s: adopted batch %s created by an interrupted attempt", record.chunk_key, adopted.id
                )
                return adopted
            if not running:
                return None
            if self.clock() >= self.deadline:
                ids = ", ".join(b.id for b in running)
                raise LedgerError(
                    f"chunk {record.chunk_key} of run {record.run_key}: its create may have landed, and "
                    f"{len(running)} unrecorded batches of its size are still running ({ids}); re-run once they "
                    "have ended (their results tell which is its own), or cancel them with "
                    "`batch-engine batches cancel BATCH_ID` and re-run"
                )
            self.ctx.logger.warning(
                "chunk %s: %d unrecorded batches of its size are running; waiting for them to end to tell which, "
                "if any, an interrupted create made",
                record.chunk_key,
                len(running),
            )
            await self.sleep(self.poll_interval_s)
            candidates = [await self._retrieve(b.id) for b in running]
        return None

    def _peers_in_doubt(self, record: ChunkRecord) -> bool:
        """Whether another chunk of the same size, of any unfinished run in the ledger, has a create whose
        outcome is unknown (sent, no batch recorded): its batch would be a candidate here too."""
        ledger, size = self.ctx.ledger, len(record.task_indexes)
        return any(
            chunk.status == "intent"
            and chunk.sent_at is not None
            and chunk.batch_id is None
            and len(chunk.task_indexes) == size
            and (chunk.run_key, chunk.chunk_key) != (record.run_key, record.chunk_key)
            for run in ledger.runs()
            if run.status in ("running", "submitted")
            for chunk in ledger.chunks(run.run_key)
        )

    async def _retrieve(self, batch_id: str) -> BatchInfo:
        return await self.ctx.policy.call(lambda: self._slot(retrieve_batch(self._client, batch_id)))

    async def _carries(self, batch_id: str, custom_ids: set[str]) -> bool:
        """Whether an ended batch's results are exactly the rows of `custom_ids` (a foreign batch fails at its
        first row not in the set)."""

        async def check() -> bool:
            await self._slot(requests=2)
            seen: set[str] = set()
            async with contextlib.aclosing(batch_results(self._client, batch_id)) as rows:
                async for row in rows:
                    if row.custom_id not in custom_ids:
                        return False
                    seen.add(row.custom_id)
            return seen == custom_ids

        return await self.ctx.policy.call(check)

    def _record_batch_id(self, record: ChunkRecord, info: BatchInfo) -> None:
        self.ctx.ledger.record_batch(record.run_key, record.chunk_key, info.id, info.created_at)

    def _recorded(self, record: ChunkRecord, info: BatchInfo, *, adopted: bool) -> ChunkRecord:
        crash_point("batch.resubmit.recorded" if "~" in record.chunk_key else "batch.recorded")
        for index in record.task_indexes:
            self.ctx.attempts[index] = self.ctx.attempts.get(index, 0) + 1
        self.ctx.progress.batches_submitted += 1
        self.ctx.logger.info(
            "batch %s %s for chunk %s (%d requests)",
            info.id,
            "adopted" if adopted else "created",
            record.chunk_key,
            len(record.task_indexes),
        )
        updated = self.ctx.ledger.chunk(record.run_key, record.chunk_key)
        assert updated is not None
        return updated

    def _create_failed(self, record: ChunkRecord, exc: ApiError) -> None:
        self.ctx.ledger.update_chunk(record.run_key, record.chunk_key, status="failed")
        self._settle(record, 0.0)
        if isinstance(exc, TransientApiError) and exc.status == 429:
            # Still no room in the batch queue at the deadline: the rows time out rather than go realtime.
            error = ErrorInfo(type="batch_queue_full", message=f"no room in the batch queue by the deadline: {exc}")
            rows = [
                failed(self.ctx.tasks[i], "timed_out", "batch", self.ctx.attempts.get(i, 0), error)
                for i in record.task_indexes
            ]
            self.ctx.record(rows)
            self.ctx.logger.error("chunk %s: %s", record.chunk_key, error.message)
        elif isinstance(exc, PermanentApiError):
            # The API refused the whole batch (400, 413...): no row can succeed as sent.
            error = ErrorInfo(type=exc.error_type or "invalid_request_error", message=exc.message)
            rows = [
                failed(self.ctx.tasks[i], "errored", "batch", self.ctx.attempts.get(i, 0), error)
                for i in record.task_indexes
            ]
            self.ctx.record(rows)
            self.ctx.logger.error("chunk %s: batch create refused: %s", record.chunk_key, exc.message)
        else:
            self.ctx.logger.warning(
                "chunk %s: batch create kept failing (%s); its rows go realtime", record.chunk_key, exc.message
            )

    # --- wait ----------------------------------------------------------------------------------------------

    async def collect_if_ended(self, record: ChunkRecord) -> bool:
        """Collect the batch if it has ended, is gone (404: marked lost, its rows sent again) or is past the
        deadline (cancelled first, as a waiting run would); True then. False, untouched, while it still runs."""
        assert record.batch_id is not None
        await self.ctx.api.load_sdk()
        if self.clock() < self.deadline:
            try:
                info = await self._retrieve(record.batch_id)
            except PermanentApiError as exc:
                if exc.status != 404:
                    raise
            else:
                if info.status != "ended":
                    return False
        await self.wait_and_collect(record)
        return True

    async def wait_and_collect(self, record: ChunkRecord) -> None:
        await self.ctx.api.load_sdk()
        try:
            info = await self.wait(record)
        except PermanentApiError as exc:
            if exc.status != 404:
                raise
            await self._lost(record)
            return
        await self.collect(record, info)

    async def _lost(self, record: ChunkRecord) -> None:
        """The recorded batch is gone from the API (404): mark it lost and send its unfinished rows again."""
        finished = self.ctx.ledger.finished_indexes(record.run_key)
        unfinished = tuple(index for index in record.task_indexes if index not in finished)
        self.ctx.ledger.update_chunk(record.run_key, record.chunk_key, status="lost")
        self._settle(record, 0.0)
        self.ctx.logger.warning(
            "batch %s of chunk %s: not found (404: deleted in the Console or by another tool); marked lost, its %d "
            "unfinished rows are sent again",
            record.batch_id,
            record.chunk_key,
            len(unfinished),
        )
        await self._resubmit(record, unfinished)

    async def wait(self, record: ChunkRecord) -> BatchInfo:
        """Poll until the batch ends; past the deadline cancel it first. Poll errors never fail tasks."""
        assert record.batch_id is not None
        batch_id = record.batch_id
        canceled = record.canceled_by_us
        # A cancel recorded by a process that died before sending it is sent again if the batch still runs.
        resend_cancel = canceled
        delay = self.poll_initial_s
        last_status: str | None = None
        while True:
            asked_s = 0.0  # the server's retry-after for this batch's next poll
            try:
                info = await self._slot(retrieve_batch(self._client, batch_id))
            except TransientApiError as exc:
                # Only this batch's polling backs off: a fault on one poll says nothing of the other batches,
                # and never holds the realtime lane.
                asked_s = exc.retry_after_s or 0.0
                self.ctx.logger.warning("batch %s: poll failed (%s); polling again", batch_id, exc.message)
                self._observe_refusal(exc)
            else:
                if info.status != last_status:
                    self.ctx.logger.info("batch %s: %s %s", batch_id, info.status, _counts(info))
                    self.ctx.ledger.update_chunk(
                        record.run_key,
                        record.chunk_key,
                        status="ended" if info.status == "ended" else None,
                        request_counts=info.request_counts,
                    )
                    last_status = info.status
                crash_point("batch.polled")
                if info.status == "ended":
                    self.ctx.progress.batches_ended += 1
                    crash_point("batch.ended")
                    return info
            now = self.clock()
            if resend_cancel and last_status == "in_progress":
                resend_cancel = False
                await self._cancel(record)
            if not canceled and now >= self.deadline:
                await self._cancel(record)
                canceled = True
                delay = self.poll_initial_s
                continue
            wait = max(delay * _JITTER.uniform(0.8, 1.2), asked_s * (1.0 + _JITTER.uniform(0, RETRY_AFTER_JITTER)))
            if not canceled:
                wait = min(wait, max(0.0, self.deadline - now))
            await self.sleep(wait)
            delay = min(delay * _POLL_GROWTH, self.poll_interval_s)

    def _observe_refusal(self, exc: TransientApiError) -> None:
        """A 429 from the batch endpoints corrects the lane's RPM bucket from its rate-limit headers.

        The batch endpoints share one RPM, polling included, and answer with their own
        anthropic-ratelimit-requests-* headers (docs: /api/rate-limits, Message Batches): a lane configured for more
        than the account has learns the real limit instead of polling into 429s.
        """
        if exc.status == 429:
            self.rpm.observe(exc.headers)

    async def _cancel(self, record: ChunkRecord) -> None:
        assert record.batch_id is not None
        batch_id = record.batch_id
        self.ctx.logger.warning("batch %s: not ended by the batch timeout; cancelling it", batch_id)
        # Recorded first: a re-run after a crash here must treat cancelled rows as ours, not the API's.
        self.ctx.ledger.update_chunk(record.run_key, record.chunk_key, canceled_by_us=True)
        crash_point("batch.cancel.recorded")
        await self.ctx.policy.call(lambda: self._slot(cancel_batch(self._client, batch_id)))
        crash_point("batch.canceled")

    # --- collect -------------------------------------------------------------------------------------------

    async def collect(self, record: ChunkRecord, info: BatchInfo) -> None:
        """Stream the results into the ledger; then resubmit the retryable rows if time allows."""
        fresh = self.ctx.ledger.chunk(record.run_key, record.chunk_key)
        record = fresh or record
        if record.status == "collected":
            # Collected already (a Prefect retry of this step, another collector): its rows are in the ledger.
            self.ctx.logger.info("chunk %s: batch %s already collected", record.chunk_key, record.batch_id)
            return
        if info.archived:
            self._archived(record)
            return
        retry, spent = await self.ctx.policy.call(lambda: self._collect_once(record, info))
        crash_point("batch.results.stored")
        self.ctx.ledger.update_chunk(record.run_key, record.chunk_key, status="collected")
        crash_point("batch.collected")
        self._settle(record, spent)
        await self._resubmit(record, tuple(task.index for task in retry))

    async def _resubmit(self, record: ChunkRecord, indexes: tuple[int, ...]) -> None:
        """Send `indexes` of the chunk in a batch of their own if time allows; else they go realtime."""
        if not indexes:
            return
        retry = indexes
        remaining = self.deadline - self.clock()
        if remaining >= self.timeout_s / 2:
            work = ChunkWork(_next_key(record.chunk_key), indexes)
            self.ctx.logger.info("chunk %s: resubmitting %d rows as %s", record.chunk_key, len(retry), work.key)
            crash_point("batch.resubmit.before")
            if self.wait_for_resubmissions:
                await self.process(work)
            else:
                await self.submit(work)
        else:
            self.ctx.logger.info(
                "chunk %s: %d retryable rows go realtime (%.0fs left of the batch timeout)",
                record.chunk_key,
                len(retry),
                remaining,
            )

    def _archived(self, record: ChunkRecord) -> None:
        """Results past the API's 29-day retention cannot be fetched: the chunk's unfinished rows end errored."""
        finished = self.ctx.ledger.finished_indexes(record.run_key)
        error = ErrorInfo(
            type="results_archived",
            message=f"batch {record.batch_id} ended, but its results are past the API's 29-day retention window "
            "and can no longer be downloaded; run these tasks again",
        )
        rows = [
            failed(self.ctx.tasks[i], "errored", "batch", self.ctx.attempts.get(i, 0), error, batch_id=record.batch_id)
            for i in record.task_indexes
            if i not in finished
        ]
        self.ctx.record(rows)
        self.ctx.ledger.update_chunk(record.run_key, record.chunk_key, status="collected")
        self._settle(record, 0.0)
        self.ctx.logger.error(
            "batch %s: results archived (older than 29 days); %d rows reported errored", record.batch_id, len(rows)
        )

    async def _collect_once(self, record: ChunkRecord, info: BatchInfo) -> tuple[list[PlannedTask], float]:
        assert record.batch_id is not None
        expected = {self.ctx.tasks[index].task_id: self.ctx.tasks[index] for index in record.task_indexes}
        seen: set[str] = set()
        rows: list[FinishedRow] = []
        # Rows finish when their batch ended, not when someone collected them: the waiting flow and a later
        # `collect` then write the same output, and the batch duration does not depend on polling.
        ended_at = self.clock() if info.ended_at is None else min(info.ended_at, self.clock())
        retry: list[PlannedTask] = []
        spent = 0.0
        # A superseded run's batch (its chunk key says `@run`) also carries the rows of tasks whose request changed:
        # billed all the same, so their usage is logged, but their results are not this run's.
        superseded = "@" in record.chunk_key
        billed_only: list[FinishedRow] = []
        await self._slot(requests=2)  # the SDK retrieves the batch, then downloads its results
        async for row in batch_results(self._client, record.batch_id):
            task = expected.get(row.custom_id)
            if task is None and superseded and row.message is not None and row.custom_id not in seen:
                changed = self.ctx.by_task_id.get(row.custom_id)
                if changed is not None:
                    seen.add(row.custom_id)
                    billed_only.append(
                        succeeded(changed, row.message, "batch", 0, self.ctx.config, batch_id=record.batch_id)
                    )
                    continue
            if task is None or row.custom_id in seen:
                self.ctx.logger.warning("batch %s: unexpected result row for %r", record.batch_id, row.custom_id)
                continue
            seen.add(row.custom_id)
            outcome = self._outcome(task, row, record)
            if isinstance(outcome, FinishedRow):
                rows.append(outcome)
                spent += outcome.cost_usd
            elif outcome == "retry":
                retry.append(task)
            if len(rows) >= _FLUSH_ROWS:
                self.ctx.record(rows, at=ended_at)
                rows = []
                crash_point("batch.results.partial")
        self.ctx.log_billed_only(billed_only, at=ended_at)
        self.ctx.record(rows, at=ended_at)
        # A row the results never mentioned is treated like an expired one.
        retry.extend(task for custom_id, task in expected.items() if custom_id not in seen)
        return retry, spent

    def _outcome(self, task: PlannedTask, row: BatchRow, record: ChunkRecord) -> FinishedRow | str | None:
        """The row's final result, "retry", or None (left for the realtime fallback)."""
        attempts = self.ctx.attempts.get(task.index, 0)
        batch_id = record.batch_id
        if row.type == "succeeded" and row.message is not None:
            return succeeded(task, row.message, "batch", attempts, self.ctx.config, batch_id=batch_id)
        error = ErrorInfo(type=row.error_type or row.type, message=row.error_message or "", request_id=row.request_id)
        if row.type == "errored" and row.error_type == "invalid_request_error":
            return failed(task, "errored", "batch", attempts, error, batch_id=batch_id)
        if row.type == "canceled" and record.canceled_by_us:
            if self.ctx.config.limits.on_batch_timeout == "timed_out":
                timed_out = ErrorInfo(type="timed_out", message="batch cancelled at the batch timeout")
                return failed(task, "timed_out", "batch", attempts, timed_out, batch_id=batch_id)
            return None
        if attempts < self.ctx.config.limits.max_row_attempts:
            return "retry"
        status = row.type if row.type in ("errored", "expired", "canceled") else "errored"
        return failed(task, status, "batch", attempts, error, batch_id=batch_id)  # type: ignore[arg-type]


def _outcome_unknown(exc: ApiError) -> bool:
    """Whether a failed create may have created its batch: no answer, a timeout, a conflict, or any 5xx (a 500
    or 529 can come after the work was done). A 429 and the other 4xx refuse the request before any work."""
    return exc.status is None or exc.status in (408, 409) or exc.status >= 500


def _counts(info: BatchInfo) -> str:
    return " ".join(f"{name}={count}" for name, count in info.request_counts.items() if count)


def _next_key(chunk_key: str) -> str:
    """c3 → c3~1 → c3~2: resubmissions of a chunk get stable keys of their own."""
    base, _, round_ = chunk_key.partition("~")
    return f"{base}~{int(round_ or 0) + 1}"
