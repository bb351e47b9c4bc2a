"""Faults, rate limits, latency and auth: each failure the emulator produces, as the SDK surfaces it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from batch_engine.emulator import EmulatorSettings, RunningEmulator
from batch_engine.emulator.clock import ScaledClock
from batch_engine.emulator.faults import FaultInjector
from batch_engine.emulator.ratelimit import TokenBucket

HAIKU = "claude-haiku-5-5"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


def _create(client: anthropic.Anthropic, **params: Any) -> Any:
    # Thinking off: Haiku 5.5 thinks by default, and these tests count the reply's own tokens.
    request = {"model": HAIKU, "max_tokens": 50, "messages": MESSAGES, "thinking": {"type": "disabled"}}
    return client.messages.create(**(request | params))


@pytest.mark.parametrize(
    ("kind", "exception", "error_type"),
    [
        ("429", anthropic.RateLimitError, "rate_limit_error"),
        ("529", anthropic.OverloadedError, "overloaded_error"),
        ("500", anthropic.InternalServerError, "api_error"),
    ],
)
def test_scripted_error_faults_raise_the_matching_sdk_exception(
    emulator: RunningEmulator, client: anthropic.Anthropic, kind: str, exception: type[Exception], error_type: str
) -> None:
    emulator.script_fault("messages", kind)
    with pytest.raises(exception) as caught:
        _create(client)
    error = caught.value
    assert isinstance(error, anthropic.APIStatusError)
    assert error.status_code == int(kind) and error.type == error_type
    assert error.request_id is not None and error.request_id.startswith("req_")
    if kind == "429":
        assert error.response.headers["retry-after"] == "1"
    if kind == "500":
        assert not isinstance(error, anthropic.OverloadedError)
    _create(client)  # a one-shot: the next call succeeds
    stats = emulator.stats()
    assert stats["calls"]["POST /v1/messages"] == {kind: 1, "200": 1}
    assert stats["faults_injected"] == {kind: 1}
    assert stats["rate_limited"] == (1 if kind == "429" else 0)


def test_dropped_connection_is_an_api_connection_error_after_the_work_was_done(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.script_fault("messages", "drop")
    with pytest.raises(anthropic.APIConnectionError):
        _create(client)
    stats = emulator.stats()
    assert stats["calls"]["POST /v1/messages"] == {"dropped": 1}
    # The request was answered and billed; only the response was lost (as when a real connection dies).
    assert stats["messages_succeeded"] == 1 and stats["tokens_billed"]["output"] > 0


def test_dropped_batch_create_still_creates_the_batch(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.script_fault("batches_create", "drop")
    rows: list[Any] = [{"custom_id": "only", "params": {"model": HAIKU, "max_tokens": 5, "messages": MESSAGES}}]
    with pytest.raises(anthropic.APIConnectionError):
        client.messages.batches.create(requests=rows)
    # The ambiguous case a client must reconcile: the batch exists although the create "failed".
    listed = client.messages.batches.list().data
    assert len(listed) == 1 and listed[0].request_counts.processing + listed[0].request_counts.succeeded == 1


def test_stream_error_event_after_200_surfaces_as_api_error(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.script_fault("messages", "error_event")
    with (
        pytest.raises(anthropic.APIStatusError, match="overloaded_error"),
        client.messages.stream(model=HAIKU, max_tokens=50, messages=MESSAGES) as stream,
    ):
        stream.get_final_message()


def test_fault_rates_are_seeded_and_cover_their_share(emulator: RunningEmulator) -> None:
    def outcomes() -> list[str]:
        emulator.reset()
        emulator.configure(seed=7, fault_rate_429=0.2, fault_rate_529=0.1, fault_rate_500=0.1, fault_retry_after_s=0)

        async def run() -> list[str]:
            async with anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="k", max_retries=0) as sdk:
                seen = []
                for _ in range(300):
                    try:
                        await sdk.messages.create(model=HAIKU, max_tokens=5, messages=MESSAGES)
                        seen.append("200")
                    except anthropic.APIStatusError as exc:
                        seen.append(str(exc.status_code))
                return seen

        return asyncio.run(run())

    first = outcomes()
    assert first == outcomes()
    assert 35 <= first.count("429") <= 85 and 12 <= first.count("529") <= 50 and 12 <= first.count("500") <= 50


def test_random_faults_reach_batch_endpoints_only_when_asked(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.configure(fault_rate_500=1.0)
    with pytest.raises(anthropic.InternalServerError):
        _create(client)
    assert client.messages.batches.list().data == []
    emulator.configure(fault_endpoints=("*",))
    with pytest.raises(anthropic.InternalServerError):
        client.messages.batches.list()


def test_sdk_retries_honour_the_fault_retry_after(emulator: RunningEmulator) -> None:
    emulator.configure(fault_retry_after_s=0.05)
    emulator.script_fault("messages", "429", count=2)
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="k", max_retries=2) as sdk:
        raw = sdk.messages.with_raw_response.create(model=HAIKU, max_tokens=5, messages=MESSAGES)
    assert raw.retries_taken == 2
    assert emulator.stats()["calls"]["POST /v1/messages"] == {"429": 2, "200": 1}


def test_rpm_limit_refuses_with_retry_after_and_headers(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(rpm=3)
    for expected_remaining in ("2", "1", "0"):
        raw = client.messages.with_raw_response.create(model=HAIKU, max_tokens=5, messages=MESSAGES)
        assert raw.headers["anthropic-ratelimit-requests-remaining"] == expected_remaining
    with pytest.raises(anthropic.RateLimitError, match="3 requests per minute") as caught:
        _create(client)
    headers = caught.value.response.headers
    # 3 per minute refill one request every 20 s.
    assert 19 <= int(headers["retry-after"]) <= 20 and 19_000 < int(headers["retry-after-ms"]) <= 20_000
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert emulator.stats()["rate_limited"] == 1


def test_otpm_counts_actual_output(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(otpm=100, reply_tokens=80)
    _create(client, max_tokens=500)
    _create(client, max_tokens=500)  # admitted while the bucket is not empty; it goes into debt
    with pytest.raises(anthropic.RateLimitError, match="output tokens per minute"):
        _create(client, max_tokens=500)


def test_latency_and_jitter_delay_each_request(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(latency_s=0.15, jitter_s=0.05)
    started = time.monotonic()
    _create(client)
    assert 0.15 <= time.monotonic() - started < 1.0


def test_auth_accepts_bearer_or_x_api_key_and_refuses_neither(emulator: RunningEmulator) -> None:
    body: dict[str, Any] = {"model": HAIKU, "max_tokens": 5, "messages": MESSAGES}
    with httpx.Client(base_url=emulator.base_url) as http:
        assert http.post("/v1/messages", json=body, headers={"x-api-key": "k"}).status_code == 200
        assert http.post("/v1/messages", json=body, headers={"authorization": "Bearer k"}).status_code == 200
        refused = http.post("/v1/messages", json=body)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_a_configured_key_must_match(emulator: RunningEmulator) -> None:
    emulator.configure(api_key="sk-right")
    with (
        anthropic.Anthropic(base_url=emulator.base_url, api_key="sk-wrong", max_retries=0) as wrong,
        pytest.raises(anthropic.AuthenticationError),
    ):
        _create(wrong)
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="sk-right", max_retries=0) as right:
        assert _create(right).content
    assert emulator.stats()["settings"]["api_key"] == "***"


def test_control_endpoints_over_http(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    with httpx.Client(base_url=emulator.base_url) as http:
        assert http.post("/_emulator/config", json={"rpm": 5}).json()["rpm"] == 5
        assert http.post("/_emulator/config", json={"rpm": 0}).status_code == 400
        assert http.post("/_emulator/config", json={"no_such_setting": 1}).status_code == 400
        assert http.post("/_emulator/faults", json={"endpoint": "messages", "kind": "nope"}).status_code == 400
        pending = http.post("/_emulator/faults", json={"endpoint": "messages", "kind": "529", "count": 2})
        assert pending.json() == {"pending_faults": {"messages": ["529", "529"]}}
        assert http.post("/_emulator/clock", json={"advance_s": 60}).status_code == 200
        stats = http.get("/_emulator/stats").json()
        assert stats["settings"]["rpm"] == 5 and stats["pending_faults"] == {"messages": ["529", "529"]}
        assert http.post("/_emulator/reset").status_code == 200
        assert http.get("/_emulator/stats").json()["settings"]["rpm"] is None
    _create(client)  # reset cleared the scripted faults


def test_token_bucket_refills_continuously_up_to_its_limit() -> None:
    bucket = TokenBucket(60, now=0.0)  # one per second
    for _ in range(60):
        assert bucket.wait_for(1, now=0.0) == 0
        bucket.take(1, now=0.0)
    assert bucket.wait_for(1, now=0.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, now=0.5) == pytest.approx(0.5)
    assert bucket.remaining(now=10.0) == 10
    assert bucket.remaining(now=1000.0) == 60
    bucket.take(100, now=1000.0)  # an overshoot leaves debt
    assert bucket.wait_for(1, now=1000.0) == pytest.approx(41.0)
    assert bucket.wait_for(500, now=2000.0) == 0  # bigger than the bucket: waits only for a full bucket


def test_scaled_clock_runs_fast_and_only_jumps_forward() -> None:
    clock = ScaledClock(time_scale=1000, start=0.0)
    time.sleep(0.01)
    assert 9 < clock.now() < 1000
    before = clock.now()
    clock.advance(-100)
    clock.advance(3600)
    assert clock.now() >= before + 3600
    clock.set_scale(1.0)
    assert clock.real_seconds(5.0) == 5.0


def test_scripted_faults_come_before_random_ones_and_validate_input() -> None:
    injector = FaultInjector(seed=1)
    settings = EmulatorSettings(fault_rate_500=1.0)
    injector.script("messages", "drop", count=2)
    assert [injector.draw("messages", settings) for _ in range(3)] == ["drop", "drop", "500"]
    assert injector.draw("batches_list", settings) is None
    with pytest.raises(ValueError, match="unknown endpoint"):
        injector.script("nope", "429")
    with pytest.raises(ValueError, match="unknown fault kind"):
        injector.script("messages", "418")


def test_an_emulator_bug_is_answered_as_a_json_api_error(
    emulator: RunningEmulator, client: anthropic.Anthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in the emulator")

    monkeypatch.setattr(emulator.state, "prepare_message", broken)
    with pytest.raises(anthropic.InternalServerError) as caught:
        _create(client)
    assert caught.value.type == "api_error" and caught.value.request_id is not None


def test_error_event_on_a_plain_request_is_a_529_before_any_work(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.script_fault("messages", "error_event")
    with pytest.raises(anthropic.OverloadedError):
        _create(client)
    assert emulator.stats()["messages_succeeded"] == 0


def test_error_answers_carry_x_should_retry_and_batch_answers_their_rate_limit(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    for kind, status, should_retry in (("529", 529, "true"), ("500_no_retry", 500, "false")):
        emulator.script_fault("messages", kind)
        with pytest.raises(anthropic.APIStatusError) as caught:
            _create(client)
        assert caught.value.status_code == status and caught.value.response.headers["x-should-retry"] == should_retry
    with pytest.raises(anthropic.BadRequestError) as bad:
        _create(client, extra_body={"temperature": 0.5})
    assert bad.value.response.headers["x-should-retry"] == "false"
    for kind, status in (("spend_limit_400", 400), ("spend_limit_402", 402)):
        emulator.script_fault("messages", kind)
        with pytest.raises(anthropic.APIStatusError) as spent:
            _create(client)
        assert spent.value.status_code == status
    emulator.configure(batch_rpm=50)
    listed = client.messages.batches.with_raw_response.list()
    assert listed.headers["anthropic-ratelimit-requests-limit"] == "50"
    assert int(listed.headers["anthropic-ratelimit-requests-remaining"]) < 50


def test_an_after_commit_fault_does_the_work_and_then_answers_an_error(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.script_fault("batches_create", "after_commit")
    emulator.script_fault("messages", "after_commit")
    request = {"custom_id": "a", "params": {"model": HAIKU, "max_tokens": 5, "messages": MESSAGES}}

    with pytest.raises(anthropic.InternalServerError):
        client.messages.batches.create(requests=[request])  # type: ignore[list-item]
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(model=HAIKU, max_tokens=5, messages=MESSAGES)

    stats = emulator.stats()
    assert stats["batches_created"] == 1 and len(client.messages.batches.list().data) == 1
    assert stats["messages_succeeded"] == 1 and stats["cost_usd"]["realtime"] > 0
    assert stats["faults_injected"] == {"after_commit": 2}


def test_an_after_commit_fault_marked_not_to_retry_still_did_the_work(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    # x-should-retry: false says nothing of whether the work was done (reference anthropic-api.md §0.8).
    emulator.script_fault("batches_create", "after_commit_no_retry")
    request = {"custom_id": "a", "params": {"model": HAIKU, "max_tokens": 5, "messages": MESSAGES}}

    with pytest.raises(anthropic.InternalServerError) as raised:
        client.messages.batches.create(requests=[request])  # type: ignore[list-item]

    assert raised.value.status_code == 500 and raised.value.response.headers["x-should-retry"] == "false"
    assert emulator.stats()["batches_created"] == 1 and len(client.messages.batches.list().data) == 1


def test_the_after_commit_rate_hits_creates_and_messages_whatever_the_fault_endpoints(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.configure(seed=3, fault_after_commit_rate=0.5)
    failed = 0
    for _ in range(40):
        try:
            client.messages.create(model=HAIKU, max_tokens=5, messages=MESSAGES)
        except anthropic.APIStatusError as exc:
            assert exc.status_code in (500, 529)
            failed += 1
    assert 5 < failed < 35
    assert emulator.stats()["messages_succeeded"] == 40  # every one was answered and billed
