"""Render a task into Messages API params: template, model, thinking rules, prompt-cache breakpoints."""

from __future__ import annotations

import functools
import hashlib
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from batch_engine.config import Config, ModelSpec, Route, TaskType, Thinking
from batch_engine.models import TaskRequest
from batch_engine.planning.tokens import estimate_tokens
from batch_engine.structured_output import OutputForm, OutputSpec, prompt_instruction, request_part

MAX_BREAKPOINTS = 4  # the API rejects a request with more than four cache_control blocks
_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template placeholder cannot be filled from input_data."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


@functools.lru_cache(maxsize=256)
def _parsed(template: str) -> tuple[tuple[str, str | None, str | None, str | None], ...]:
    return tuple(_FORMATTER.parse(template))


def render(template: str, variables: dict[str, Any]) -> str:
    """Fill `{name}` placeholders; attribute access, indexing and format specs are refused.

    str.format would let `{x.__class__}` or `{x[key]}` walk objects, so only bare names are allowed. A template
    without placeholders renders to its one literal (`{{` and `}}` unescaped), the same string object for every
    task (the parse is cached): every task then shares it (and its cached hash), so a ~5 KB system prompt is
    neither copied nor hashed again per task.
    """
    parsed = _parsed(template)
    if len(parsed) == 1 and parsed[0][1] is None:
        return parsed[0][0]
    out: list[str] = []
    for literal, name, spec, conversion in parsed:
        out.append(literal)
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise TemplateError("template", f"placeholder {{{name}}} is not a plain name")
        if name not in variables:
            raise TemplateError(f"input_data.{name}", "missing template variable")
        value = variables[name]
        out.append(value if isinstance(value, str) else str(value))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ThinkingRules:
    """What a model does about thinking: manual budgets accepted, thinks by default, the value that turns it off."""

    manual_ok: bool
    thinks_by_default: bool
    off: str  # "disabled", "between_tools" or "none" (cannot be turned off)

    @classmethod
    def of(cls, spec: ModelSpec) -> ThinkingRules:
        return cls(spec.manual_thinking, spec.thinks_by_default, spec.thinking_off)


# The lowest effort: what a task type that wants thinking "off" gets on a model that cannot turn it off.
LOWEST_EFFORT = "low"
# The smallest thinking budget the API accepts (budget_tokens >= 1024, docs: /build-with-claude/extended-thinking).
# A model that thinks with less room than this in max_tokens can spend all of it thinking and return no text.
THINKING_ROOM_TOKENS = 1024


def _thinking(thinking: Thinking, rules: ThinkingRules, max_tokens: int) -> dict[str, Any]:
    if thinking.mode == "off":
        if not rules.thinks_by_default:
            return {}
        # The 5.x models think when `thinking` is omitted, and thinking tokens count toward max_tokens: "off" must
        # be said, in the value each model accepts (Haiku 5.5 / Opus 5: disabled; Sonnet 5.5: between_tools).
        if rules.off != "none":
            return {"thinking": {"type": rules.off}}
        # Opus 5.5 and Fable cannot turn it off ("disabled" is a 400): the least thinking is the lowest effort.
        return {"thinking": {"type": "adaptive"}, "output_config": {"effort": LOWEST_EFFORT}}
    if thinking.mode == "manual" and rules.manual_ok and thinking.budget_tokens is not None:
        if thinking.budget_tokens < max_tokens:
            return {"thinking": {"type": "enabled", "budget_tokens": thinking.budget_tokens}}
        return {}
    # Claude 5 models reject manual budget_tokens: adaptive thinking with an effort level instead.
    extra: dict[str, Any] = {"thinking": {"type": "adaptive"}}
    if thinking.effort is not None:
        extra["output_config"] = {"effort": thinking.effort}
    return extra


def output_form(spec: ModelSpec, thinking: Thinking) -> OutputForm:
    """How a schema reaches `spec`'s model: its structured outputs, else a forced tool where the model accepts one
    (never with thinking: the API refuses forced tool use with thinking on, so only where thinking "off" can really
    turn it off), else the prompt."""
    if spec.structured_outputs:
        return "output_config"
    if spec.forced_tool_choice and spec.thinking_off != "none" and thinking.mode == "off":
        return "tool"
    return "prompt"


