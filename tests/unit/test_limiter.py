"""The realtime lane's rate limiter on a fake clock: refill, correction from response headers, pause."""

from __future__ import annotations

import asyncio

import pytest

from batch_engine.lanes.limiter import Permit, RateLimiter
from tests.support.engine import FakeClock

BIG = 10**9


def _limiter(clock: FakeClock, rpm: int = BIG, itpm: int = BIG, otpm: int = BIG) -> RateLimiter:
    return RateLimiter(rpm, itpm, otpm, clock=clock, sleep=clock.sleep)


def _acquire(limiter: RateLimiter, count: int = 1, input_tokens: int = 1) -> list[Permit]:
    async def go() -> list[Permit]:
        return [await limiter.acquire(input_tokens) for _ in range(count)]

    return asyncio.run(go())


def _headers(kind: str, limit: int, remaining: int) -> dict[str, str]:
    return {f"anthropic-ratelimit-{kind}-limit": str(limit), f"anthropic-ratelimit-{kind}-remaining": str(remaining)}


def test_a_full_bucket_admits_a_burst_then_requests_wait_for_refill() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=60)

    _acquire(limiter, 60)
    assert clock.sleeps == []
    _acquire(limiter, 2)
    assert clock.sleeps == pytest.approx([1.0, 1.0])  # 60 per minute: one a second


def test_input_tokens_wait_for_the_itpm_bucket_and_a_huge_request_only_for_a_full_one() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, itpm=6000)  # 100 tokens a second

    _acquire(limiter, input_tokens=5000)
    _acquire(limiter, input_tokens=3000)
    assert clock.sleeps == pytest.approx([20.0])  # 1,000 left, 2,000 more needed
    clock.sleeps.clear()
    _acquire(limiter, input_tokens=50_000)
    assert clock.sleeps == pytest.approx([60.0])  # bigger than the bucket: waits until it is full, not forever


def test_the_servers_headers_lower_the_limit_and_what_is_left() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=1000)

    limiter.observe(_headers("requests", 30, 4))
    _acquire(limiter, 4)
    assert clock.sleeps == []
    _acquire(limiter)
    assert clock.sleeps == pytest.approx([2.0])  # the server's 30 a minute, not the configured 1,000


def test_the_servers_headers_never_raise_what_is_left() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=60)
    _acquire(limiter, 50)

    limiter.observe(_headers("requests", 60, 59))  # an old answer: the server had not seen the other 49 yet

    _acquire(limiter, 10)
    assert clock.sleeps == []
    _acquire(limiter)
    assert clock.sleeps == pytest.approx([1.0])


def test_an_answer_does_not_count_requests_sent_after_it() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=1000)  # seeded high; the server's real limit is 100
    first, *_in_flight = _acquire(limiter, 32)

    # The first request's answer: the server had taken only it. The 31 behind it will be taken too.
    limiter.observe(_headers("requests", 100, 99), first)

    _acquire(limiter, 99 - 31)
    assert clock.sleeps == []
    _acquire(limiter)
    assert clock.sleeps == pytest.approx([0.6])  # 100 a minute


def test_an_answer_is_refilled_for_the_time_since_its_request_was_sent() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=60)
    [slow] = _acquire(limiter)
    _acquire(limiter, 59)
    clock.now += 30  # a slow request: 30 s later its answer says 10 were left when it arrived

    limiter.observe(_headers("requests", 60, 10), slow)

    # 10 + 30 refilled - 59 sent after it: the server has nothing left; the next request waits a second.
    _acquire(limiter)
    assert clock.sleeps == pytest.approx([1.0 + 19.0])


def test_token_headers_correct_the_itpm_and_otpm_buckets() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, itpm=1_000_000, otpm=1_000_000)

    limiter.observe(_headers("input-tokens", 6000, 1000) | _headers("output-tokens", 6000, 0))

    assert limiter.buckets["itpm"].limit == limiter.buckets["otpm"].limit == 6000
    _acquire(limiter, input_tokens=1000)
    assert clock.sleeps == pytest.approx([0.01])  # OTPM empty: wait for one token (100 a second)


