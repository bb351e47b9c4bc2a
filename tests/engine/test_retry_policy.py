"""The retry policy through the real SDK against the emulator: which errors it retries, and the waits it asks
for (recorded by the `sleep` seam, so no test waits on the wall clock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings, Connection, RetryPolicy, retrieve_batch
from batch_engine.emulator import RunningEmulator
from batch_engine.errors import ApiError, PermanentApiError, TransientApiError
from batch_engine.runner import RunOptions
from tests.support.engine import fast_config, generated_tasks, messages_calls, run_engine, write_jsonl

HAIKU = "claude-haiku-5-5"
HELLO: dict[str, Any] = {
    "model": HAIKU,
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello"}],
    "thinking": {"type": "disabled"},  # Haiku 5.5 thinks by default; these tests read the text
}


class Waits:
    """The `sleep` seam: records each requested wait and returns at once."""

    def __init__(self) -> None:
        self.requested: list[float] = []
        self.headers: list[dict[str, str]] = []

    async def sleep(self, seconds: float) -> None:
        self.requested.append(seconds)

    def on_retry(self, error: ApiError, _wait: float) -> None:
        self.headers.append(dict(error.headers))


def _call(
    emulator: RunningEmulator,
    policy: RetryPolicy,
    request: Callable[[Any], Awaitable[Any]],
    api_key: str = "sk-test",
) -> Any:
    async def go() -> Any:
        connection = Connection(ApiSettings(SecretStr(api_key), emulator.base_url))
        try:
            return await policy.call(lambda: request(connection))
        finally:
            await connection.aclose()

    return asyncio.run(go())


def _hello(params: dict[str, Any] = HELLO) -> Callable[[Any], Awaitable[Any]]:
    return lambda connection: connection.send_message(params, stream=False)


def test_waits_are_the_servers_retry_after(emulator: RunningEmulator) -> None:
    emulator.configure(fault_retry_after_s=2.5)
    emulator.script_fault("messages", "429", count=3)
    waits = Waits()

    reply = _call(emulator, RetryPolicy(sleep=waits.sleep), _hello())

    assert reply.message["content"][0]["text"].startswith("echo:")
    # Never sooner than asked, at most 10 % later: requests refused together do not return in the same instant.
    assert len(waits.requested) == 3 and all(2.5 <= wait <= 2.75 for wait in waits.requested)
    assert messages_calls(emulator.stats()) == {"429": 3, "200": 1}


def test_retry_after_ms_is_preferred_to_the_rounded_retry_after(emulator: RunningEmulator) -> None:
    # A real rate limit: 3 requests a minute, so the 4th is refused for a fraction of 20 s.
    emulator.configure(rpm=3)
    waits = Waits()
    for _ in range(3):
        _call(emulator, RetryPolicy(sleep=waits.sleep), _hello())

    with pytest.raises(TransientApiError) as refused:
        _call(emulator, RetryPolicy(attempts=2, sleep=waits.sleep, on_retry=waits.on_retry), _hello())

    assert refused.value.status == 429
    [headers] = waits.headers
    [wait] = waits.requested
    assert int(headers["retry-after-ms"]) / 1000 <= wait <= int(headers["retry-after-ms"]) / 1000 * 1.1
    assert 0 < wait <= 20 * 1.1
    assert messages_calls(emulator.stats()) == {"200": 3, "429": 2}


def test_backoff_without_retry_after_grows_and_stays_bounded(emulator: RunningEmulator) -> None:
    emulator.script_fault("messages", "529", count=4)
    emulator.script_fault("messages", "500", count=2)
    emulator.script_fault("messages", "drop", count=1)
    waits = Waits()

    _call(emulator, RetryPolicy(attempts=8, initial_wait_s=0.5, max_wait_s=4.0, sleep=waits.sleep), _hello())

    # Full jitter in the upper half: retry n waits between c/2 and c, c = min(4, 0.5 * 2^(n-1)).
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert len(waits.requested) == len(ceilings)
    for wait, ceiling in zip(waits.requested, ceilings, strict=True):
        assert ceiling / 2 <= wait <= ceiling
    assert messages_calls(emulator.stats()) == {"529": 4, "500": 2, "dropped": 1, "200": 1}


def test_attempts_are_bounded_and_the_last_error_is_raised_as_it_was(emulator: RunningEmulator) -> None:
    emulator.script_fault("messages", "529", count=10)
    waits = Waits()

    with pytest.raises(TransientApiError) as failed:
        _call(emulator, RetryPolicy(attempts=4, sleep=waits.sleep), _hello())

    assert failed.value.status == 529 and failed.value.error_type == "overloaded_error"
    assert len(waits.requested) == 3
    assert messages_calls(emulator.stats()) == {"529": 4}


def _bad_request(_: RunningEmulator) -> tuple[Callable[[Any], Awaitable[Any]], str]:
    return _hello(HELLO | {"temperature": 0.5}), "sk-test"  # API version 2026-10-21 refuses sampling parameters


def _unauthorized(emulator: RunningEmulator) -> tuple[Callable[[Any], Awaitable[Any]], str]:
    emulator.configure(api_key="sk-the-right-one")
    return _hello(), "sk-a-wrong-one"


def _not_found(_: RunningEmulator) -> tuple[Callable[[Any], Awaitable[Any]], str]:
    return lambda connection: retrieve_batch(connection.sdk, "msgbatch_that_does_not_exist"), "sk-test"


def _too_large(emulator: RunningEmulator) -> tuple[Callable[[Any], Awaitable[Any]], str]:
    emulator.configure(max_message_body_bytes=2048)
    return _hello(HELLO | {"messages": [{"role": "user", "content": "x" * 4096}]}), "sk-test"


@pytest.mark.parametrize(
    ("status", "error_type", "setup"),
    [
        (400, "invalid_request_error", _bad_request),
        (401, "authentication_error", _unauthorized),
        (404, "not_found_error", _not_found),
        (413, "request_too_large", _too_large),
    ],
)
def test_permanent_errors_are_not_retried(
    emulator: RunningEmulator,
    status: int,
    error_type: str,
    setup: Callable[[RunningEmulator], tuple[Callable[[Any], Awaitable[Any]], str]],
) -> None:
    request, api_key = setup(emulator)
    waits = Waits()

    with pytest.raises(PermanentApiError) as refused:
        _call(emulator, RetryPolicy(sleep=waits.sleep), request, api_key)

    assert (refused.value.status, refused.value.error_type) == (status, error_type)
    assert waits.requested == []
    calls = emulator.stats()["calls"]
    assert sum(sum(by_status.values()) for by_status in calls.values()) == 1


@pytest.mark.parametrize(
    ("fault", "status", "error_type", "message"),
    [
        ("spend_limit", "429", "rate_limit_error", "API usage limits"),
        # A spend limit the organisation set itself is a 400; a linked organisation's is a 402 (issue #15).
        ("spend_limit_400", "400", "invalid_request_error", "API usage limits"),
        ("spend_limit_402", "402", "billing_error", "spend limit"),
    ],
)
# The realtime lane's requests sent from this process, or through a sender process: the same stop.
@pytest.mark.parametrize("sender", ["inline", "process"])
def test_a_spend_limit_stops_the_realtime_lane_and_every_task_is_still_reported(
    emulator: RunningEmulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    status: str,
    error_type: str,
    message: str,
    sender: str,
) -> None:
    emulator.script_fault("messages", fault)
    tasks = generated_tasks(40, realtime_every=2)  # 20 realtime, 20 batch
    waits = Waits()

    with caplog.at_level(logging.ERROR, logger="batch_engine"):
        output = run_engine(
            emulator,
            write_jsonl(tmp_path / "tasks.jsonl", tasks),
            tmp_path,
            config=fast_config(realtime_sender=sender),
            options=RunOptions(state_dir=tmp_path / "state", concurrency=4),
            policy=RetryPolicy(sleep=waits.sleep),
        )

    assert [row["task_id"] for row in output.rows] == [task["task_id"] for task in tasks]
    realtime = [row for row in output.rows if row["route"] == "realtime"]
    sent = [row for row in realtime if row["attempts"] == 1]
    stopped = [row for row in realtime if row["status"] == "errored"]
    # Only what was already in flight went out; the refused request was not retried; nothing was sent after.
    calls = messages_calls(emulator.stats())
    assert calls[status] == 1 and calls.get("200", 0) == len(sent) - 1 < 4
    assert waits.requested == []
    assert len(stopped) == 20 - calls.get("200", 0)
    assert all(row["attempts"] == 0 for row in stopped if row not in sent)
    assert all(row["error"]["type"] == error_type for row in stopped)
    assert all(message in row["error"]["message"] for row in stopped)
    # The batch lane is not affected by the realtime lane's spend-limit stop.
    assert all(row["status"] == "succeeded" for row in output.rows if row["route"] == "batch")
    assert "realtime lane stopped" in caplog.text
    if fault == "spend_limit":
        assert "enforced_spend_limit_reached" in caplog.text


def test_no_wait_starts_that_would_end_past_the_time_bound(emulator: RunningEmulator) -> None:
    # Each 429 asks for 200 s; with 300 s to spend, the second wait would end at 400 s: the policy gives up instead.
    emulator.configure(fault_retry_after_s=200)
    emulator.script_fault("messages", "429", count=10)
    waits = Waits()

    with pytest.raises(TransientApiError):
        _call(emulator, RetryPolicy(attempts=8, max_time_s=300, sleep=waits.sleep), _hello())

    (waited,) = waits.requested  # the retry-after, plus its jitter
    assert 200 <= waited <= 300
    assert messages_calls(emulator.stats()) == {"429": 2}


def test_the_time_bound_counts_the_first_attempts_own_time() -> None:
    # A first attempt that took 0.25 s of a 0.3 s budget leaves no room for even the shortest backoff (0.05-0.1 s):
    # the policy gives up after it, as it would after any other attempt.
    calls: list[float] = []

    async def slow_failure() -> None:
        calls.append(0.0)
        await asyncio.sleep(0.25)
        raise TransientApiError("overloaded", status=529, error_type="overloaded_error")

    waits = Waits()
    policy = RetryPolicy(attempts=8, max_time_s=0.3, initial_wait_s=0.1, max_wait_s=0.1, sleep=waits.sleep)
    with pytest.raises(TransientApiError):
        asyncio.run(policy.call(slow_failure))

    assert (len(calls), waits.requested) == (1, [])


def test_a_first_failure_is_retried_once_per_attempt_not_sent_twice() -> None:
    # The first attempt runs outside the retry machinery; its failure must count as attempt 1, not be sent again.
    calls: list[int] = []

    async def failing() -> None:
        calls.append(len(calls))
        raise TransientApiError("overloaded", status=529, error_type="overloaded_error")

    waits = Waits()
    with pytest.raises(TransientApiError):
        asyncio.run(RetryPolicy(attempts=3, sleep=waits.sleep).call(failing))

    assert len(calls) == 3 and len(waits.requested) == 2
    assert 0.25 <= waits.requested[0] <= 0.5 <= waits.requested[1] <= 1.0  # backoff steps 1 and 2: (0.25-0.5], (0.5-1]