def thinking_warning(task_type_name: str, task_type: TaskType, model: str, spec: ModelSpec) -> str | None:
    """Why a task type may come back without an answer on `model` because of thinking, or None."""
    thinks = task_type.thinking.mode != "off" or (spec.thinks_by_default and spec.thinking_off == "none")
    if task_type.thinking.mode == "off" and spec.thinks_by_default and spec.thinking_off == "none":
        cannot = f"{model} cannot turn thinking off; task type {task_type_name} is sent effort {LOWEST_EFFORT!r}"
        if task_type.max_tokens < THINKING_ROOM_TOKENS:
            return f"{cannot}, and its max_tokens {task_type.max_tokens} may all go to thinking (no text, billed)"
        return cannot
    if thinks and task_type.max_tokens < THINKING_ROOM_TOKENS:
        return (
            f"task type {task_type_name} thinks on {model} but max_tokens {task_type.max_tokens} leaves no room "
            f"for it (thinking counts toward max_tokens; under {THINKING_ROOM_TOKENS} it may end with no text)"
        )
    return None


@functools.lru_cache(maxsize=256)
def has_placeholders(template: str) -> bool:
    return any(name is not None for _, name, _, _ in _parsed(template))


def shared_frame_key(task: TaskRequest, task_type: TaskType, route: Route) -> tuple[Any, ...] | None:
    """What decides a task's frame when nothing of its own record goes into it (no raw params, no system prompt
    of its own, a system template without placeholders): tasks with the same key get the same frame from
    `build_request`. None when the record's data goes into the frame."""
    if task.params is not None or task.system is not None or has_placeholders(task_type.system):
        return None
    return task.task_type, task.model, task.model_tier, task.max_tokens, route


def build_request(
    task: TaskRequest, task_type: TaskType, config: Config, route: Route, output: OutputSpec | None = None
) -> tuple[str, dict[str, Any], str | None]:
    """(model, frame, user text) for one task; raises TemplateError when the template cannot be filled.

    The frame is the params around the user message (model, max_tokens, system, thinking), shared by every task
    that renders the same one: a plan of 1M tasks holds each task's user text, not a params tree per task. Raw
    `params` from the input are their own frame, with no user text. `with_user_text` puts the two together.
    """
    # An explicit model is the user's choice: the record's own, or the one in its raw params (validated).
    explicit = task.model or (task.params or {}).get("model")
    model = explicit or config.model_for_tier(task.model_tier or task_type.tier)
    spec = config.models[model]
    if task.params is not None:
        params = dict(task.params)
        params.pop("stream", None)
        params["model"] = model
        params.setdefault("max_tokens", min(task.max_tokens or task_type.max_tokens, spec.max_output_tokens))
        return model, params, None
    max_tokens = min(task.max_tokens or task_type.max_tokens, spec.max_output_tokens)
    system_text = task.system if task.system is not None else render(task_type.system, task.input_data)
    user_text = render(task_type.user, task.input_data)
    if output is not None and output.form == "prompt":
        system_text = (
            f"{system_text}\n\n{prompt_instruction(output.schema)}"
            if system_text
            else prompt_instruction(output.schema)
        )
    ttl = None
    if (
        system_text
        and task_type.cache_system
        and _text_tokens(system_text, spec.tokenizer_factor) >= spec.min_cacheable_tokens
    ):
        # Batches can outlast a 5-minute entry, so the batch path pays for the 1 h TTL.
        ttl = "1h" if route == "batch" else "5m"
    frame = _frame(model, max_tokens, system_text, ttl, task_type.thinking, ThinkingRules.of(spec), output)
    return model, frame, user_text


# Bounded, so per-task system prompts do not grow it without end. Shared prompts are one string object (see
# `render`), whose hash Python keeps: a lookup does not read the prompt again.
@functools.lru_cache(maxsize=1024)
def _text_tokens(text: str, factor: float) -> int:
    return estimate_tokens(text, factor)


@functools.lru_cache(maxsize=1024)
def _frame(
    model: str,
    max_tokens: int,
    system_text: str,
    ttl: str | None,
    thinking: Thinking,
    rules: ThinkingRules,
    output: OutputSpec | None = None,  # hashed by identity: one instance per task type and model
) -> dict[str, Any]:
    # "messages" is a placeholder that keeps the key order of the params (model, max_tokens, messages, ...).
    frame: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": None}
    if system_text:
        block: dict[str, Any] = {"type": "text", "text": system_text}
        if ttl is not None:
            block["cache_control"] = {"type": "ephemeral", "ttl": "1h"} if ttl == "1h" else {"type": "ephemeral"}
        frame["system"] = [block]
    frame.update(_thinking(thinking, rules, max_tokens))
    if output is not None:
        part = request_part(output.schema, output.form)
        if "output_config" in part and "output_config" in frame:
            part["output_config"] = {**frame["output_config"], **part["output_config"]}
        frame.update(part)
    return frame


