"""The emulator's Messages, streaming, count_tokens and models endpoints, driven through the real SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from batch_engine.config import load_config
from batch_engine.emulator import RunningEmulator, reply_digest, text_tokens


def tokens(text: str) -> int:
    """The emulator's count for a 5.x model (the new tokenizer family)."""
    return text_tokens(text, "new")


HAIKU = "claude-haiku-5-5"  # 5.x: no sampling params, no manual thinking
OPUS = "claude-opus-5-5"  # thinking always on
LEGACY = "claude-haiku-4-5"  # manual thinking and sampling params allowed
OFF: Any = {"type": "disabled"}  # Haiku 5.5 thinks by default; tests of the text turn it off


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=emulator.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def _text(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_reply_proves_which_request_it_answers(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model=HAIKU, max_tokens=200, messages=_user("What is 2 + 2?"), thinking=OFF)
    again = client.messages.create(model=HAIKU, max_tokens=200, messages=_user("What is 2 + 2?"), thinking=OFF)
    other = client.messages.create(model=HAIKU, max_tokens=200, messages=_user("What is 3 + 3?"), thinking=OFF)

    assert _text(first).startswith(f"echo:{reply_digest('What is 2 + 2?')}")
    assert _text(first) == _text(again)
    assert _text(other).startswith(f"echo:{reply_digest('What is 3 + 3?')}")
    assert first.id != again.id and first.id.startswith("msg_")
    assert first.model == HAIKU and first.role == "assistant" and first.stop_reason == "end_turn"
    assert first.usage.input_tokens == tokens("What is 2 + 2?")
    assert first.usage.output_tokens == tokens(_text(first))
    assert first.usage.service_tier == "standard"


def test_digest_covers_the_last_user_message_only(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
    ]
    reply = client.messages.create(model=HAIKU, max_tokens=100, messages=messages, thinking=OFF)
    assert _text(reply).startswith(f"echo:{reply_digest('part one' + chr(10) + 'part two')}")


def test_async_client_gets_the_same_reply(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    async def ask() -> Any:
        async with anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="sk-test", max_retries=0) as sdk:
            return await asyncio.gather(
                *(sdk.messages.create(model=HAIKU, max_tokens=100, messages=_user(f"q{i}")) for i in range(5))
            )

    replies = asyncio.run(ask())
    for index, reply in enumerate(replies):
        expected = client.messages.create(model=HAIKU, max_tokens=100, messages=_user(f"q{index}"))
        assert _text(reply) == _text(expected)
    assert emulator.stats()["calls"]["POST /v1/messages"] == {"200": 10}


def test_output_never_exceeds_max_tokens(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(model=HAIKU, max_tokens=3, messages=_user("tell me everything"))
    assert reply.stop_reason == "max_tokens"
    assert reply.usage.output_tokens == 3
    assert len(_text(reply)) <= 12


def test_reply_tokens_setting_sets_the_reply_length(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(reply_tokens=150)
    reply = client.messages.create(model=HAIKU, max_tokens=1000, messages=_user("long please"), thinking=OFF)
    assert reply.usage.output_tokens == 150
    assert reply.stop_reason == "end_turn"


def test_stop_sequence_cuts_the_reply(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(reply_tokens=400)
    reply = client.messages.create(model=HAIKU, max_tokens=1000, messages=_user("x"), stop_sequences=["dolor"])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "dolor"
    assert "dolor" not in _text(reply)


def test_forced_tool_use_returns_input_matching_the_schema(client: anthropic.Anthropic) -> None:
    tool = {
        "name": "classify",
        "description": "Classify a ticket",
        "input_schema": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["bug", "billing"]}, "reason": {"type": "string"}},
            "required": ["label", "reason"],
        },
    }
    reply = client.messages.create(
        model=LEGACY,
        max_tokens=200,
        messages=_user("my invoice is wrong"),
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "classify"},
    )
    assert reply.stop_reason == "tool_use"
    (block,) = reply.content
    assert block.type == "tool_use" and block.name == "classify"
    assert block.input == {"label": "bug", "reason": f"echo:{reply_digest('my invoice is wrong')}"}


