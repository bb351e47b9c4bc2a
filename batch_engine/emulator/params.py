"""Messages request validation, as the real API answers it, and the flattened prompt the emulator bills.

One parse serves `POST /v1/messages`, `count_tokens` and every batch row (rows are checked when processed,
so a bad row becomes an `errored` result instead of a rejected batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from batch_engine.emulator.catalog import VERSION_2026_10_21, ModelRules
from batch_engine.emulator.structured import check_compatible, schema_of
from batch_engine.emulator.tokenizer import block_tokens, json_tokens, without_cache_control
from batch_engine.emulator.wire import ApiFailure, invalid

MESSAGE_PARAMS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "tools", "tool_choice", "thinking", "output_config",
        "cache_control", "metadata", "service_tier", "speed", "stop_sequences", "stream", "temperature",
        "top_p", "top_k", "inference_geo", "container", "diagnostics", "mcp_servers", "context_management",
    }
)  # fmt: skip
COUNT_PARAMS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "cache_control",
        "speed",
    }
)
SAMPLING_PARAMS = frozenset({"temperature", "top_p", "top_k"})
_CURRENT_MESSAGE_PARAMS = MESSAGE_PARAMS - SAMPLING_PARAMS  # COUNT_PARAMS has none of them
MAX_BREAKPOINTS = 4
EFFORTS = ("low", "medium", "high", "xhigh", "max")
CACHE_TTLS = ("5m", "1h")


# Built per request: read-only by its `Final` fields (mypy refuses an assignment), not by `frozen=True`, which sets
# each field through `object.__setattr__` (~0.3 µs a field, on every batch row and Messages call).
@dataclass(slots=True)
class Segment:
    """One prompt block in cache order (tools → system → messages), with its tokens and breakpoint TTL."""

    tag: Final[bytes]  # where the block sits; part of the cache key so a system text never matches a user text
    block: Final[Any]
    tokens: Final[int]
    ttl: Final[str | None]


# Built per request: read-only by `Final` fields, not `frozen=True` (see `Segment`).
@dataclass(slots=True)
class ThinkingRequest:
    mode: Final[str]  # "enabled" or "adaptive"
    budget_tokens: Final[int | None]
    effort: Final[str]
    display: Final[str]  # "summarized" or "omitted"


# Built per request: read-only by `Final` fields, not `frozen=True` (see `Segment`).
@dataclass(slots=True)
class MessageRequest:
    model: Final[str]
    spec: Final[ModelRules]
    max_tokens: Final[int]  # 0 for count_tokens
    segments: Final[tuple[Segment, ...]]
    last_user_text: Final[str]
    thinking: Final[ThinkingRequest | None]
    stream: Final[bool]
    stop_sequences: Final[tuple[str, ...]]
    forced_tool: Final[dict[str, Any] | None]
    json_schema: Final[dict[str, Any] | None]
    total_tokens: Final[int]  # of all segments
    server_tool: Final[str | None] = None  # the name of the first server tool in `tools`, if any


def parse_request(
    params: Any, models: Mapping[str, ModelRules], *, counting: bool = False, api_version: str = VERSION_2026_10_21
) -> MessageRequest:
    """Validate Messages params under an API version; raise ApiFailure (400 / 404) with the API's kind of message."""
    if not isinstance(params, dict):
        raise invalid("Request body must be a JSON object.")
    current = api_version >= VERSION_2026_10_21
    allowed = COUNT_PARAMS if counting else MESSAGE_PARAMS
    if not params.keys() <= (_CURRENT_MESSAGE_PARAMS if current and not counting else allowed):
        for key in params:
            # 2026-10-21 dropped the sampling params from the schema on every model, even at their default values
            # (docs: /api/migration-2026-10-21; reference §0.1). 2023-06-01 keeps the per-model rules of `_sampling`.
            if key not in allowed or (current and key in SAMPLING_PARAMS):
                raise invalid(f"{key}: Extra inputs are not permitted")
    model, spec = _model(params, models)
    max_tokens = 0 if counting else _max_tokens(params, model, spec)
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: at least one message is required")
    segments: list[Segment] = []
    tools = _tools(params.get("tools"), segments, spec.tokenizer)
    _system(params.get("system"), segments, spec.tokenizer)
    last_user_text = _messages(messages, segments, spec.tokenizer, current)
    hidden_slots = _automatic_cache_control(params.get("cache_control"), segments)
    _check_breakpoints(segments, hidden_slots)
    thinking = _thinking(params, spec, max_tokens, counting)
    forced_tool = _tool_choice(params.get("tool_choice"), tools, thinking, spec, model)
    _sampling(params, spec, thinking)
    json_schema = schema_of(params.get("output_config"), model, spec.structured_outputs)
    check_compatible(json_schema is not None, messages[-1].get("role") == "assistant")
    total = sum(segment.tokens for segment in segments)
    if not counting and total > spec.context_tokens:
        # The API's wording for a prompt over the model's context window.
        raise invalid(f"prompt is too long: {total} tokens > {spec.context_tokens} maximum")
    if messages[-1].get("role") == "assistant" and (not spec.sampling_params or thinking is not None):
        raise invalid(
            "This model does not support assistant message prefill. The conversation must end with a user message."
        )
    stream = params.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream: Input should be a valid boolean")
    return MessageRequest(
        model=model,
        spec=spec,
        max_tokens=max_tokens,
        segments=tuple(segments),
        last_user_text=last_user_text,
        thinking=thinking,
        stream=stream,
        stop_sequences=_stop_sequences(params.get("stop_sequences")),
        forced_tool=forced_tool,
        json_schema=json_schema,
        total_tokens=total,
        server_tool=next((name for name, tool in tools.items() if _is_server_tool(tool)), None),
    )


