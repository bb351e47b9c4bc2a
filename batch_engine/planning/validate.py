"""Turn a parsed record into a TaskRequest, or a Rejection naming the field and the reason."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from batch_engine.config import Config
from batch_engine.models import Rejection, TaskRequest
from batch_engine.planning.params import MAX_BREAKPOINTS, count_breakpoints
from batch_engine.structured_output import SchemaError, check_schema


def _task_id_of(value: Any) -> str | None:
    if isinstance(value, dict):
        task_id = value.get("task_id")
        if isinstance(task_id, str) and 0 < len(task_id) <= 64 and task_id.isprintable():
            return task_id
    return None


def validate_record(value: Any, index: int, line: int | None, config: Config) -> TaskRequest | Rejection:
    """A TaskRequest, or a Rejection for the first problem found."""

    def reject(field: str, reason: str) -> Rejection:
        return Rejection(index=index, line=line, task_id=_task_id_of(value), field=field, reason=reason)

    if not isinstance(value, dict):
        return reject("<record>", f"expected a JSON object, got {type(value).__name__}")
    try:
        task = TaskRequest.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "<record>"
        return reject(field, first["msg"])
    if task.task_type not in config.task_types:
        return reject("task_type", f"unknown task type {task.task_type!r}")
    if task.model is not None and task.model not in config.models:
        return reject("model", f"unknown model {task.model!r} (not in the config's [models])")
    if task.params is not None:
        if not isinstance(task.params.get("messages"), list):
            return reject("params.messages", "raw params need a list of messages")
        problem = _raw_params_problem(task, config)
        if problem is not None:
            return reject(*problem)
        if count_breakpoints(task.params) > MAX_BREAKPOINTS:
            return reject("params", f"more than {MAX_BREAKPOINTS} cache_control breakpoints (the API rejects it)")
        problem = _output_format_problem(task, config)
        if problem is not None:
            return reject(*problem)
        refused = api_version_rejection(task.params)
        if refused is not None:
            return reject(*refused)
    return task


def _output_format_problem(task: TaskRequest, config: Config) -> tuple[str, str] | None:
    """(field, reason) when raw params carry an output_config.format the API would refuse."""
    assert task.params is not None
    output_config = task.params.get("output_config")
    if output_config is None:
        return None
    if not isinstance(output_config, dict):
        return "params.output_config", "expected an object (the API rejects anything else)"
    if output_config.get("format") is None:
        return None
    fmt = output_config["format"]
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        return "params.output_config.format", 'expected {"type": "json_schema", "schema": {...}}'
    explicit = task.model or task.params.get("model")  # params.model is checked before this
    model = explicit or config.model_for_tier(task.model_tier or config.task_types[task.task_type].tier)
    if not config.models[model].structured_outputs:
        return "params.output_config.format", f"{model} does not support structured outputs (see [models.{model}])"
    try:
        check_schema(fmt["schema"])
    except SchemaError as exc:
        return (
            f"params.output_config.format.schema{exc.path.replace('/', '.')}",
            f"the API would refuse it: {exc.reason}",
        )
    return None


def _raw_params_problem(task: TaskRequest, config: Config) -> tuple[str, str] | None:
    """(field, reason) for raw params the engine could not plan or the API would refuse; None when they are fine.

    Shapes only: the engine reads these fields (to price, count, chunk and route), so a wrong type must be a
    rejection here, not a crash later.
    """
    params = task.params
    assert params is not None
    for position, message in enumerate(params["messages"]):
        if not isinstance(message, dict):
            return f"params.messages.{position}", "each message must be an object with a role and content"
    model = params.get("model")
    if model is not None:
        if not isinstance(model, str) or model not in config.models:
            return "params.model", f"unknown model {model!r} (not in the config's [models])"
        if task.model is not None and task.model != model:
            return "params.model", f"{model!r} contradicts the record's model {task.model!r}; give one of them"
    model = task.model or model or config.model_for_tier(task.model_tier or config.task_types[task.task_type].tier)
    if "max_tokens" in params:
        max_tokens = params["max_tokens"]
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return "params.max_tokens", f"must be a whole number of at least 1, got {max_tokens!r}"
        limit = config.models[model].max_output_tokens
        if max_tokens > limit:
            return "params.max_tokens", f"{max_tokens} is above {model}'s output limit of {limit} (the API rejects it)"
    system = params.get("system")
    if system is not None and not isinstance(system, str) and not _list_of_objects(system):
        return "params.system", "must be a string or a list of content blocks (objects)"
    for name in ("tools", "stop_sequences"):
        value = params.get(name)
        if value is not None and not isinstance(value, list):
            return f"params.{name}", f"must be a list, got {type(value).__name__}"
    if params.get("tools") is not None and not _list_of_objects(params["tools"]):
        return "params.tools", "must be a list of tool definitions (objects)"
    return _forced_tool_problem(params, model, config)


def _forced_tool_problem(params: dict[str, Any], model: str, config: Config) -> tuple[str, str] | None:
    """(field, reason) for a `tool_choice` that forces tool use where the API refuses it (400), else None."""
    choice = params.get("tool_choice")
    if not isinstance(choice, dict) or choice.get("type") not in ("any", "tool"):
        return None
    forced = f"tool_choice {choice['type']!r} forces tool use"
    spec = config.models[model]
    if not spec.forced_tool_choice:
        # Opus 5.5, Sonnet 5.5 and Fable 5.1 answer 400 to forced tool use (docs /models/sonnet-5-5/
        # whats-new-sonnet-5-5 "Forced tool use returns an error", /models/opus-5-5/whats-new-opus-5-5; §0.4).
        return "params.tool_choice", f"{forced}, which {model} refuses (the API answers 400); use 'auto'"
    thinking = params.get("thinking")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind in ("adaptive", "enabled") or (thinking is None and spec.thinks_by_default):
        # Thinking cannot be combined with forced tool use: only `auto` or `none` (docs /build-with-claude/
        # extended-thinking; reference §6). The 5.x models think when `thinking` is omitted.
        return (
            "params.tool_choice",
            f"{forced}, which the API refuses while {model} thinks; send thinking "
            f'{{"type": "{spec.thinking_off}"}} or use \'auto\'',
        )
    return None


def _list_of_objects(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


# The SDK (anthropic 2.x) sends `anthropic-version: 2026-10-21`. Under that version the API answers 400 on every
# model for these, even at default values; in a batch only after the whole batch ends, as `errored` rows.
# Source: docs /api/migration-2026-10-21 (reference anthropic-api.md §0.1).
_SAMPLING_PARAMS = ("temperature", "top_p", "top_k")


def api_version_rejection(params: dict[str, Any]) -> tuple[str, str] | None:
    """(field, reason) for raw params that API version 2026-10-21 refuses, or None."""
    for name in _SAMPLING_PARAMS:
        if name in params:
            return f"params.{name}", "not accepted by API version 2026-10-21 on any model (remove it)"
    messages = params.get("messages")
    for position, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for index, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, dict):
                continue
            where = f"params.messages.{position}.content.{index}"
            role = message.get("role")
            if role == "assistant" and block.get("type") == "document":
                return where, "document blocks in assistant messages are refused by API version 2026-10-21"
            if role == "user" and block.get("type") == "text" and block.get("citations"):
                return f"{where}.citations", "citations on user text blocks are refused by API version 2026-10-21"
    return None
