"""The realtime lane's answer to a 429 through the real SDK against the emulator: a 429 that leaves capacity holds
only its own request, 529s and 500s never hold anyone. The lane's rate limiters run on a fake clock and the retry
policy on a recording sleep, so the tests assert the waits each asked for, never wall time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings, RetryPolicy
from batch_engine.config import Route
from batch_engine.emulator import RunningEmulator
from batch_engine.lanes import Progress
from batch_engine.lanes.limiter import RateLimiter
from batch_engine.models import TaskResult
from batch_engine.runner import Run, RunOptions
from tests.support.engine import FakeClock, fast_config, messages_calls, read_output, write_jsonl

BIG = 10**9


class Waits:
    """The retry policy's sleep: records each requested wait and returns at once."""

    def __init__(self) -> None:
        self.requested: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.requested.append(seconds)
        await asyncio.sleep(0)


def _tasks(count: int) -> list[dict[str, Any]]:
    return [
        {"task_id": f"r{i}", "task_type": "user_query", "input_data": {"question": f"q {i}?"}} for i in range(count)
    ]


def _run(
    emulator: RunningEmulator,
    tmp_path: Path,
    tasks: list[dict[str, Any]],
    clock: FakeClock,
    waits: Waits,
    *,
    mode: Route | None = "realtime",
    batch_sleep: Callable[[float], Awaitable[None]] | None = None,
    answered_before: int = 0,
    concurrency: int = 4,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """`tasks` with `concurrency` realtime request slots, each model's limiter on `clock` and told of
    `answered_before` successes (an earlier stretch of the run), and the batch lane's waits between polls through
    `batch_sleep`; the rows."""
    path = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    options = RunOptions(state_dir=tmp_path / "state", mode=mode, concurrency=concurrency)
    api = ApiSettings(SecretStr("sk-test"), emulator.base_url)

    async def go() -> None:
        prepared = Run.prepare(path, tmp_path / "out.json", fast_config(), options)
        try:
            policy = RetryPolicy(attempts=10, sleep=waits.sleep)
            async with prepared.lanes(api, policy=policy, progress=progress) as lanes:
                for model in {task.model for task in prepared.plan.tasks}:
                    limiter = RateLimiter(BIG, BIG, BIG, clock=clock, sleep=clock.sleep)
                    for _ in range(answered_before):
                        limiter.settle(await limiter.acquire(1), 1, 1)
                    lanes.realtime.ctx.limiters[model] = limiter
                if batch_sleep is not None:
                    lanes.batch.sleep = batch_sleep
                await prepared.send(lanes)
            prepared.finish()
        finally:
            prepared.close()

    asyncio.run(go())
    return read_output(tmp_path / "out.json")[1]


def test_a_429_that_leaves_capacity_delays_only_its_own_request(emulator: RunningEmulator, tmp_path: Path) -> None:
    # An injected 429 (retry-after 5 s) whose rate-limit headers show the buckets nowhere near empty.
    emulator.configure(fault_retry_after_s=5)
    emulator.script_fault("messages", "429")
    clock, waits = FakeClock(), Waits()

    rows = _run(emulator, tmp_path, _tasks(12), clock, waits)

    assert [row["status"] for row in rows] == ["succeeded"] * 12
    assert messages_calls(emulator.stats()) == {"429": 1, "200": 12}
    # The request that got it waits the server's retry-after, plus up to 10 % of jitter...
    [wait] = waits.requested
    assert 5.0 <= wait <= 5.5
    # ...and no other worker was held back for it.
    assert clock.sleeps == []


def test_529s_and_500s_never_hold_other_workers(emulator: RunningEmulator, tmp_path: Path) -> None:
    emulator.script_fault("messages", "529")
    emulator.script_fault("messages", "500")
    clock, waits = FakeClock(), Waits()

    rows = _run(emulator, tmp_path, _tasks(12), clock, waits)

    assert [row["status"] for row in rows] == ["succeeded"] * 12
    assert messages_calls(emulator.stats()) == {"529": 1, "500": 1, "200": 12}
    # Each failed request backs off on its own (first retry: 0.25-0.5 s of jittered backoff)...
    assert len(waits.requested) == 2 and all(0.25 <= wait <= 0.5 for wait in waits.requested)
    # ...and the lane's limiter never made anyone wait.
    assert clock.sleeps == []


def test_while_most_answers_succeed_a_request_failing_again_and_again_retries_within_a_second(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # One request meets five 500s in a row, in a run whose answers so far all succeeded: bad luck, not an outage.
    emulator.script_fault("messages", "500", count=5)
    clock, waits = FakeClock(), Waits()

    rows = _run(emulator, tmp_path, _tasks(1), clock, waits, answered_before=12)

    assert [(row["status"], row["attempts"]) for row in rows] == [("succeeded", 6)]
    # Backoff steps 1 and 2 (0.25-0.5 s, then 0.5-1 s), and no further: not 1-2, 2-4, 4-8 s as for an outage.
    assert len(waits.requested) == 5
    assert 0.25 <= waits.requested[0] <= 0.5 and all(0.5 <= wait <= 1.0 for wait in waits.requested[1:])
    assert clock.sleeps == []


def test_a_storm_of_429s_without_room_holds_every_request(emulator: RunningEmulator, tmp_path: Path) -> None:
    # Ten 429s in a row: whatever the headers say, the server is refusing as a rule, not now and then.
    emulator.configure(fault_retry_after_s=3)
    emulator.script_fault("messages", "429", count=10)
    clock, waits = FakeClock(), Waits()

    rows = _run(emulator, tmp_path, _tasks(12), clock, waits)

    assert [row["status"] for row in rows] == ["succeeded"] * 12
    assert messages_calls(emulator.stats()) == {"429": 10, "200": 12}
    assert len(waits.requested) == 10 and all(3.0 <= wait <= 3.3 for wait in waits.requested)
    # A run of them paused the lane for the retry-after: the next request of any worker waited for it.
    assert clock.sleeps and clock.sleeps[0] == pytest.approx(3.0)


def test_a_refused_poll_waits_the_retry_after_for_its_batch_alone(emulator: RunningEmulator, tmp_path: Path) -> None:
    # The batch's first poll is refused with a 429 asking for 7 s; realtime tasks run alongside.
    emulator.configure(fault_retry_after_s=7)
    emulator.script_fault("batches_retrieve", "429")
    batch = [{"task_id": f"b{i}", "task_type": "classify_bulk", "input_data": {"text": f"t {i}"}} for i in range(10)]
    clock, waits, between_polls = FakeClock(), Waits(), []

    async def batch_sleep(seconds: float) -> None:
        between_polls.append(seconds)
        await asyncio.sleep(0.02)  # the emulator's batch ends in 0.1 s of real time

    rows = _run(emulator, tmp_path, [*_tasks(12), *batch], clock, waits, mode=None, batch_sleep=batch_sleep)

    assert [row["status"] for row in rows] == ["succeeded"] * 22
    assert {row["route"] for row in rows[12:]} == {"batch"}
    # The refused poll's batch waits what the server asked (plus up to 10 % of jitter) before polling again,
    # then polls at its own cadence (fast_config: from 0.05 s) again.
    assert 7.0 <= between_polls[0] <= 7.7
    assert all(wait < 1 for wait in between_polls[1:])
    # The realtime lane was never held for it.
    assert clock.sleeps == [] and waits.requested == []


class _Order(Progress):
    """The order tasks finish in, and the most requests ever in flight at once."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.most_in_flight = 0
        super().__init__()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "realtime_in_flight":
            self.most_in_flight = max(self.most_in_flight, value)
        super().__setattr__(name, value)

    def add(self, result: TaskResult) -> None:
        super().add(result)
        self.finished.append(result.task_id)


class _SlowWaits(Waits):
    """Waits that take real time, so the other tasks can go ahead meanwhile (or not)."""

    async def sleep(self, seconds: float) -> None:
        self.requested.append(seconds)
        await asyncio.sleep(0.3)


def test_a_task_waiting_out_a_stray_failure_lends_its_slot_to_the_next_task(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # One request slot; the first task's request meets a 500 in a run whose answers so far all succeeded.
    emulator.script_fault("messages", "500")
    progress, waits = _Order(), _SlowWaits()

    rows = _run(emulator, tmp_path, _tasks(3), FakeClock(), waits, answered_before=12, concurrency=1, progress=progress)

    assert [row["status"] for row in rows] == ["succeeded"] * 3
    assert rows[0]["attempts"] == 2 and len(waits.requested) == 1
    # While r0 waited out its backoff, its slot sent r1 and r2; still never more than one request at a time.
    assert progress.finished == ["r1", "r2", "r0"]
    assert progress.most_in_flight == 1


def test_while_failures_are_the_apis_state_a_task_keeps_its_slot_through_its_backoff(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # The same 500, but at the start of a run: no answer yet says the API is healthy, so the lane slows down
    # rather than sending more work into it.
    emulator.script_fault("messages", "500")
    progress, waits = _Order(), _SlowWaits()

    rows = _run(emulator, tmp_path, _tasks(3), FakeClock(), waits, concurrency=1, progress=progress)

    assert [row["status"] for row in rows] == ["succeeded"] * 3
    assert progress.finished == ["r0", "r1", "r2"]
    assert progress.most_in_flight == 1