# Server tools run on Anthropic's side inside one Messages call: web search, web fetch, code execution (docs:
# /agents-and-tools/tool-use/overview, "server tools"). Their `type` is versioned, e.g. "web_search_20250305".
SERVER_TOOL_PREFIXES = ("web_search_", "web_fetch_", "code_execution_")


def _is_server_tool(tool: dict[str, Any]) -> bool:
    kind = tool.get("type")
    return isinstance(kind, str) and kind.startswith(SERVER_TOOL_PREFIXES)


def _model(params: dict[str, Any], models: Mapping[str, ModelRules]) -> tuple[str, ModelRules]:
    model = params.get("model")
    if model is None:
        raise invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise invalid("model: Input should be a valid string")
    spec = models.get(model)
    if spec is None:
        raise ApiFailure("not_found_error", f"model: {model}")
    return model, spec


def _max_tokens(params: dict[str, Any], model: str, spec: ModelRules) -> int:
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        raise invalid("max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise invalid("max_tokens: Input should be greater than or equal to 1")
    if max_tokens > spec.max_output_tokens:
        raise invalid(
            f"max_tokens: {max_tokens} > {spec.max_output_tokens}, which is the maximum allowed number of "
            f"output tokens for {model}"
        )
    return max_tokens


def _ttl(block: dict[str, Any], where: str) -> str | None:
    control = block.get("cache_control")
    if control is None:
        return None
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        raise invalid(f"{where}.cache_control: Input should be an object with type 'ephemeral'")
    ttl = control.get("ttl", "5m")
    if ttl not in CACHE_TTLS:
        raise invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    return str(ttl)


def _tools(tools: Any, segments: list[Segment], family: str) -> dict[str, dict[str, Any]]:
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise invalid("tools: Input should be a valid list")
    by_name: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(tools):
        where = f"tools.{index}"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise invalid(f"{where}.name: Field required")
        if "type" not in tool:
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise invalid(f"{where}.input_schema: Field required")
            if schema.get("type") != "object":
                raise invalid(f"{where}.input_schema.type: Input should be 'object'")
        if tool["name"] in by_name:
            raise invalid(f"tools: Tool names must be unique ({tool['name']!r} appears twice)")
        by_name[tool["name"]] = tool
        segments.append(Segment(b"tool", tool, json_tokens(without_cache_control(tool), family), _ttl(tool, where)))
    return by_name


def _system(system: Any, segments: list[Segment], family: str) -> None:
    if system is None:
        return
    if isinstance(system, str):
        if system:
            segments.append(Segment(b"system", {"type": "text", "text": system}, block_tokens(system, family), None))
        return
    if not isinstance(system, list):
        raise invalid("system: Input should be a valid string or a list of text blocks")
    for index, block in enumerate(system):
        where = f"system.{index}"
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise invalid(f"{where}: Input should be a text block")
        if not block["text"].strip():
            raise invalid(f"{where}.text: text content blocks must contain non-whitespace text")
        segments.append(Segment(b"system", block, block_tokens(block, family), _ttl(block, where)))


def _messages(messages: list[Any], segments: list[Segment], family: str, current: bool) -> str:
    last_user_text = ""
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise invalid(f"{where}: Input should be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        if index == 0 and role != "user":
            raise invalid('messages: first message must use the "user" role')
        tag = b"user" if role == "user" else b"assistant"
        content = message.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            if not content.strip() and not (role == "assistant" and index == len(messages) - 1):
                raise invalid(f"{where}.content: text content blocks must contain non-whitespace text")
            segments.append(Segment(tag, {"type": "text", "text": content}, block_tokens(content, family), None))
            texts.append(content)
        elif isinstance(content, list) and content:
            for position, block in enumerate(content):
                block_where = f"{where}.content.{position}"
                _check_block(block, block_where)
                if current:
                    _check_version_2026_10_21(block, block_where, role)
                segments.append(Segment(tag, block, block_tokens(block, family), _ttl(block, block_where)))
                if block["type"] == "text":
                    texts.append(block["text"])
                elif block["type"] == "tool_result" and isinstance(block.get("content"), str):
                    texts.append(block["content"])
        else:
            raise invalid(f"{where}.content: Input should be a non-empty string or list of content blocks")
        if role == "user":
            last_user_text = "\n".join(texts)
    return last_user_text


def _check_block(block: Any, where: str) -> None:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise invalid(f"{where}: Input should be a content block object with a type")
    kind = block["type"]
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise invalid(f"{where}.text: Field required")
        if not block["text"].strip():
            raise invalid(f"{where}.text: text content blocks must contain non-whitespace text")
    elif kind == "tool_use":
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise invalid(f"{where}: tool_use blocks need an id and a name")
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            raise invalid(f"{where}.tool_use_id: Field required")
    elif kind not in ("image", "document", "thinking", "redacted_thinking", "search_result"):
        raise invalid(f"{where}.type: Input tag '{kind}' found using 'type' does not match any of the expected tags")


def _check_version_2026_10_21(block: dict[str, Any], where: str, role: str) -> None:
    # Under 2026-10-21 a document block may only come from the user, and a user's text block may not carry
    # citations (docs: /api/migration-2026-10-21; reference §0.1).
    if role == "assistant" and block["type"] == "document":
        raise invalid(f"{where}: document blocks are not permitted in assistant messages")
    if role == "user" and block["type"] == "text" and block.get("citations"):
        raise invalid(f"{where}.citations: citations are not permitted on text blocks in user messages")


def _automatic_cache_control(control: Any, segments: list[Segment]) -> int:
    """Put the top-level breakpoint on the last block; return the slots it takes that no segment shows."""
    # Automatic caching always takes one of the four slots, even on a block that already has a breakpoint.
    if control is None:
        return 0
    ttl = _ttl({"cache_control": control}, "")
    last = segments[-1]
    if last.ttl is not None:
        return 1
    segments[-1] = Segment(last.tag, last.block, last.tokens, ttl)
    return 0


def _check_breakpoints(segments: list[Segment], hidden_slots: int) -> None:
    ttls = [segment.ttl for segment in segments if segment.ttl is not None]
    used = len(ttls) + hidden_slots
    if used > MAX_BREAKPOINTS:
        raise invalid(f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {used}.")
    if "5m" in ttls and "1h" in ttls[ttls.index("5m") :]:
        raise invalid("cache_control: a ttl='1h' cache entry must come before any ttl='5m' entry.")


def _thinking(params: dict[str, Any], spec: ModelRules, max_tokens: int, counting: bool) -> ThinkingRequest | None:
    config = params.get("thinking")
    effort = _effort(params.get("output_config"))
    if config is None:
        # The 5.x models think when `thinking` is omitted (D-HK, D-SN, D-TT in catalog.py).
        if spec.thinks_by_default:
            return ThinkingRequest("adaptive", None, effort or spec.default_effort, spec.default_display)
        return None
    if not isinstance(config, dict) or config.get("type") not in (
        "enabled",
        "adaptive",
        "disabled",
        "between_tools",
    ):
        raise invalid("thinking.type: Input should be 'enabled', 'adaptive', 'disabled' or 'between_tools'")
    kind = config["type"]
    display = config.get("display") or spec.default_display
    if display not in ("summarized", "omitted"):
        raise invalid("thinking.display: Input should be 'summarized' or 'omitted'")
    if kind in ("disabled", "between_tools"):
        if kind not in spec.off_values:
            hint = f"; use {{'type': '{next(iter(spec.off_values))}'}}" if spec.off_values else ""
            raise invalid(f"thinking.type.{kind} is not supported for this model{hint}")
        if spec.thinks_by_default and effort in ("xhigh", "max"):
            # Haiku 5.5 / Opus 5 take `disabled`, Sonnet 5.5 `between_tools`, only at effort high or lower.
            raise invalid(f"thinking.type.{kind} is not supported with output_config.effort {effort!r}")
        # `between_tools` keeps only the short notes between tool calls: a request without tools thinks not at all.
        return None
    if kind == "adaptive":
        return ThinkingRequest("adaptive", None, effort or spec.default_effort, display)
    if not spec.manual_thinking:
        raise invalid(
            '"thinking.type.enabled" is not supported for this model. Use "thinking.type.adaptive" and '
            '"output_config.effort" to control thinking behavior.'
        )
    budget = config.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise invalid("thinking.enabled.budget_tokens: Field required")
    if budget < 1024:
        raise invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
    if not counting and budget >= max_tokens:
        raise invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
    return ThinkingRequest("enabled", budget, effort or "high", display)


def _effort(output_config: Any) -> str | None:
    if output_config is None:
        return None
    if not isinstance(output_config, dict):
        raise invalid("output_config: Input should be an object")
    effort = output_config.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise invalid(f"output_config.effort: Input should be one of {', '.join(EFFORTS)}")
    return effort if isinstance(effort, str) else None


def _tool_choice(
    choice: Any, tools: dict[str, dict[str, Any]], thinking: ThinkingRequest | None, spec: ModelRules, model: str
) -> dict[str, Any] | None:
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    kind = choice["type"]
    if kind in ("auto", "none"):
        return None
    if not tools:
        raise invalid("tool_choice: a tool_choice that forces tool use needs tools")
    if not spec.forced_tool_choice:
        # Opus 5.5, Sonnet 5.5 and Fable 5.1 return an error for forced tool use (D-SN; reference §0.4).
        raise invalid(f"tool_choice: forcing tool use is not supported on the model {model}; use 'auto'.")
    if thinking is not None:
        raise invalid("Thinking may not be enabled when tool_choice forces tool use.")
    if kind == "any":
        return next(iter(tools.values()))
    name = choice.get("name")
    if not isinstance(name, str) or name not in tools:
        raise invalid(f"tool_choice.name: no tool named {name!r} in tools")
    return tools[name]


def _sampling(params: dict[str, Any], spec: ModelRules, thinking: ThinkingRequest | None) -> None:
    # Reached with sampling params only under API version 2023-06-01 (2026-10-21 rejects them up front).
    if params.keys().isdisjoint(SAMPLING_PARAMS):
        return  # every rule below is about a sampling param that was sent
    temperature = params.get("temperature")
    for name in ("temperature", "top_p", "top_k"):
        value = params.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise invalid(f"{name}: Input should be a valid number")
    if not spec.sampling_params:
        if temperature is not None and temperature != 1:
            raise invalid("temperature: is not supported for this model; remove it")
        for name in ("top_p", "top_k"):
            if params.get(name) is not None:
                raise invalid(f"{name}: is not supported for this model; remove it")
        return
    if temperature is not None and not 0 <= temperature <= 1:
        raise invalid("temperature: Input should be between 0 and 1")
    if thinking is not None:
        if temperature is not None and temperature != 1:
            raise invalid("`temperature` may only be set to 1 when thinking is enabled.")
        if params.get("top_k") is not None:
            raise invalid("`top_k` is not compatible with thinking.")


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise invalid("stop_sequences: Input should be a list of non-empty strings")
    return tuple(value)