def test_json_output_format_gives_parseable_json(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"summary": {"type": "string"}, "score": {"type": "integer"}}}
    reply = client.messages.create(
        model=HAIKU,
        max_tokens=200,
        messages=_user("summarize"),
        thinking=OFF,
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert orjson.loads(_text(reply)) == {"summary": f"echo:{reply_digest('summarize')}", "score": 0}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"max_tokens": 10, "messages": _user("hi")}, "model: Field required"),
        ({"model": 123, "max_tokens": 10, "messages": _user("hi")}, "model: Input should be a valid string"),
        ({"model": HAIKU, "messages": _user("hi")}, "max_tokens: Field required"),
        ({"model": HAIKU, "max_tokens": 0, "messages": _user("hi")}, "greater than or equal to 1"),
        ({"model": LEGACY, "max_tokens": 64_001, "messages": _user("hi")}, "maximum allowed number of output tokens"),
        ({"model": HAIKU, "max_tokens": 10, "messages": []}, "at least one message"),
        ({"model": HAIKU, "max_tokens": 10, "messages": _user("   ")}, "non-whitespace"),
        (
            {"model": HAIKU, "max_tokens": 10, "messages": [{"role": "assistant", "content": "x"}]},
            'first message must use the "user" role',
        ),
        ({"model": HAIKU, "max_tokens": 10, "messages": _user("hi"), "bogus": 1}, "bogus: Extra inputs"),
        (
            {
                "model": HAIKU,
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": f"t{i}", "cache_control": {"type": "ephemeral"}} for i in range(5)
                        ],
                    }
                ],
            },
            "A maximum of 4 blocks with cache_control",
        ),
        (
            {
                "model": HAIKU,
                "max_tokens": 10,
                "cache_control": {"type": "ephemeral"},
                "system": [{"type": "text", "text": f"s{i}", "cache_control": {"type": "ephemeral"}} for i in range(4)],
                "messages": _user("hi"),
            },
            "A maximum of 4 blocks with cache_control",
        ),
        (
            {
                "model": HAIKU,
                "max_tokens": 10,
                "system": [
                    {"type": "text", "text": "a", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
                    {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                ],
                "messages": _user("hi"),
            },
            "ttl='1h' cache entry must come before",
        ),
        (
            {
                "model": HAIKU,
                "max_tokens": 4000,
                "thinking": {"type": "enabled", "budget_tokens": 2000},
                "messages": _user("hi"),
            },
            '"thinking.type.enabled" is not supported for this model',
        ),
        (
            {
                "model": LEGACY,
                "max_tokens": 4000,
                "thinking": {"type": "enabled", "budget_tokens": 1000},
                "messages": _user("hi"),
            },
            "budget_tokens: Input should be greater than or equal to 1024",
        ),
        (
            {
                "model": LEGACY,
                "max_tokens": 2000,
                "thinking": {"type": "enabled", "budget_tokens": 2000},
                "messages": _user("hi"),
            },
            "`max_tokens` must be greater than `thinking.budget_tokens`",
        ),
        ({"model": HAIKU, "max_tokens": 10, "temperature": 0.2, "messages": _user("hi")}, "temperature"),
        ({"model": HAIKU, "max_tokens": 10, "top_k": 5, "messages": _user("hi")}, "top_k"),
        (
            {"model": OPUS, "max_tokens": 10, "thinking": {"type": "disabled"}, "messages": _user("hi")},
            "thinking.type.disabled is not supported for this model",
        ),
        (
            {
                "model": HAIKU,
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
            },
            "prefill",
        ),
    ],
)
def test_invalid_requests_are_400_with_a_useful_message(
    client: anthropic.Anthropic, body: dict[str, Any], expected: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.post("/v1/messages", body=body, cast_to=anthropic.types.Message)
    assert caught.value.status_code == 400
    assert caught.value.type == "invalid_request_error"
    assert expected in str(caught.value.api_message)


OLD_VERSION = {"anthropic-version": "2023-06-01"}


def test_sampling_params_and_prefill_pass_on_models_that_take_them_under_2023_06_01(
    client: anthropic.Anthropic,
) -> None:
    reply = client.messages.create(
        model=LEGACY,
        max_tokens=50,
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
        extra_body={"temperature": 0.2, "top_k": 5},
        extra_headers=OLD_VERSION,
    )
    assert reply.stop_reason in ("end_turn", "max_tokens")


@pytest.mark.parametrize("name", ["temperature", "top_p", "top_k"])
@pytest.mark.parametrize("model", [LEGACY, HAIKU])
def test_sampling_params_are_400_on_every_model_under_2026_10_21_even_at_defaults(
    client: anthropic.Anthropic, name: str, model: str
) -> None:
    default = {"temperature": 1.0, "top_p": 1.0, "top_k": 1}[name]
    request: Any = {"model": model, "max_tokens": 50, "messages": _user("hi"), "extra_body": {name: default}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(**request)  # the SDK sends anthropic-version: 2026-10-21
    assert caught.value.api_message == f"{name}: Extra inputs are not permitted"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model=model, messages=_user("hi"), extra_body={name: default})
    if model == LEGACY:
        assert client.messages.create(**request, extra_headers=OLD_VERSION).stop_reason == "end_turn"


def test_document_in_an_assistant_turn_and_user_citations_are_400_under_2026_10_21(
    client: anthropic.Anthropic,
) -> None:
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "a note"}}
    cited = {
        "type": "text",
        "text": "see the note",
        "citations": [{"type": "char_location", "cited_text": "a", "document_index": 0, "start_char_index": 0}],
    }
    assistant_document: Any = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [document]},
        {"role": "user", "content": "and?"},
    ]
    user_citations: Any = [{"role": "user", "content": [cited]}]
    for messages, expected in (
        (assistant_document, "messages.1.content.0: document blocks are not permitted in assistant messages"),
        (user_citations, "messages.0.content.0.citations: citations are not permitted"),
    ):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model=LEGACY, max_tokens=50, messages=messages)
        assert str(caught.value.api_message).startswith(expected)
        old = client.messages.create(model=LEGACY, max_tokens=50, messages=messages, extra_headers=OLD_VERSION)
        assert old.stop_reason == "end_turn"