def test_a_pause_holds_every_request_and_empties_the_request_bucket() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=60)

    limiter.pause(5.0)

    _acquire(limiter)
    assert sum(clock.sleeps) == pytest.approx(5.0)
    clock.sleeps.clear()
    _acquire(limiter, 4)  # the pause refilled 5, and the server said the bucket was empty: no burst after it
    _acquire(limiter)
    assert clock.sleeps == pytest.approx([1.0])


def test_settle_charges_only_input_that_counts_toward_itpm() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, itpm=6000, otpm=6000)
    permit = _acquire(limiter, input_tokens=5000)[0]

    # The estimate was 5,000; the answer read most of it from the cache: only 500 were uncached or written.
    limiter.settle(permit, input_tokens=500, output_tokens=100)

    _acquire(limiter, input_tokens=5500)
    assert clock.sleeps == []
    limiter.settle(permit, input_tokens=permit.input_tokens, output_tokens=6000)
    _acquire(limiter)
    assert clock.sleeps == pytest.approx([1.01])  # OTPM overdrawn by 100: 101 tokens at 100 a second


def test_a_429_whose_headers_show_room_left_holds_no_one() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=600)
    [permit] = _acquire(limiter)
    headers = _headers("requests", 600, 420) | _headers("input-tokens", 10**6, 10**6)

    limiter.observe(headers, permit)
    assert limiter.rate_limited(headers, permit, retry_after_s=5.0) is False

    _acquire(limiter, 100)
    assert clock.sleeps == []


def test_a_429_whose_headers_show_the_bucket_empty_holds_everyone_until_it_refills() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=1000)  # seeded high; the server's limit is 60 and it has none left
    [permit] = _acquire(limiter)
    headers = _headers("requests", 60, 0)

    limiter.observe(headers, permit)
    assert limiter.rate_limited(headers, permit, retry_after_s=5.0) is True

    _acquire(limiter, 2)
    # One request refills in a second at 60 a minute: the buckets hold everyone that long, not the retry-after.
    assert clock.sleeps == pytest.approx([1.0, 1.0])


def test_a_429_that_needs_more_input_tokens_than_are_left_holds_everyone() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, itpm=60_000)
    [permit] = _acquire(limiter, input_tokens=5000)
    headers = _headers("requests", 600, 500) | _headers("input-tokens", 60_000, 2000)

    limiter.observe(headers, permit)
    assert limiter.rate_limited(headers, permit, retry_after_s=5.0) is True


def test_a_lone_429_without_headers_holds_no_one_but_a_run_of_them_pauses_the_lane() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, rpm=600)
    permits = _acquire(limiter, 20)
    for permit in permits[:12]:
        limiter.settle(permit, 1, 1)  # twelve answers...

    assert limiter.rate_limited({}, permits[12], retry_after_s=2.0) is False  # ...then one 429: a stray one
    _acquire(limiter)
    assert clock.sleeps == []

    # Seven more of the last sixteen answers refused: the server is refusing as a rule; everyone waits its word.
    assert [limiter.rate_limited({}, permit, retry_after_s=2.0) for permit in permits[13:20]] == [False] * 6 + [True]
    _acquire(limiter)
    assert clock.sleeps == pytest.approx([2.0])


def test_retries_back_off_in_full_only_while_the_api_is_failing_as_a_rule() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    assert limiter.backoff_step(5) == 5  # nothing known yet: the full exponential backoff

    for permit in _acquire(limiter, 12):
        limiter.settle(permit, 1, 1)
    limiter.server_error()
    assert [limiter.backoff_step(attempt) for attempt in (1, 2, 3, 5)] == [1, 2, 2, 2]  # a stray failure

    for _ in range(7):
        limiter.server_error()  # 8 of the last 16 answers failed: the API's state, not bad luck
    assert limiter.backoff_step(5) == 5
