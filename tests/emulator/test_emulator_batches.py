"""The emulator's Message Batches API through the real SDK: lifecycle, listing, results, faults, expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from batch_engine.emulator import RunningEmulator, reply_digest

HAIKU = "claude-haiku-5-5"
DAY_S = 24 * 3600


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


def _rows(count: int, prefix: str = "task", **params: Any) -> list[Any]:
    return [
        {
            "custom_id": f"{prefix}-{index}",
            "params": {"model": HAIKU, "max_tokens": 64, "messages": [{"role": "user", "content": f"{prefix} {index}"}]}
            | params,
        }
        for index in range(count)
    ]


def _wait_ended(client: anthropic.Anthropic, batch_id: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        counts = batch.request_counts
        total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
        assert total == batch.request_counts.processing or batch.processing_status == "ended"
        if batch.processing_status == "ended":
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} did not end"
        time.sleep(0.02)


def test_batch_lifecycle_and_results(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(batch_duration_s=0.5)
    created = client.messages.batches.create(requests=_rows(3, thinking={"type": "disabled"}))
    assert created.id.startswith("msgbatch_") and created.processing_status == "in_progress"
    assert created.results_url is None and created.ended_at is None
    assert created.expires_at - created.created_at == timedelta(hours=24)
    # Until the batch ends, every request counts as processing and nothing else moves.
    polled = client.messages.batches.retrieve(created.id)
    assert polled.processing_status == "in_progress"
    assert polled.request_counts.model_dump() == {
        "processing": 3,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }

    ended = _wait_ended(client, created.id)
    assert ended.request_counts.model_dump() == {
        "processing": 0,
        "succeeded": 3,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert ended.ended_at is not None and ended.ended_at >= created.created_at
    assert ended.results_url == f"{emulator.base_url}/v1/messages/batches/{created.id}/results"

    results = {row.custom_id: row.result for row in client.messages.batches.results(created.id)}
    assert set(results) == {"task-0", "task-1", "task-2"}
    for custom_id, result in results.items():
        assert result.type == "succeeded"
        text = result.message.content[0].text
        assert text.startswith(f"echo:{reply_digest(custom_id.replace('-', ' '))} custom_id:{custom_id}")
        assert result.message.usage.service_tier == "batch"


def test_results_come_back_shuffled(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=_rows(200))
    _wait_ended(client, batch.id)
    order = [row.custom_id for row in client.messages.batches.results(batch.id)]
    assert sorted(order) == sorted(f"task-{index}" for index in range(200))
    assert order != [f"task-{index}" for index in range(200)]


def test_async_results_stream(emulator: RunningEmulator) -> None:
    async def run() -> dict[str, str]:
        async with anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="k", max_retries=0) as sdk:
            batch = await sdk.messages.batches.create(requests=_rows(50, "async"))
            while batch.processing_status != "ended":
                await asyncio.sleep(0.02)
                batch = await sdk.messages.batches.retrieve(batch.id)
            decoder = await sdk.messages.batches.results(batch.id)
            return {row.custom_id: row.result.type async for row in decoder}

    assert asyncio.run(run()) == {f"async-{index}": "succeeded" for index in range(50)}


def test_list_is_newest_first_with_cursors(client: anthropic.Anthropic) -> None:
    ids = [client.messages.batches.create(requests=_rows(1, f"b{index}")).id for index in range(5)]
    newest_first = ids[::-1]

    first_page = client.messages.batches.list(limit=2)
    assert [batch.id for batch in first_page.data] == newest_first[:2]
    assert first_page.has_more and first_page.first_id == newest_first[0] and first_page.last_id == newest_first[1]
    assert [batch.id for batch in client.messages.batches.list(limit=2)] == newest_first  # auto-pagination

    older = client.messages.batches.list(limit=10, after_id=newest_first[2])
    assert [batch.id for batch in older.data] == newest_first[3:] and not older.has_more
    newer = client.messages.batches.list(limit=1, before_id=newest_first[2])
    assert [batch.id for batch in newer.data] == [newest_first[1]] and newer.has_more


def test_cancel_ends_with_unfinished_rows_canceled(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(batch_duration_s=3600)
    batch = client.messages.batches.create(requests=_rows(10))
    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None

    ended = _wait_ended(client, batch.id)
    assert ended.request_counts.canceled == 10 and ended.request_counts.processing == 0
    assert {row.result.type for row in client.messages.batches.results(batch.id)} == {"canceled"}
    # Canceling an ended batch changes nothing.
    assert client.messages.batches.cancel(batch.id).processing_status == "ended"


def test_delete_only_after_the_batch_ended(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(batch_duration_s=3600)
    batch = client.messages.batches.create(requests=_rows(2))
    with pytest.raises(anthropic.BadRequestError, match="cancel it"):
        client.messages.batches.delete(batch.id)
    client.messages.batches.cancel(batch.id)
    _wait_ended(client, batch.id)

    deleted = client.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    assert emulator.stats()["batch_rows"]["canceled"] == 2


def test_unknown_batch_is_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_doesnotexist")


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        ([], "between 1 and"),
        ([{"custom_id": "has space", "params": {}}], "custom_id: String should match pattern"),
        ([{"custom_id": "x" * 65, "params": {}}], "custom_id: String should match pattern"),
        ([{"custom_id": "same", "params": {}}, {"custom_id": "same", "params": {}}], "not unique"),
        ([{"custom_id": "s", "params": {"stream": True}}], "streaming is not supported"),
        ([{"custom_id": "p", "params": "not an object"}], "params: Input should be an object"),
    ],
)
def test_create_rejects_malformed_batches(client: anthropic.Anthropic, requests: Any, expected: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=requests)
    assert expected in str(caught.value.api_message)


def test_create_rejects_too_many_rows_and_too_many_bytes(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.configure(max_batch_requests=3, max_batch_body_bytes=4096)
    with pytest.raises(anthropic.BadRequestError, match="between 1 and 3"):
        client.messages.batches.create(requests=_rows(4))
    with pytest.raises(anthropic.ContentTooLargeError):
        client.messages.batches.create(requests=_rows(2, "x" * 3000))
    assert emulator.stats()["batches_created"] == 0


def test_bad_rows_become_errored_results_not_a_rejected_batch(client: anthropic.Anthropic) -> None:
    rows = _rows(2)
    rows.append({"custom_id": "zero", "params": {"model": HAIKU, "max_tokens": 0, "messages": [{"role": "user"}]}})
    manual_thinking = {"thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 4000}
    rows.append({"custom_id": "manual", "params": rows[0]["params"] | manual_thinking})
    rows.append({"custom_id": "nomodel", "params": rows[0]["params"] | {"model": "claude-nope"}})
    batch = client.messages.batches.create(requests=rows)
    ended = _wait_ended(client, batch.id)
    assert (ended.request_counts.succeeded, ended.request_counts.errored) == (2, 3)

    errors = {
        row.custom_id: (row.result.error.error.type, row.result.error.error.message)
        for row in client.messages.batches.results(batch.id)
        if row.result.type == "errored"
    }
    assert errors["zero"][0] == "invalid_request_error" and "max_tokens" in errors["zero"][1]
    assert errors["manual"][0] == "invalid_request_error" and "thinking.type.enabled" in errors["manual"][1]
    assert errors["nomodel"][0] == "not_found_error"


def test_rows_not_done_by_expiry_are_expired(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(batch_never_ends=True)
    batch = client.messages.batches.create(requests=_rows(4))
    emulator.advance_clock(DAY_S - 60)
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"

    emulator.advance_clock(120)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.request_counts.expired == 4
    assert ended.ended_at is not None and ended.ended_at >= ended.expires_at
    assert {row.result.type for row in client.messages.batches.results(batch.id)} == {"expired"}


def test_time_scale_runs_a_day_in_a_fraction_of_a_second(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.configure(batch_never_ends=True, time_scale=DAY_S * 4)  # 24 h pass in 0.25 s of wall time
    batch = client.messages.batches.create(requests=_rows(3))
    started = time.monotonic()
    ended = _wait_ended(client, batch.id, timeout_s=5)
    assert ended.request_counts.expired == 3
    assert 0.2 < time.monotonic() - started < 3


def test_results_are_archived_29_days_after_creation(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=_rows(1))
    _wait_ended(client, batch.id)
    emulator.advance_clock(29 * DAY_S + 1)
    archived = client.messages.batches.retrieve(batch.id)
    assert archived.archived_at is not None and archived.results_url is None
    with httpx.Client(base_url=emulator.base_url, headers={"x-api-key": "k"}) as http:
        response = http.get(f"/v1/messages/batches/{batch.id}/results")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_results_before_the_end_are_refused(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(batch_duration_s=3600)
    batch = client.messages.batches.create(requests=_rows(1))
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        client.messages.batches.results(batch.id)
    with httpx.Client(base_url=emulator.base_url, headers={"x-api-key": "k"}) as http:
        response = http.get(f"/v1/messages/batches/{batch.id}/results")
    assert response.status_code == 400 and "not finished" in response.json()["error"]["message"]


def test_row_fault_rates_error_and_expire_their_share(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(batch_row_error_rate=0.2, batch_row_error_type="overloaded_error", batch_row_expire_rate=0.1)
    batch = client.messages.batches.create(requests=_rows(1000))
    counts = _wait_ended(client, batch.id).request_counts
    assert 140 <= counts.errored <= 260 and 60 <= counts.expired <= 140
    assert counts.succeeded + counts.errored + counts.expired == 1000
    errored = [row.result for row in client.messages.batches.results(batch.id) if row.result.type == "errored"]
    assert {result.error.error.type for result in errored} == {"overloaded_error"}
    stats = emulator.stats()
    assert stats["batch_rows"] == {
        "succeeded": counts.succeeded,
        "errored": counts.errored,
        "canceled": 0,
        "expired": counts.expired,
    }
    assert stats["tokens_billed_by_lane"]["batch"]["output"] > 0


def test_stats_expose_a_chunk_submitted_twice(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    first = client.messages.batches.create(requests=_rows(5))
    second = client.messages.batches.create(requests=_rows(5))
    client.messages.batches.create(requests=_rows(3, "other"))
    _wait_ended(client, first.id)
    _wait_ended(client, second.id)
    stats = emulator.stats()
    assert stats["batches_created"] == 3 and stats["batch_rows_created"] == 13
    assert stats["duplicate_custom_ids_across_batches"] == 5
    assert stats["duplicate_batch_payloads"] == 1
    assert stats["duplicate_succeeded_custom_ids"] == 5


def test_batch_endpoints_have_their_own_rpm(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(batch_rpm=2, rpm=1000)
    batch = client.messages.batches.create(requests=_rows(1))
    client.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.batches.retrieve(batch.id)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    # Messages are limited separately.
    client.messages.create(model=HAIKU, max_tokens=10, messages=[{"role": "user", "content": "still fine"}])


def test_a_100k_row_batch_is_created_and_processed_in_full(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    # Raw HTTP with orjson: this exercises the emulator, not the SDK's request building and result parsing. How
    # fast it is belongs to `python -m batch_engine.bench batch --tasks 100000`, not to a timed assertion here.
    emulator.configure(batch_duration_s=0)
    rows = [
        {
            "custom_id": f"r{index}",
            "params": {"model": HAIKU, "max_tokens": 16, "messages": [{"role": "user", "content": str(index)}]},
        }
        for index in range(100_000)
    ]
    with httpx.Client(base_url=emulator.base_url, headers={"x-api-key": "k"}, timeout=60) as http:
        created = http.post("/v1/messages/batches", content=orjson.dumps({"requests": rows}))
        assert created.status_code == 200, created.text
        ended = _wait_ended(client, created.json()["id"], timeout_s=60)
        assert ended.request_counts.succeeded == 100_000
        with http.stream("GET", ended.results_url or "") as response:
            ids = {orjson.loads(line)["custom_id"] for line in response.iter_lines() if line}
    assert len(ids) == 100_000


def test_async_client_lists_cancels_and_deletes(emulator: RunningEmulator) -> None:
    emulator.configure(batch_duration_s=3600)

    async def run() -> tuple[list[str], list[str], str, str, list[str]]:
        async with anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="k", max_retries=0) as sdk:
            created = [(await sdk.messages.batches.create(requests=_rows(2, f"a{index}"))).id for index in range(3)]
            listed = [batch.id async for batch in sdk.messages.batches.list(limit=2)]
            batch = await sdk.messages.batches.cancel(created[0])
            canceling = batch.processing_status
            while batch.processing_status != "ended":
                await asyncio.sleep(0.02)
                batch = await sdk.messages.batches.retrieve(created[0])
            deleted = await sdk.messages.batches.delete(created[0])
            models = [model.id async for model in sdk.models.list()]
            return created, listed, canceling, deleted.type, models

    created, listed, canceling, deleted, models = asyncio.run(run())
    assert listed == created[::-1]
    assert canceling == "canceling" and deleted == "message_batch_deleted"
    assert HAIKU in models
    assert emulator.stats()["batches"] == {"in_progress": 2, "canceling": 0, "ended": 0}


def test_a_create_over_the_batch_queue_cap_is_a_429_until_earlier_batches_end(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.configure(batch_queue_cap=5, batch_duration_s=0.5)
    first = client.messages.batches.create(requests=_rows(4))
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.batches.create(requests=_rows(2, prefix="more"))
    assert caught.value.type == "rate_limit_error" and "processing queue" in str(caught.value.api_message)
    assert float(caught.value.response.headers["retry-after-ms"]) > 0
    assert client.messages.batches.create(requests=_rows(1, prefix="fits")).request_counts.processing == 1
    _wait_ended(client, first.id)
    assert client.messages.batches.create(requests=_rows(2, prefix="more")).processing_status == "in_progress"
