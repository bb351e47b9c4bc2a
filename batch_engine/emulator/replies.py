"""Deterministic replies: the text proves which request it answers, output respects max_tokens.

Every text reply starts with `echo:<reply_digest(last user message text)>`, followed by
` custom_id:<id>` for a batch row, then filler words up to the reply length. The last user message text
is its string content, or its text blocks (and string tool results) joined with newlines.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any, Final

import orjson

from batch_engine.emulator.params import MessageRequest
from batch_engine.emulator.structured import Generator
from batch_engine.emulator.tokenizer import json_tokens, prefix_keeping_head, prefix_within, text_tokens
from batch_engine.emulator.wire import new_id

_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
    "commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur "
)
_FILLER = _WORDS * 64
_WORD_STARTS = [0, *(index + 1 for index, char in enumerate(_WORDS[:-1]) if char == " ")]
THINKING_BY_EFFORT = {"low": 64, "medium": 192, "high": 512, "xhigh": 1024, "max": 2048}
_STREAM_CHUNK_CHARS = 48


def reply_digest(text: str) -> str:
    """The digest every reply carries: the first 12 hex digits of SHA-256 of the last user message text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# Built per request: read-only by `Final` fields, not `frozen=True` (see `Segment` in params.py).
@dataclass(slots=True)
class GeneratedReply:
    content: Final[list[dict[str, Any]]]
    stop_reason: Final[str]
    stop_sequence: Final[str | None]
    output_tokens: Final[int]
    thinking_tokens: Final[int]
    stop_details: Final[dict[str, Any] | None] = None


# A refusal: `stop_reason: "refusal"` with `stop_details` {type, category, explanation} (SDK 2.x
# types/refusal_stop_details.py); the 5.5 models' safety classifiers can decline a request (docs: Haiku 5.5 and
# Sonnet 5.5 what's new, "refusals and fallbacks"). Billed for the input and whatever output came before it.
REFUSAL_DETAILS = {
    "type": "refusal",
    "category": "cyber",
    "explanation": "Declined by the emulator's --refusal-rate (a stand-in for the API's safety classifiers).",
}


def _filler(chars: int, offset: int) -> str:
    if chars <= 0:
        return ""
    start = _WORD_STARTS[offset % len(_WORD_STARTS)]
    text = _FILLER[start : start + chars]
    while len(text) < chars:
        text += _FILLER[: chars - len(text)]
    return text


def _thinking_tokens(request: MessageRequest, seed: int) -> int:
    thinking = request.thinking
    if thinking is None:
        return 0
    base = THINKING_BY_EFFORT[thinking.effort] + seed % 32
    if thinking.budget_tokens is not None:
        return min(thinking.budget_tokens, base)
    # Thinking tokens count toward max_tokens and adaptive thinking does not save room for the answer: a small
    # max_tokens can be spent on thinking alone, ending `max_tokens` with no text (docs: Haiku 5.5 what's new).
    return min(base, request.max_tokens)


