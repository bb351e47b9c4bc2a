"""Every JSON shape the emulator sends, validated against Anthropic's published OpenAPI spec.

The spec (tests/emulator/data/anthropic-openapi.json, copied from the shared reference) dates from late 2024. It
predates thinking blocks and their stream deltas and the `request_too_large` error type, so those are added
below as extra `oneOf` alternatives; every shape the spec does know is checked as published. Its response
schemas do not forbid extra properties, so newer fields (cache_creation, service_tier, ...) are tolerated.
Shapes the spec lacks entirely (deleted batch, models) are validated with the SDK's own pydantic types.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import TypeAdapter
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from batch_engine.emulator import RunningEmulator

STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(anthropic.types.RawMessageStreamEvent)
SPEC_PATH = Path(__file__).parent / "data" / "anthropic-openapi.json"
SPEC_URI = "urn:anthropic-openapi"
HAIKU = "claude-haiku-5-5"
LONG_SYSTEM = "You answer questions about the data platform. " * 60


def _extended_spec() -> dict[str, Any]:
    spec = copy.deepcopy(orjson.loads(SPEC_PATH.read_bytes()))
    schemas = spec["components"]["schemas"]
    del schemas["Model"]["type"]  # `"type": null` is not valid JSON Schema; the anyOf below it says it all
    schemas["ThinkingBlock"] = {
        "type": "object",
        "required": ["type", "thinking", "signature"],
        "properties": {"type": {"const": "thinking"}, "thinking": {"type": "string"}, "signature": {"type": "string"}},
    }
    thinking = {"$ref": "#/components/schemas/ThinkingBlock"}
    schemas["ContentBlock"]["oneOf"].append(thinking)
    schemas["BetaContentBlock"]["oneOf"].append(thinking)
    schemas["ContentBlockStartEvent"]["properties"]["content_block"]["oneOf"].append(thinking)
    schemas["ContentBlockDeltaEvent"]["properties"]["delta"]["oneOf"] += [
        {
            "type": "object",
            "required": ["type", "thinking"],
            "properties": {"type": {"const": "thinking_delta"}, "thinking": {"type": "string"}},
        },
        {
            "type": "object",
            "required": ["type", "signature"],
            "properties": {"type": {"const": "signature_delta"}, "signature": {"type": "string"}},
        },
    ]
    too_large = {
        "type": "object",
        "required": ["type", "message"],
        "properties": {"type": {"const": "request_too_large"}, "message": {"type": "string"}},
    }
    schemas["ErrorResponse"]["properties"]["error"]["oneOf"].append(too_large)
    schemas["BetaErrorResponse"]["properties"]["error"]["oneOf"].append(too_large)
    return spec


REGISTRY: Registry[Any] = Registry().with_resource(
    SPEC_URI, Resource.from_contents(_extended_spec(), default_specification=DRAFT202012)
)


def assert_matches(instance: Any, schema_name: str) -> None:
    validator = Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}, registry=REGISTRY, format_checker=FormatChecker()
    )
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(instance)
    ]
    assert not errors, f"{schema_name} mismatch:\n" + "\n".join(errors)


@pytest.fixture
def http(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, headers={"x-api-key": "k"}, timeout=30) as client:
        yield client


def _message(**params: Any) -> dict[str, Any]:
    return {"model": HAIKU, "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]} | params


def _sse_payloads(body: str) -> list[dict[str, Any]]:
    events = []
    for chunk in body.strip().split("\n\n"):
        name, data = chunk.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = orjson.loads(data[len("data: ") :])
        assert payload["type"] == name[len("event: ") :]
        events.append(payload)
    return events


def test_the_validator_rejects_drift() -> None:
    good = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": HAIKU,
        "content": [{"type": "text", "text": "x"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    assert_matches(good, "Message")
    for broken in (
        {key: value for key, value in good.items() if key != "stop_reason"},
        good | {"stop_reason": "finished"},
        good | {"content": [{"type": "text"}]},
        good | {"usage": {"input_tokens": "1", "output_tokens": 1}},
    ):
        with pytest.raises(AssertionError, match="Message mismatch"):
            assert_matches(broken, "Message")
    with pytest.raises(AssertionError, match="date-time"):
        assert_matches({"created_at": "yesterday"}, "BetaMessageBatch")


def test_messages_responses_match_the_spec(http: httpx.Client) -> None:
    cached_system = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    tool = {"name": "pick", "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}}
    bodies = [
        _message(),
        _message(system=cached_system),
        _message(system=cached_system, max_tokens=3),
        _message(model="claude-opus-5-5", max_tokens=2000),
        _message(model="claude-haiku-4-5", tools=[tool], tool_choice={"type": "tool", "name": "pick"}),
    ]
    for body in bodies:
        response = http.post("/v1/messages", json=body)
        assert response.status_code == 200, response.text
        assert_matches(response.json(), "Message")
        anthropic.types.Message.model_validate(response.json())


def test_stream_events_match_the_spec(http: httpx.Client) -> None:
    for body in (_message(stream=True), _message(model="claude-opus-5-5", max_tokens=2000, stream=True)):
        response = http.post("/v1/messages", json=body)
        assert response.headers["content-type"] == "text/event-stream"
        events = _sse_payloads(response.text)
        assert [event["type"] for event in events[:2]] == ["message_start", "ping"]
        assert events[-1]["type"] == "message_stop"
        for event in events:
            if event["type"] != "ping":  # ping is not in the published event union
                assert_matches(event, "MessageStreamEvent")
                STREAM_EVENT.validate_python(event)


def test_count_tokens_matches_the_spec(http: httpx.Client) -> None:
    response = http.post(
        "/v1/messages/count_tokens", json={"model": HAIKU, "messages": [{"role": "user", "content": "x"}]}
    )
    assert_matches(response.json(), "BetaCountMessageTokensResponse")


def test_error_bodies_match_the_spec(emulator: RunningEmulator, http: httpx.Client) -> None:
    emulator.configure(max_message_body_bytes=4096)
    responses = [
        http.post("/v1/messages", json=_message(max_tokens=0)),
        http.post("/v1/messages", json=_message(), headers={"x-api-key": ""}),
        http.post("/v1/messages", json=_message(model="claude-none")),
        http.post("/v1/messages", json=_message(messages=[{"role": "user", "content": "x" * 5000}])),
        http.post("/v1/messages/count_tokens", json={"model": HAIKU, "messages": []}),
    ]
    for kind in ("429", "529", "500"):
        emulator.script_fault("messages", kind)
        responses.append(http.post("/v1/messages", json=_message()))
    emulator.configure(rpm=1)
    responses += [http.post("/v1/messages", json=_message()) for _ in range(2)]
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 400, 400, 401, 404, 413, 429, 429, 500, 529]
    for response in responses:
        if response.status_code != 200:
            assert_matches(response.json(), "ErrorResponse")
            assert response.json()["request_id"] == response.headers["request-id"]


def test_batch_responses_match_the_spec(emulator: RunningEmulator, http: httpx.Client) -> None:
    emulator.configure(batch_row_error_rate=0.25, batch_row_expire_rate=0.25, seed=3)
    rows = [{"custom_id": f"r{index}", "params": _message()} for index in range(40)]
    rows.append({"custom_id": "invalid", "params": _message(max_tokens=0)})
    created = http.post("/v1/messages/batches", json={"requests": rows}).json()
    assert_matches(created, "BetaMessageBatch")
    emulator.configure(batch_duration_s=3600)
    to_cancel = http.post("/v1/messages/batches", json={"requests": rows[:3]}).json()
    canceling = http.post(f"/v1/messages/batches/{to_cancel['id']}/cancel").json()
    assert canceling["processing_status"] == "canceling"
    assert_matches(canceling, "BetaMessageBatch")

    for batch_id in (created["id"], to_cancel["id"]):
        while (batch := http.get(f"/v1/messages/batches/{batch_id}").json())["processing_status"] != "ended":
            assert_matches(batch, "BetaMessageBatch")
            time.sleep(0.01)
        assert_matches(batch, "BetaMessageBatch")
        anthropic.types.messages.MessageBatch.model_validate(batch)

    listed = http.get("/v1/messages/batches", params={"limit": 1}).json()
    assert_matches(listed, "BetaListResponse_MessageBatch_")
    types = set()
    for batch_id in (created["id"], to_cancel["id"]):
        for line in http.get(f"/v1/messages/batches/{batch_id}/results").text.splitlines():
            row = orjson.loads(line)
            types.add(row["result"]["type"])
            assert_matches(row, "BetaMessageBatchIndividualResponse")
            anthropic.types.messages.MessageBatchIndividualResponse.model_validate(row)
    assert types == {"succeeded", "errored", "canceled", "expired"}

    deleted = http.delete(f"/v1/messages/batches/{created['id']}").json()
    anthropic.types.messages.DeletedMessageBatch.model_validate(deleted)
    for response in (
        http.get("/v1/messages/batches/msgbatch_missing"),
        http.post("/v1/messages/batches", json={"requests": []}),
        http.delete(f"/v1/messages/batches/{created['id']}"),
    ):
        assert response.status_code in (400, 404)
        assert_matches(response.json(), "BetaErrorResponse")


def test_models_match_the_sdk_types(http: httpx.Client) -> None:
    page = http.get("/v1/models").json()
    assert set(page) == {"data", "has_more", "first_id", "last_id"}
    for model in page["data"]:
        anthropic.types.ModelInfo.model_validate(model)
    anthropic.types.ModelInfo.model_validate(http.get(f"/v1/models/{HAIKU}").json())
