"""The emulator's request parsing as a pure function: any JSON gets a reply or an API error, never a crash."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_engine.emulator import EmulatorSettings
from batch_engine.emulator.state import EmulatorState
from batch_engine.emulator.wire import ApiFailure

STATE = EmulatorState(EmulatorSettings())
KEYS = st.sampled_from(
    [
        "role", "content", "type", "text", "cache_control", "ttl", "budget_tokens", "name", "input_schema",
        "tool_use_id", "id", "input", "thinking", "effort", "format", "schema", "display", "properties",
        "items", "minItems", "enum", "anyOf", "source", "data", "signature",
    ]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["user", "assistant", "text", "ephemeral", "1h", "5m", "tool", "any", "enabled", "adaptive"])
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=25
)
PARAMS = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["claude-haiku-5-5", "claude-haiku-4-5", "claude-opus-5-5", "nope", 7]),
        "max_tokens": st.integers(-1, 70_000) | JSON,
        "messages": st.lists(st.dictionaries(KEYS, JSON, max_size=3), max_size=3) | JSON,
    },
    optional={
        name: JSON
        for name in (
            "system",
            "tools",
            "tool_choice",
            "thinking",
            "output_config",
            "cache_control",
            "stop_sequences",
            "temperature",
            "top_k",
            "stream",
        )
    },
)


def _answer(params: Any) -> dict[str, Any] | None:
    try:
        prepared = STATE.prepare_message(params)
    except ApiFailure as failure:
        assert failure.status in (400, 404) and failure.message
        return None
    message, billed = STATE.answer(prepared, custom_id="row-1", lane="batch")
    assert billed.output_tokens <= prepared.request.max_tokens
    return message


@settings(max_examples=400, deadline=None)
@given(PARAMS)
def test_any_json_params_get_a_reply_or_an_api_error(params: dict[str, Any]) -> None:
    message = _answer(params)
    if message is not None:
        orjson.loads(orjson.dumps(message))


@settings(max_examples=150, deadline=None)
@given(JSON)
def test_any_json_body_gets_a_reply_or_an_api_error(body: Any) -> None:
    _answer(body)


@settings(max_examples=150, deadline=None)
@given(JSON)
def test_any_tool_schema_gives_a_bounded_tool_call(schema: Any) -> None:
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "go"}],
        "tools": [{"name": "t", "input_schema": (schema if isinstance(schema, dict) else {}) | {"type": "object"}}],
        "tool_choice": {"type": "any"},
    }
    message = _answer(params)
    assert message is not None and message["content"][0]["type"] == "tool_use"
    assert len(orjson.dumps(message)) < 100_000