def build_reply(
    request: MessageRequest,
    *,
    custom_id: str | None,
    reply_tokens: int | None,
    invalid_output: bool = False,
    refuse: bool = False,
    pause: bool = False,
) -> GeneratedReply:
    """The content, stop reason and output tokens for a validated request.

    A JSON answer (output_config.format, or a forced tool's input) is generated from the schema and validates
    against it; with `invalid_output` (the emulator's injected fault) it does not.
    """
    digest = reply_digest(request.last_user_text)
    if refuse:
        return GeneratedReply([], "refusal", None, 1, 0, REFUSAL_DETAILS)
    seed = int(digest[:8], 16)
    if pause and request.server_tool is not None:
        # The server-side tool loop ran out of iterations mid-turn (docs: /api/handling-stop-reasons): the answer
        # so far is a server tool call, and the client sends the content back to let the turn go on.
        call = {"type": "server_tool_use", "id": new_id("srvtoolu_"), "name": request.server_tool, "input": {}}
        return GeneratedReply([call], "pause_turn", None, min(request.max_tokens, 24), 0)
    echo = f"echo:{digest}" + (f" custom_id:{custom_id}" if custom_id else "")
    thinking_tokens = _thinking_tokens(request, seed)
    content: list[dict[str, Any]] = []
    if request.thinking is not None:
        summary = "" if request.thinking.display == "omitted" else f"Considering the request ({echo})."
        signature = base64.b64encode(hashlib.sha256(f"{request.model}|{echo}".encode()).digest()).decode()
        content.append({"type": "thinking", "thinking": summary, "signature": signature})
    # Output also stops where the context window does: the newer models then say so with their own stop reason
    # (docs: /build-with-claude/handling-stop-reasons, `model_context_window_exceeded`).
    room = request.spec.context_tokens - request.total_tokens
    limit, limit_reason = (
        (room, "model_context_window_exceeded")
        if room < request.max_tokens
        else (
            request.max_tokens,
            "max_tokens",
        )
    )
    thinking_tokens = min(thinking_tokens, limit)
    available = limit - thinking_tokens
    if available <= 0:
        return GeneratedReply(content, limit_reason, None, max(1, limit), thinking_tokens)

    if request.forced_tool is not None:
        schema = request.forced_tool.get("input_schema", {})
        generator = Generator(schema, echo, seed)
        tool_input = generator.broken(schema) if invalid_output else generator.value(schema)
        block = {
            "type": "tool_use",
            "id": new_id("toolu_"),
            "name": request.forced_tool["name"],
            "input": tool_input,
        }
        used = min(available, json_tokens(tool_input, request.spec.tokenizer) + 8)
        content.append(block)
        return GeneratedReply(content, "tool_use", None, thinking_tokens + used, thinking_tokens)

    if request.json_schema is not None:
        generator = Generator(request.json_schema, echo, seed)
        answer = generator.broken(request.json_schema) if invalid_output else generator.value(request.json_schema)
        text = answer if isinstance(answer, str) and invalid_output else orjson.dumps(answer).decode()
        text_count = text_tokens(text, request.spec.tokenizer)
    else:
        target = reply_tokens if reply_tokens is not None else 20 + seed % 41
        filler = " " + _filler(max(0, target * 8 - len(echo) - 1), seed)
        # The reply is `target` tokens long, but never shorter than its echo (the proof of what it answers).
        family = request.spec.tokenizer
        text, text_count = prefix_keeping_head(echo, filler, target, family)
    stop_reason, stop_sequence = "end_turn", None
    for sequence in request.stop_sequences:
        position = text.find(sequence)
        if position >= 0 and (stop_sequence is None or position < text.find(stop_sequence)):
            stop_sequence = sequence
    family = request.spec.tokenizer
    if stop_sequence is not None:
        text = text[: text.find(stop_sequence)]
        stop_reason = "stop_sequence"
        text_count = text_tokens(text, family)
    if text_count > available:
        text = prefix_within(text, available, family)
        text_count = text_tokens(text, family)
        stop_reason, stop_sequence = limit_reason, None
    if text:
        content.append({"type": "text", "text": text})
    output_tokens = max(1, thinking_tokens + text_count)
    return GeneratedReply(content, stop_reason, stop_sequence, output_tokens, thinking_tokens)


def message_json(
    request: MessageRequest, reply: GeneratedReply, usage: dict[str, Any], message_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": message_id or new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": reply.content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "stop_details": reply.stop_details,
        "usage": usage,
    }


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _chunks(text: str) -> list[str]:
    return [text[start : start + _STREAM_CHUNK_CHARS] for start in range(0, len(text), _STREAM_CHUNK_CHARS)]


def sse_events(message: dict[str, Any]) -> list[bytes]:
    """The server-sent events that stream `message`, in the API's order."""
    usage = message["usage"]
    start_usage = {**usage, "output_tokens": 1}
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "stop_details": None,
        "usage": start_usage,
    }
    events = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "thinking":
            empty: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": piece} for piece in _chunks(block["thinking"])]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind == "tool_use":
            empty = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()}]
        else:
            empty = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in _chunks(block["text"])]
        events.append(
            _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": empty})
        )
        for delta in deltas:
            events.append(
                _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    delta_usage = {key: value for key, value in usage.items() if key != "service_tier"}
    events.append(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": message["stop_reason"],
                    "stop_sequence": message["stop_sequence"],
                    "stop_details": message["stop_details"],
                },
                "usage": delta_usage,
            },
        )
    )
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


def error_event(error_type: str, message: str) -> bytes:
    return _event("error", {"type": "error", "error": {"type": error_type, "message": message}})
