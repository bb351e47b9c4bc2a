"""How the emulator holds large batches: rows split from the body without a whole parse tree, packed with their
shared system prompt once, results spooled to disk, long texts counted once; answers unchanged by any of it."""

from __future__ import annotations

import asyncio
import random
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch_engine.emulator import EmulatorSettings, RunningEmulator, start_emulator
from batch_engine.emulator.app import EmulatorApp
from batch_engine.emulator.rows import PackedRows, StreamedRows
from batch_engine.emulator.spool import ResultSpool
from batch_engine.emulator.state import EmulatorState
from batch_engine.emulator.tokenizer import _count_pieces, _PieceCounts, text_tokens
from batch_engine.emulator.wire import rfc3339

HAIKU = "claude-haiku-5-5"
SYSTEM = [
    {"type": "text", "text": "Shared instructions, rule %d of many. " * 150, "cache_control": {"type": "ephemeral"}}
]


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


def _row(index: int, **extra: Any) -> dict[str, Any]:
    params = {
        "model": HAIKU,
        "max_tokens": 16,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": f"q{index}"}],
    }
    return {"custom_id": f"r{index}", "params": params | extra}


def _streamed(body: bytes, chunk: int) -> StreamedRows:
    rows = StreamedRows()
    for start in range(0, len(body), chunk):
        rows.feed(body[start : start + chunk])
    rows.finish()
    return rows


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 30])
def test_streamed_rows_are_the_items_a_full_parse_gives(chunk: int) -> None:
    rows = [_row(index) for index in range(40)]
    compact = orjson.dumps({"requests": rows})
    spaced = b' {\n "requests" : [\n ' + b" ,\n ".join(orjson.dumps(row) for row in rows) + b"\n ] }\n"
    for body in (compact, spaced):
        streamed = _streamed(body, chunk)
        assert not streamed.whole
        assert streamed.custom_ids == [row["custom_id"] for row in rows]
        assert [streamed.rows.params(index) for index in range(len(rows))] == [row["params"] for row in rows]
        assert streamed.whole_body() == body


@pytest.mark.parametrize(
    "body",
    [
        b'{"requests":[]}',
        b'{"requests":[{"params":{},"custom_id":"a"}]}',  # params first
        b'{"requests":[{"custom_id":"a","params":{}}],"extra":1}',
        b'{"requests":[{"custom_id":"a","params":{}} {"custom_id":"b","params":{}}]}',
        b'{"requests":[{"custom_id":"a b","params":{}}]}',
        b'{"requests":[{"custom_id":"a","params":{}},{"custom_id":"a","params":{}}]}',
        b'{"requests":[{"custom_id":"a","params":{}}]',
    ],
)
def test_streamed_rows_leave_anything_unusual_to_a_full_parse(body: bytes) -> None:
    for chunk in (1, 5, 1 << 30):
        streamed = _streamed(body, chunk)
        assert streamed.whole and streamed.whole_body() == body


def test_a_nested_custom_id_key_or_broken_json_answers_as_a_full_parse(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    # A tool whose schema has a `custom_id` property puts `{"custom_id"` inside a row: the cut there is wrong and
    # the batch must still be read whole and right.
    tool = {"name": "save", "input_schema": {"type": "object", "properties": {"custom_id": {"type": "string"}}}}
    rows = [_row(index, tools=[tool]) for index in range(3)]
    emulator.configure(batch_duration_s=0)
    with httpx.Client(base_url=emulator.base_url, headers={"x-api-key": "k"}) as http:
        created = http.post("/v1/messages/batches", content=orjson.dumps({"requests": rows}))
        assert created.status_code == 200, created.text
        # A bad custom_id in row 0 and invalid JSON in the last row: invalid JSON is what the API reports.
        broken = orjson.dumps({"requests": [{"custom_id": "bad id", "params": {}}, _row(1)]}).replace(b'"q1"', b"q1")
        refused = http.post("/v1/messages/batches", content=broken)
        assert refused.status_code == 400 and "not valid JSON" in refused.json()["error"]["message"]
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 20
    while client.messages.batches.retrieve(batch_id).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    results = {row.custom_id: row.result.type for row in client.messages.batches.results(batch_id)}
    assert results == {"r0": "succeeded", "r1": "succeeded", "r2": "succeeded"}


def test_packed_rows_read_back_as_sent_and_hold_a_shared_prompt_once() -> None:
    sent = [_row(index, metadata={"user_id": f"u{index}"})["params"] for index in range(2000)]
    body = orjson.dumps(sent)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        parsed = orjson.loads(body)  # every row its own copy of the system prompt, as in a create body
        packed = PackedRows()
        for params in parsed:
            packed.append(params)
        del parsed, params
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    system_bytes = len(orjson.dumps(SYSTEM))
    assert held < 2000 * system_bytes / 10, f"{held} bytes held for 2000 rows of a {system_bytes}-byte system"
    assert packed.params(7) == sent[7] and list(packed.params(7) or {}) == list(sent[7])
    assert packed.take(7) == sent[7] and packed.params(7) is None


def _asgi_create(app: EmulatorApp, body: bytes, chunk: int = 65536) -> tuple[int, bytes]:
    headers = [(b"x-api-key", b"k"), (b"content-length", str(len(body)).encode()), (b"host", b"emulator")]
    scope = {"type": "http", "method": "POST", "path": "/v1/messages/batches", "headers": headers, "query_string": b""}
    offsets = iter(range(0, len(body), chunk))
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        start = next(offsets)
        return {"type": "http.request", "body": body[start : start + chunk], "more_body": start + chunk < len(body)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:])


