"""The realtime lane: a fixed pool of workers sending Messages requests through `concurrency` request slots (the
one place concurrency is bounded) under per-model RPM/ITPM/OTPM buckets, each task under the run's retry policy."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Sequence

from batch_engine.client import Reply
from batch_engine.crashpoints import crash_point
from batch_engine.errors import ApiError, SpendLimitError
from batch_engine.lanes import LaneContext, all_or_none
from batch_engine.models import ErrorInfo
from batch_engine.planning import PlannedTask
from batch_engine.planning.outcome import FinishedRow, failed, succeeded, tokens_from_api

DEFAULT_RETRY_AFTER_S = 1.0
# Tasks in hand per request slot. A task waiting out the backoff of a stray failure lends its slot to the next
# task, so the API sees `concurrency` requests in flight, not fewer, while some tasks wait: at 30 % faults and
# 100 ms requests a task spends ~70 % of its time in backoff, so ~3 tasks keep one slot busy.
TASKS_PER_SLOT = 4


class _Slots:
    """At most `size` requests in flight. A retry gets the next free slot before a task's first request: it has
    waited its backoff already, and the run ends with its slowest task."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: list[tuple[bool, int, asyncio.Future[None]]] = []  # (first request?, arrival, waiter)
        self._arrivals = itertools.count()

    async def take(self, *, retry: bool) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        granted = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (not retry, next(self._arrivals), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.give_back()  # handed over as the waiter was cancelled
            raise

    def give_back(self) -> None:
        while self._waiting:
            granted = heapq.heappop(self._waiting)[2]
            if not granted.done():  # a cancelled waiter is skipped
                granted.set_result(None)
                return
        self._free += 1


class _GroupRecorder:
    """Records the rows that finish in the same turn of the event loop in one write, on the next turn.

    The worker that finished a row goes on to its next request meanwhile: the row is durable one loop turn after
    its answer arrived either way, and one commit per turn replaces one per row. A failed write fails the lane
    (at the next row, or at `drain`).
    """

    def __init__(self, record: Callable[[list[FinishedRow]], None]) -> None:
        self._record = record
        self._rows: list[FinishedRow] = []
        self._error: BaseException | None = None

    def add(self, result: FinishedRow) -> None:
        if self._error is not None:
            raise self._error
        if not self._rows:
            asyncio.get_running_loop().call_soon(self._flush)
        self._rows.append(result)

    def drain(self) -> None:
        """Write what is pending now; raise a write's failure."""
        self._flush()
        if self._error is not None:
            raise self._error

    def _flush(self) -> None:
        rows, self._rows = self._rows, []
        if not rows or self._error is not None:
            return
        try:
            self._record(rows)
        except BaseException as exc:
            self._error = exc
            return
        for _ in rows:
            crash_point("realtime.recorded")


class RealtimeLane:
    """Sends tasks one request each, `concurrency` at a time."""

    def __init__(self, ctx: LaneContext, concurrency: int) -> None:
        self.ctx = ctx
        self.concurrency = concurrency
        self._slots = _Slots(concurrency)
        self.spend_limit: SpendLimitError | None = None
        self._shared_left: dict[str, int] = {}  # shared limit name → slots taken and not yet used
        self._shared_locks: dict[str, asyncio.Lock] = {}
        self._settled = asyncio.Condition()  # notified when a budgeted request settles its reservation
        self._in_flight_usd = 0.0  # this lane's budget reservations of requests in flight

    async def run(self, tasks: Sequence[PlannedTask]) -> None:
        """Send every task; each ends with a row in the ledger, whatever happens to its request."""
        if not tasks:
            return
        await self.ctx.sender.expect(len(tasks))
        pending = iter(tasks)
        recorder = _GroupRecorder(self.ctx.record)

        async def worker() -> None:
            # The iterator is shared: each worker takes the next task when it is free.
            for task in pending:
                recorder.add(await self._send(task))

        try:
            await all_or_none(*(worker() for _ in range(min(self.concurrency * TASKS_PER_SLOT, len(tasks)))))
        finally:
            recorder.drain()

    def _uncached_estimate(self, task: PlannedTask) -> int:
        # Cache reads do not count toward ITPM: once a prefix is cached, charge only what follows it.
        cached = self.ctx.cached_prefix_tokens.get(task.cache_key, 0) if task.cache_key else 0
        # The counted figure (run --count-tokens) when there is one, else the offline estimate.
        return max(1, self.ctx.estimator.input_tokens(task) - cached)

    async def _shared_slot(self, model: str) -> None:
        shared = self.ctx.shared_limit
        name = None if shared is None else shared.limit_for(model)
        if shared is None or name is None:
            return
        # One worker takes a block for everyone on this limit; the others wait for it rather than each paying a
        # round trip. A lock per limit: waiting on one model's limit never holds up another model's requests.
        lock = self._shared_locks.get(name)
        if lock is None:
            lock = self._shared_locks[name] = asyncio.Lock()
        async with lock:
            if not self._shared_left.get(name):
                # Never more than the workers can use soon: unused slots would only make other processes wait.
                block = min(shared.blocks[name], self.concurrency)
                await shared.take(name, block)
                self._shared_left[name] = block
            self._shared_left[name] -= 1

    async def _attempt(self, task: PlannedTask) -> Reply:
        if self.spend_limit is not None:
            raise self.spend_limit
        # Every attempt (a retry too) is a request the API counts, so each one takes a shared slot.
        await self._shared_slot(task.model)
        limiter = self.ctx.limiter(task.model)
        permit = await limiter.acquire(self._uncached_estimate(task))
        self.ctx.lease_check()
        self.ctx.attempts[task.index] = self.ctx.attempts.get(task.index, 0) + 1
        self.ctx.progress.realtime_in_flight += 1
        started = time.perf_counter()
        crash_point("realtime.sending")
        try:
            reply = await self.ctx.sender.send(task.params, stream=task.stream)
        except ApiError as exc:
            headers = exc.headers
            limiter.observe(headers, permit)
            if exc.status == 429 and not isinstance(exc, SpendLimitError):
                # Only a 429 that shows the capacity gone holds the other workers; 529s and 500s never do.
                retry_after_s = exc.retry_after_s if exc.retry_after_s is not None else DEFAULT_RETRY_AFTER_S
                limiter.rate_limited(headers, permit, retry_after_s)
            elif exc.status is None or exc.status >= 500:
                limiter.server_error()
            raise
        finally:
            self.ctx.progress.realtime_in_flight -= 1
        crash_point("realtime.answered")
        self.ctx.latencies[task.index] = time.perf_counter() - started
        if reply.request_id is not None:
            self.ctx.request_ids[task.index] = reply.request_id
        limiter.observe(reply.headers, permit)
        usage = tokens_from_api(reply.message.get("usage"))
        limiter.settle(permit, usage.input_tokens + usage.cache_creation_input_tokens, usage.output_tokens)
        if task.cache_key and (usage.cache_read_input_tokens or usage.cache_creation_input_tokens):
            self.ctx.cached_prefix_tokens[task.cache_key] = (
                usage.cache_read_input_tokens + usage.cache_creation_input_tokens
            )
        return reply

    async def _send(self, task: PlannedTask) -> FinishedRow:
        budget, estimator = self.ctx.budget, self.ctx.estimator
        if not budget.limited:
            return await self._send_unbudgeted(task)
        # A hard budget: reserve the most the request can cost, so the requests in flight together can never
        # spend past the limit, at any concurrency. When only the in-flight reservations stand in the way, wait
        # for them to settle at their real (lower) cost instead of giving up.
        reservation = estimator.max_cost(task, "realtime")
        async with self._settled:
            while (answer := budget.try_reserve(reservation, self._in_flight_usd)) == "wait":
                await self._settled.wait()
            if answer == "refused":
                return failed(
                    task, "skipped_budget", "realtime", self.ctx.attempts.get(task.index, 0), budget.refusal()
                )
            self._in_flight_usd += reservation
        result: FinishedRow | None = None
        try:
            result = await self._send_unbudgeted(task)
        finally:
            # Settled before waking the waiters, so they see the real cost. Cut short, it may have cost it all.
            budget.settle(reservation, reservation if result is None else result.cost_usd)
            async with self._settled:
                self._in_flight_usd -= reservation
                self._settled.notify_all()
        return result

    async def _send_unbudgeted(self, task: PlannedTask) -> FinishedRow:
        limiter = self.ctx.limiter(task.model)
        holding = False
        started: float | None = None  # when the task got its first slot

        async def attempt() -> Reply:
            nonlocal holding, started
            if not holding:
                await self._slots.take(retry=started is not None)
                holding = True
            if started is None:
                started = time.perf_counter()
            answered = False
            try:
                reply = await self._attempt(task)
                answered = True
                return reply
            finally:
                # While failures are strays, the slot serves the next task during this one's backoff; while they
                # are the API's state, the task keeps it through its backoff: the lane slows down with the API.
                if answered or limiter.failures_are_strays():
                    self._slots.give_back()
                    holding = False

        try:
            reply = await self.ctx.policy.call(attempt, backoff_step=limiter.backoff_step)
        except SpendLimitError as exc:
            if self.spend_limit is None:
                self.spend_limit = exc
                self.ctx.logger.error(
                    "realtime lane stopped: the organisation's spend limit is reached (%s); "
                    "remaining realtime tasks are reported as errored and were not sent",
                    exc.error_code,
                )
            return self._failed(task, exc)
        except ApiError as exc:
            return self._failed(task, exc)
        finally:
            if holding:
                self._slots.give_back()
        assert started is not None
        self.ctx.progress.realtime_answered(time.perf_counter() - started)
        return succeeded(task, reply.message, "realtime", self.ctx.attempts.get(task.index, 0), self.ctx.config)

    def _failed(self, task: PlannedTask, exc: ApiError) -> FinishedRow:
        error = ErrorInfo(type=exc.error_type or "api_error", message=exc.message, request_id=exc.request_id)
        return failed(task, "errored", "realtime", self.ctx.attempts.get(task.index, 0), error)