def test_a_batch_row_with_temperature_errors_only_when_the_batch_ends(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    params: Any = {"model": HAIKU, "max_tokens": 50, "messages": _user("hi"), "temperature": 0.5}
    batch = client.messages.batches.create(requests=[{"custom_id": "hot", "params": params}])
    while batch.processing_status != "ended":
        batch = client.messages.batches.retrieve(batch.id)
    (row,) = list(client.messages.batches.results(batch.id))
    assert row.result.type == "errored"
    assert row.result.error.error.message == "temperature: Extra inputs are not permitted"


def test_unknown_model_is_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="claude-nonexistent-9", max_tokens=10, messages=_user("hi"))
    assert caught.value.type == "not_found_error"
    assert "claude-nonexistent-9" in str(caught.value.api_message)


def test_body_over_the_size_limit_is_413(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    emulator.configure(max_message_body_bytes=4096)
    with pytest.raises(anthropic.ContentTooLargeError) as caught:
        client.messages.create(model=HAIKU, max_tokens=10, messages=_user("x" * 5000))
    assert caught.value.status_code == 413 and caught.value.type == "request_too_large"
    assert client.messages.create(model=HAIKU, max_tokens=10, messages=_user("x" * 3000)).usage.input_tokens == tokens(
        "x" * 3000
    )


def test_stream_delivers_the_same_message_as_create(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(model=HAIKU, max_tokens=300, messages=_user("stream me"))
    with client.messages.stream(model=HAIKU, max_tokens=300, messages=_user("stream me")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == _text(final) == _text(plain)
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens
    assert final.stop_reason == "end_turn"


def test_async_stream_with_thinking_has_signed_thinking_block(emulator: RunningEmulator) -> None:
    async def run() -> Any:
        async with (
            anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="sk-test", max_retries=0) as sdk,
            sdk.messages.stream(model=OPUS, max_tokens=4000, messages=_user("think first")) as stream,
        ):
            events = [event.type async for event in stream]
            return events, await stream.get_final_message()

    events, final = asyncio.run(run())
    assert events[0] == "message_start" and events[-1] == "message_stop"
    thinking, text = final.content
    assert thinking.type == "thinking" and thinking.signature and reply_digest("think first") in thinking.thinking
    assert text.type == "text" and text.text.startswith(f"echo:{reply_digest('think first')}")
    details = final.usage.output_tokens_details
    assert details is not None and details.thinking_tokens > 0
    # Thinking is billed as output at its full size, more than the visible summary.
    assert final.usage.output_tokens == details.thinking_tokens + tokens(text.text)
    assert details.thinking_tokens > tokens(thinking.thinking)


def test_manual_thinking_respects_budget_and_omitted_display(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(
        model=LEGACY,
        max_tokens=3000,
        thinking={"type": "enabled", "budget_tokens": 1024, "display": "omitted"},
        messages=_user("hard problem"),
    )
    thinking = reply.content[0]
    assert thinking.type == "thinking" and thinking.thinking == "" and thinking.signature
    details = reply.usage.output_tokens_details
    assert details is not None and 0 < details.thinking_tokens <= 1024


def test_count_tokens_equals_billed_input(emulator: RunningEmulator, client: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {
        "model": HAIKU,
        "system": "You are terse.",
        "tools": [{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
        "messages": [
            {"role": "user", "content": "Look up the weather"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
        ],
    }
    counted = client.messages.count_tokens(**request)
    billed = client.messages.create(max_tokens=50, **request)
    assert counted.input_tokens == billed.usage.input_tokens > 0

    async def count_async() -> int:
        async with anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="k", max_retries=0) as sdk:
            return (await sdk.messages.count_tokens(**request)).input_tokens

    assert asyncio.run(count_async()) == counted.input_tokens


def test_raw_response_carries_request_id_and_rate_limit_headers(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.configure(rpm=50, itpm=10_000, otpm=5_000)
    raw = client.messages.with_raw_response.create(model=HAIKU, max_tokens=100, messages=_user("headers"))
    message = raw.parse()
    headers = raw.headers
    assert raw.request_id is not None and raw.request_id.startswith("req_")
    assert headers["anthropic-ratelimit-requests-limit"] == "50"
    assert headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "10000"
    assert int(headers["anthropic-ratelimit-input-tokens-remaining"]) == 10_000 - message.usage.input_tokens
    assert int(headers["anthropic-ratelimit-output-tokens-remaining"]) == 5_000 - message.usage.output_tokens
    for name in ("requests", "input-tokens", "output-tokens", "tokens"):
        reset = datetime.fromisoformat(headers[f"anthropic-ratelimit-{name}-reset"])
        assert reset.tzinfo is not None


def test_every_response_has_a_request_id(emulator: RunningEmulator) -> None:
    with httpx.Client(base_url=emulator.base_url) as http:
        for response in (
            http.get("/v1/models", headers={"x-api-key": "k"}),
            http.get("/v1/no-such-path", headers={"x-api-key": "k"}),
            http.post("/v1/messages", content=b"{not json", headers={"x-api-key": "k"}),
            http.get("/_emulator/stats"),
        ):
            assert response.headers["request-id"].startswith("req_"), response.text
    assert response.status_code == 200


def test_models_list_the_configured_models(client: anthropic.Anthropic) -> None:
    config = load_config()
    listed = list(client.models.list(limit=3))
    assert [model.id for model in listed] == list(config.models)
    opus = client.models.retrieve(OPUS)
    assert opus.max_tokens == config.models[OPUS].max_output_tokens
    assert opus.max_input_tokens == config.models[OPUS].context_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-unknown")


# --- thinking by default, off values, context window, tokenizer families, forced tool_choice (catalog.py) -----


def test_5x_models_think_when_thinking_is_omitted_and_may_spend_all_of_max_tokens(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(model=HAIKU, max_tokens=64, messages=_user("classify: my card was charged twice"))
    assert reply.content[0].type == "thinking"
    assert reply.usage.output_tokens_details is not None and reply.usage.output_tokens_details.thinking_tokens == 64
    assert reply.stop_reason == "max_tokens" and _text(reply) == ""
    roomy = client.messages.create(model=HAIKU, max_tokens=2000, messages=_user("classify: my card"))
    assert roomy.stop_reason == "end_turn" and _text(roomy).startswith("echo:")
    legacy = client.messages.create(model=LEGACY, max_tokens=64, messages=_user("classify: my card"))
    assert [block.type for block in legacy.content] == ["text"]


@pytest.mark.parametrize(
    ("model", "off", "accepted"),
    [
        (HAIKU, "disabled", True),
        (HAIKU, "between_tools", False),
        ("claude-sonnet-5-5", "between_tools", True),
        ("claude-sonnet-5-5", "disabled", False),
        (OPUS, "disabled", False),
        ("claude-fable-5-1", "disabled", False),
        ("claude-opus-5", "disabled", True),
    ],
)
def test_each_model_takes_only_its_own_off_value(
    client: anthropic.Anthropic, model: str, off: str, accepted: bool
) -> None:
    thinking: Any = {"type": off}
    if not accepted:
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model=model, max_tokens=64, messages=_user("hi"), thinking=thinking)
        assert f"thinking.type.{off} is not supported for this model" in str(caught.value.api_message)
        return
    reply = client.messages.create(model=model, max_tokens=64, messages=_user("hi"), thinking=thinking)
    assert [block.type for block in reply.content] == ["text"] and reply.usage.output_tokens_details is not None
    assert reply.usage.output_tokens_details.thinking_tokens == 0
    with pytest.raises(anthropic.BadRequestError):  # only at effort high or lower
        client.messages.create(
            model=model, max_tokens=64, messages=_user("hi"), thinking=thinking, output_config={"effort": "max"}
        )


def test_forced_tool_choice_is_400_on_opus_5_5_sonnet_5_5_and_fable(client: anthropic.Anthropic) -> None:
    tool: Any = {"name": "label", "input_schema": {"type": "object", "properties": {}}}
    for model in (OPUS, "claude-sonnet-5-5", "claude-fable-5-1"):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(
                model=model, max_tokens=64, messages=_user("hi"), tools=[tool], tool_choice={"type": "any"}
            )
        assert "forcing tool use is not supported" in str(caught.value.api_message)
    reply = client.messages.create(
        model=HAIKU, max_tokens=64, messages=_user("hi"), tools=[tool], tool_choice={"type": "any"}, thinking=OFF
    )
    assert reply.stop_reason == "tool_use"


def test_a_prompt_over_the_context_window_is_400_prompt_is_too_long(client: anthropic.Anthropic) -> None:
    huge = "incident log line " * 40_000
    counted = client.messages.count_tokens(model=LEGACY, messages=_user(huge)).input_tokens
    assert 150_000 <= counted <= 200_000  # Haiku 4.5's context window is 200K
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=LEGACY, max_tokens=10, messages=_user(huge + huge))
    assert str(caught.value.api_message).startswith("prompt is too long:")


def test_the_5x_tokenizer_counts_about_30_percent_more_than_haiku_4_5(client: anthropic.Anthropic) -> None:
    text = "The nightly export failed twice on the orders table after the schema migration added two columns. " * 20
    new = client.messages.count_tokens(model=HAIKU, messages=_user(text)).input_tokens
    old = client.messages.count_tokens(model=LEGACY, messages=_user(text)).input_tokens
    assert 1.25 <= new / old <= 1.35
    # Not the engine's offline rule (ceil(bytes / 4)): estimates must be measurably off, as against the real API.
    assert old != (len(text.encode()) + 3) // 4


def test_refusal_rate_answers_messages_and_batch_rows_with_a_billed_refusal(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.configure(refusal_rate=1.0)
    reply = client.messages.create(model=HAIKU, max_tokens=100, messages=_user("hi"), thinking=OFF)
    assert reply.stop_reason == "refusal" and reply.content == []
    assert reply.stop_details is not None and reply.stop_details.type == "refusal"
    assert reply.stop_details.category == "cyber" and reply.usage.input_tokens > 0
    with client.messages.stream(model=HAIKU, max_tokens=100, messages=_user("hi")) as stream:
        assert stream.get_final_message().stop_reason == "refusal"
    params: Any = {"model": HAIKU, "max_tokens": 100, "messages": _user("hi")}
    batch = client.messages.batches.create(requests=[{"custom_id": "r", "params": params}])
    while batch.processing_status != "ended":
        batch = client.messages.batches.retrieve(batch.id)
    assert batch.request_counts.succeeded == 1  # a refusal is a succeeded row: the request was answered
    (row,) = list(client.messages.batches.results(batch.id))
    assert row.result.type == "succeeded" and row.result.message.stop_reason == "refusal"
    emulator.configure(refusal_rate=0.25)
    answers = [
        client.messages.create(model=HAIKU, max_tokens=100, messages=_user(f"q{i}"), thinking=OFF).stop_reason
        for i in range(80)
    ]
    assert 10 <= answers.count("refusal") <= 30


def test_pause_turn_rate_pauses_only_requests_with_a_server_tool(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    # pause_turn: the server tool loop reached its iteration limit (docs: /api/handling-stop-reasons).
    emulator.configure(pause_turn_rate=1.0)
    search: Any = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    paused = client.messages.create(model=HAIKU, max_tokens=100, messages=_user("find it"), tools=[search])
    assert paused.stop_reason == "pause_turn" and paused.usage.output_tokens > 0
    assert [block.type for block in paused.content] == ["server_tool_use"]
    plain = client.messages.create(model=HAIKU, max_tokens=100, messages=_user("find it"), thinking=OFF)
    assert plain.stop_reason == "end_turn"
    params: Any = {"model": HAIKU, "max_tokens": 100, "messages": _user("find it"), "tools": [search]}
    batch = client.messages.batches.create(requests=[{"custom_id": "p", "params": params}])
    while batch.processing_status != "ended":
        batch = client.messages.batches.retrieve(batch.id)
    (row,) = list(client.messages.batches.results(batch.id))
    assert row.result.type == "succeeded" and row.result.message.stop_reason == "pause_turn"


def test_output_that_reaches_the_context_window_stops_model_context_window_exceeded(
    emulator: RunningEmulator, client: anthropic.Anthropic
) -> None:
    emulator.configure(reply_tokens=500)
    huge = "incident log line " * 49_990  # a few tokens short of Haiku 4.5's 200K window
    reply = client.messages.create(model=LEGACY, max_tokens=1000, messages=_user(huge))
    assert reply.stop_reason == "model_context_window_exceeded"
    assert reply.usage.input_tokens + reply.usage.output_tokens == 200_000