def test_creating_a_large_batch_never_holds_its_whole_body() -> None:
    # Joined chunks plus a whole parse tree held a 200 MB body ~3 times over, and three creates may arrive at once;
    # taken in row by row, what stays is the packed rows: the shared system prompt once, each row's own bytes.
    app = EmulatorApp(EmulatorState(EmulatorSettings()))
    body = orjson.dumps({"requests": [_row(index) for index in range(3000)]})
    tracemalloc.start()
    try:
        status, answer = _asgi_create(app, body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 200, answer
    assert peak < 0.25 * len(body), f"peak {peak / len(body):.2f}x the {len(body)}-byte body"


def test_a_half_answered_batch_survives_a_restart_with_its_results(tmp_path: Path) -> None:
    settings = EmulatorSettings(state_file=tmp_path / "emulator.json", batch_duration_s=100)
    with start_emulator(settings) as first, anthropic.Anthropic(base_url=first.base_url, api_key="k") as client:
        batch = client.messages.batches.create(requests=[_row(index) for index in range(10)])  # type: ignore[misc]
        first.advance_clock(55)
        deadline = time.monotonic() + 10
        while first.stats()["batch_rows_processed"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    with start_emulator(settings) as second, anthropic.Anthropic(base_url=second.base_url, api_key="k") as client:
        assert second.stats()["batch_rows_processed"] >= 5
        second.advance_clock(100)
        deadline = time.monotonic() + 10
        while client.messages.batches.retrieve(batch.id).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        results = list(client.messages.batches.results(batch.id))
    assert sorted(row.custom_id for row in results) == sorted(f"r{index}" for index in range(10))
    assert all(row.result.type == "succeeded" for row in results)


def test_spooled_results_come_back_in_the_order_a_shuffled_list_would() -> None:
    lines = [f'{{"n":{index}}}'.encode() for index in range(500)]
    spool = ResultSpool(lines)
    spool.shuffle(random.Random("7:msgbatch_x"))
    expected = list(lines)
    random.Random("7:msgbatch_x").shuffle(expected)
    assert list(spool.lines()) == expected
    assert list(ResultSpool(spool.lines()).lines()) == expected  # as a snapshot restores them
    spool.close()


def test_long_text_counts_are_remembered_within_a_bound() -> None:
    counts = _PieceCounts(max_chars=1000)
    texts = [f"text number {index} " * 30 for index in range(20)]
    assert [counts.pieces(text) for text in texts] == [_count_pieces(text) for text in texts]
    assert [counts.pieces(text) for text in texts] == [_count_pieces(text) for text in texts]
    assert sum(len(text) for text in counts._counts) <= 1000
    long = "word " * 400
    assert text_tokens(long, "legacy") == text_tokens(long, "legacy") == _count_pieces(long)
    assert text_tokens(long, "new") == (_count_pieces(long) * 13 + 9) // 10


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False) | st.integers(0, 4 * 10**15).map(lambda n: n / 1e6))
def test_rfc3339_matches_datetime(timestamp: float) -> None:
    assert rfc3339(timestamp) == datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