def count_breakpoints(params: dict[str, Any]) -> int:
    """Number of cache_control markers in tools, system and messages."""
    count = 1 if "cache_control" in params else 0
    for tool in params.get("tools") or []:
        count += "cache_control" in tool
    system = params.get("system")
    if isinstance(system, list):
        count += sum("cache_control" in block for block in system if isinstance(block, dict))
    for message in params.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum("cache_control" in block for block in content if isinstance(block, dict))
    return count


def cache_key(params: dict[str, Any]) -> str | None:
    """A key for the cacheable prefix (model + system with a breakpoint), or None when nothing is cached."""
    system = params.get("system")
    if isinstance(system, list) and any(isinstance(b, dict) and "cache_control" in b for b in system):
        texts = "\x00".join(str(b.get("text", "")) for b in system if isinstance(b, dict))
        digest = hashlib.blake2b(f"{params.get('model')}\x00{texts}".encode(), digest_size=12)
        return digest.hexdigest()
    return None


def system_prefix(params: dict[str, Any]) -> tuple[str | None, int, str | None]:
    """(digest, estimated tokens, breakpoint TTL) of the system prompt; digest None when there is none.

    Unlike `cache_key` this sees prompts that were *not* marked for caching, which is what the optimization
    report needs to spot a repeated prefix nobody cached. Called for every task (the budget's estimate, the usage
    log), so each distinct prompt is hashed and measured once (see `_prefix_facts`).
    """
    system = params.get("system")
    if isinstance(system, str):
        blocks: list[Any] = [{"type": "text", "text": system}]
    elif isinstance(system, list):
        blocks = system
    else:
        return None, 0, None
    texts = tuple(str(b.get("text", "")) for b in blocks if isinstance(b, dict))
    digest, tokens = _prefix_facts(str(params.get("model")), texts)
    if digest is None:
        return None, 0, None
    ttl: str | None = None
    for block in blocks:
        control = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(control, dict):
            ttl = str(control.get("ttl", "5m"))
    return digest, tokens, ttl


T = TypeVar("T")
_MAX_FRAMES = 4096


def per_frame(compute: Callable[[dict[str, Any]], T]) -> Callable[[dict[str, Any]], T]:
    """`compute(frame)` once per frame object: tasks that render alike share one frame (never mutated), so what is
    read from its ~5 KB prompt for each of a million tasks (the budget's estimate, each billed row's usage facts) is
    read once. The frames are held, so an id is never another frame's while it is cached; cleared when full, so raw
    params (a frame per task) do not grow it without end."""
    cache: dict[int, tuple[dict[str, Any], T]] = {}

    def cached(frame: dict[str, Any]) -> T:
        hit = cache.get(id(frame))
        if hit is not None:
            return hit[1]
        value = compute(frame)
        if len(cache) >= _MAX_FRAMES:
            cache.clear()
        cache[id(frame)] = (frame, value)
        return value

    return cached


# Keyed by the prompt strings themselves: tasks that share a frame share those string objects, whose hash Python
# keeps, so a lookup does not read a ~5 KB prompt again. Bounded, so per-task prompts do not grow it without end.
@functools.lru_cache(maxsize=1024)
def _prefix_facts(model: str, texts: tuple[str, ...]) -> tuple[str | None, int]:
    joined = "\x00".join(texts)
    if not joined:
        return None, 0
    return hashlib.blake2b(f"{model}\x00{joined}".encode(), digest_size=12).hexdigest(), estimate_tokens(joined)


def thinking_label(params: dict[str, Any]) -> str | None:
    """'adaptive:<effort>', 'manual:<budget>' or None: how much thinking a request asked for."""
    thinking = params.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") in (None, "disabled", "between_tools"):
        return None
    if thinking.get("type") == "enabled":
        return f"manual:{thinking.get('budget_tokens')}"
    effort = (params.get("output_config") or {}).get("effort", "default")
    return f"{thinking.get('type')}:{effort}"


# `system_prefix` of a task's frame, looked at once per frame.
frame_prefix = per_frame(system_prefix)
