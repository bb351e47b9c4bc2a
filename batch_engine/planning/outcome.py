"""Pure: turn an API answer (a message, an error, a batch row outcome) into the task's output row with cost."""

from __future__ import annotations

from typing import Any

from batch_engine.config import Config, Route
from batch_engine.models import ErrorInfo, Status, TaskResult, Usage
from batch_engine.planning import PlannedTask
from batch_engine.planning.pricing import cost


def usage_from_api(usage: dict[str, Any] | None) -> Usage:
    """Flatten the API's usage object (cache writes split by TTL, thinking tokens from output details)."""
    if not usage:
        return Usage()
    creation = usage.get("cache_creation") or {}
    details = usage.get("output_tokens_details") or {}
    return Usage(
        input_tokens=int(usage.get("input_tokens") or 0),
        output_tokens=int(usage.get("output_tokens") or 0),
        cache_read_input_tokens=int(usage.get("cache_read_input_tokens") or 0),
        cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens") or 0),
        cache_write_5m_tokens=int(creation.get("ephemeral_5m_input_tokens") or 0),
        cache_write_1h_tokens=int(creation.get("ephemeral_1h_input_tokens") or 0),
        thinking_tokens=int(details.get("thinking_tokens") or 0),
    )


def message_text(content: list[dict[str, Any]]) -> str:
    """The concatenated text blocks of a message (thinking and tool blocks stay in `content`)."""
    return "".join(str(block.get("text", "")) for block in content if block.get("type") == "text")


# A 200 is not always an answer (reference anthropic-api.md §0.6; SDK 2.x types/stop_reason.py).
_INCOMPLETE_STOP_REASONS = {
    "pause_turn": "the turn was paused (a server-tool loop); it needs a follow-up request to finish",
    "model_context_window_exceeded": "the answer was cut off at the model's context window",
}


def answer_status(message: dict[str, Any], content: list[dict[str, Any]]) -> tuple[Status, ErrorInfo | None]:
    """Whether a 200 did the task: succeeded, refused or incomplete (both billed), with the reason when not."""
    stop_reason = message.get("stop_reason")
    if stop_reason == "refusal":
        details = message.get("stop_details") or {}
        category = details.get("category") if isinstance(details, dict) else None
        explanation = details.get("explanation") if isinstance(details, dict) else None
        reason = "the model declined the request" + (f" (category {category})" if category else "")
        return "refused", ErrorInfo(type="refusal", message=f"{reason}: {explanation}" if explanation else reason)
    if stop_reason in _INCOMPLETE_STOP_REASONS:
        return "incomplete", ErrorInfo(type=str(stop_reason), message=_INCOMPLETE_STOP_REASONS[str(stop_reason)])
    answered = any(block.get("type") in ("text", "tool_use") for block in content)
    if stop_reason == "max_tokens" and not answered:
        # Thinking counts toward max_tokens: a small max_tokens can be spent on thinking alone.
        message_text_ = "max_tokens was reached before any text (thinking may have used all of it)"
        return "incomplete", ErrorInfo(type="max_tokens", message=message_text_)
    return "succeeded", None


def succeeded(
    task: PlannedTask,
    message: dict[str, Any],
    route: Route,
    attempts: int,
    config: Config,
    batch_id: str | None = None,
) -> TaskResult:
    """The output row of a task whose request was answered (a 200), costed at the route's price.

    Its status says whether the answer did the task (see `answer_status`); it is billed either way. Refused and
    incomplete rows are not retried: a second attempt is billed again and is likely to end the same way. With an
    output schema the answer is validated: `parsed` when it matches, else status `invalid_output`.
    """
    usage = usage_from_api(message.get("usage"))
    content = list(message.get("content") or [])
    model = str(message.get("model") or task.model)
    spec = config.models.get(model) or config.models[task.model]
    text = message_text(content)
    parsed: Any = None
    # Refused or incomplete first: such an answer did not do the task, whatever its shape.
    status, error = answer_status(message, content)
    if status == "succeeded" and task.output is not None:
        parsed, reason = task.output.parse(content, text)
        if reason is not None:
            status = "invalid_output"
            stop = message.get("stop_reason")
            if stop in ("refusal", "max_tokens"):
                reason = f"{reason} (stop_reason {stop})"
            error = ErrorInfo(type="invalid_output", message=reason)
    return TaskResult(
        task_id=task.task_id,
        index=task.index,
        status=status,
        task_type=task.task_type,
        route=route,
        model=model,
        batch_id=batch_id,
        attempts=attempts,
        text=text,
        parsed=parsed,
        content=content,
        stop_reason=message.get("stop_reason"),
        usage=usage,
        cost_usd=round(cost(usage, spec, route, config.batch_discount), 10),
        error=error,
        metadata=task.metadata,
    )


def folded(earlier: TaskResult, later: TaskResult) -> TaskResult:
    """A retried row: the later answer, with the earlier request's usage and cost added (both were billed)."""
    if earlier.usage is None or later.usage is None:
        usage = later.usage or earlier.usage
    else:
        usage = Usage(
            **{name: getattr(earlier.usage, name) + getattr(later.usage, name) for name in Usage.model_fields}
        )
    return later.model_copy(
        update={
            "usage": usage,
            "cost_usd": round((earlier.cost_usd or 0.0) + (later.cost_usd or 0.0), 10),
            "output_retries": earlier.output_retries + 1,
        }
    )


def failed(
    task: PlannedTask,
    status: Status,
    route: Route,
    attempts: int,
    error: ErrorInfo | None,
    batch_id: str | None = None,
) -> TaskResult:
    """The output row of a task that ended without a result (nothing billed: cost 0)."""
    return TaskResult(
        task_id=task.task_id,
        index=task.index,
        status=status,
        task_type=task.task_type,
        route=route,
        model=task.model,
        batch_id=batch_id,
        attempts=attempts,
        cost_usd=0.0,
        error=error,
        metadata=task.metadata,
    )
