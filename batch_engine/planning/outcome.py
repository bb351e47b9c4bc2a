"""Pure: turn an API answer (a message, an error, a batch row outcome) into the task's output row with cost.

The row comes as a `FinishedRow`: the fields the lanes, the usage log and the ledger read, and the row's output
JSON, built straight from the decoded answer. It is byte for byte what `TaskResult`'s JSON dump gives
(tests/unit/test_finished_rows.py); building and dumping the pydantic model for each of a million rows was most
of the CPU of storing them. `TaskResult` stays the schema of the output and what the ledger is read back into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from batch_engine.config import Config, Route
from batch_engine.models import ErrorInfo, Status, TaskResult, Tokens, Usage
from batch_engine.planning import PlannedTask
from batch_engine.planning.pricing import cost


# Read-only by its `Final` fields (mypy refuses an assignment), not by `frozen=True`: a frozen dataclass sets each
# field through `object.__setattr__`, which was ~1.2 µs of building each of 100k rows (`bench plan`).
@dataclass(slots=True)
class FinishedRow:
    """A finished task's output row, ready to store: what the lanes and the usage log read, and its output JSON."""

    index: Final[int]
    task_id: Final[str | None]
    status: Final[Status]
    route: Final[Route | None]
    model: Final[str | None]
    batch_id: Final[str | None]
    attempts: Final[int]
    cost_usd: Final[float]
    usage: Final[Tokens | None]  # the billed tokens; None when nothing was billed
    json: Final[bytes]  # the row as the output file has it: a `TaskResult` dumped to JSON

    @classmethod
    def of(cls, result: TaskResult) -> FinishedRow:
        """The row of a `TaskResult` (a retried row folded, a test's row)."""
        return cls(
            index=result.index,
            task_id=result.task_id,
            status=result.status,
            route=result.route,
            model=result.model,
            batch_id=result.batch_id,
            attempts=result.attempts,
            cost_usd=result.cost_usd or 0.0,
            usage=None if result.usage is None else Tokens.of(result.usage),
            json=orjson.dumps(result.model_dump(mode="json")),
        )

    def result(self) -> TaskResult:
        """The row as the output's model, validated."""
        return TaskResult.model_validate_json(self.json)


def _usage_counts(usage: dict[str, Any] | None) -> dict[str, int]:
    """The API's usage object flattened, keyed and ordered as `Usage`'s fields (its JSON as the row has it)."""
    if not usage:
        usage = {}
    creation = usage.get("cache_creation") or {}
    details = usage.get("output_tokens_details") or {}
    return {
        "input_tokens": int(usage.get("input_tokens") or 0),
        "output_tokens": int(usage.get("output_tokens") or 0),
        "cache_read_input_tokens": int(usage.get("cache_read_input_tokens") or 0),
        "cache_creation_input_tokens": int(usage.get("cache_creation_input_tokens") or 0),
        "cache_write_5m_tokens": int(creation.get("ephemeral_5m_input_tokens") or 0),
        "cache_write_1h_tokens": int(creation.get("ephemeral_1h_input_tokens") or 0),
        "thinking_tokens": int(details.get("thinking_tokens") or 0),
    }


def usage_from_api(usage: dict[str, Any] | None) -> Usage:
    """Flatten the API's usage object (cache writes split by TTL, thinking tokens from output details)."""
    return Usage(**_usage_counts(usage))


def tokens_from_api(usage: dict[str, Any] | None) -> Tokens:
    """`usage_from_api` as the plain tuple the lanes read per reply (no pydantic model per request)."""
    return _tokens(_usage_counts(usage))


def _tokens(counts: dict[str, int]) -> Tokens:
    # The counts are in `Tokens`' field order (`_usage_counts`): positional, not 7 keyword arguments, ~1 µs a row.
    return Tokens._make(counts.values())


def message_text(content: list[dict[str, Any]]) -> str:
    """The concatenated text blocks of a message (thinking and tool blocks stay in `content`)."""
    if len(content) == 1:  # the usual answer: one text block (the text as it is, not joined)
        block = content[0]
        return str(block.get("text", "")) if block.get("type") == "text" else ""
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
    if stop_reason == "max_tokens" and not any(block.get("type") in ("text", "tool_use") for block in content):
        # Thinking counts toward max_tokens: a small max_tokens can be spent on thinking alone.
        message_text_ = "max_tokens was reached before any text (thinking may have used all of it)"
        return "incomplete", ErrorInfo(type="max_tokens", message=message_text_)
    return "succeeded", None


def answer_outcome(
    task: PlannedTask, message: dict[str, Any], content: list[dict[str, Any]], text: str
) -> tuple[Status, Any, ErrorInfo | None]:
    """The status of an answered task, its parsed output (with an output schema) and the reason when it did not
    succeed. Refused or incomplete first: such an answer did not do the task, whatever its shape."""
    status, error = answer_status(message, content)
    if status != "succeeded" or task.output is None:
        return status, None, error
    parsed, reason = task.output.parse(content, text)
    if reason is None:
        return status, parsed, None
    stop = message.get("stop_reason")
    if stop in ("refusal", "max_tokens"):
        reason = f"{reason} (stop_reason {stop})"
    return "invalid_output", parsed, ErrorInfo(type="invalid_output", message=reason)


def succeeded(
    task: PlannedTask,
    message: dict[str, Any],
    route: Route,
    attempts: int,
    config: Config,
    batch_id: str | None = None,
) -> FinishedRow:
    """The output row of a task whose request was answered (a 200), costed at the route's price.

    Its status says whether the answer did the task (see `answer_outcome`); it is billed either way. Refused and
    incomplete rows are not retried: a second attempt is billed again and is likely to end the same way. With an
    output schema the answer is validated: `parsed` when it matches, else status `invalid_output`.
    """
    counts = _usage_counts(message.get("usage"))
    usage = _tokens(counts)
    content = message.get("content") or []
    model = str(message.get("model") or task.model)
    spec = config.models.get(model) or config.models[task.model]
    text = message_text(content)
    status, parsed, error = answer_outcome(task, message, content, text)
    cost_usd = round(cost(usage, spec, route, config.batch_discount), 10)
    row = _row(
        task,
        status,
        route,
        model,
        batch_id,
        attempts,
        error,
        text=text,
        parsed=parsed,
        content=content,
        stop_reason=message.get("stop_reason"),
        usage=counts,
        cost_usd=cost_usd,
    )
    return _finished(row, usage, task)


def _row(
    task: PlannedTask,
    status: Status,
    route: Route,
    model: str,
    batch_id: str | None,
    attempts: int,
    error: ErrorInfo | None,
    *,
    text: str | None = None,
    parsed: Any = None,
    content: list[dict[str, Any]] | None = None,
    stop_reason: str | None = None,
    usage: dict[str, int] | None = None,
    cost_usd: float = 0.0,
) -> dict[str, Any]:
    """A row's JSON-ready fields: `TaskResult`'s, in its order (the JSON its model dump gives), metadata left null
    for `_finished` to splice in."""
    return {
        "task_id": task.task_id,
        "index": task.index,
        "status": status,
        "task_type": task.task_type,
        "route": route,
        "model": model,
        "batch_id": batch_id,
        "attempts": attempts,
        "output_retries": 0,
        "text": text,
        "parsed": parsed,
        "content": content,
        "stop_reason": stop_reason,
        "usage": usage,
        "cost_usd": cost_usd,
        "error": None if error is None else error.model_dump(mode="json"),
        "metadata": None,
    }


def _finished(row: dict[str, Any], usage: Tokens | None, task: PlannedTask) -> FinishedRow:
    """The finished row of `row` (a `TaskResult`'s fields, in order, as JSON-ready values, its metadata left null),
    with the task's metadata as planning kept it: already JSON."""
    encoded = orjson.dumps(row)
    if task.metadata_json is not None:
        # `metadata` is the last field: `..."metadata":null}` becomes `..."metadata":{...}}`.
        encoded = encoded[: -len(b"null}")] + task.metadata_json + b"}"
    return FinishedRow(
        row["index"],
        row["task_id"],
        row["status"],
        row["route"],
        row["model"],
        row["batch_id"],
        row["attempts"],
        row["cost_usd"],
        usage,
        encoded,
    )


def folded(earlier: TaskResult, later: FinishedRow) -> FinishedRow:
    """A retried row: the later answer, with the earlier request's usage and cost added (both were billed)."""
    answer = later.result()
    if earlier.usage is None or answer.usage is None:
        usage = answer.usage or earlier.usage
    else:
        usage = Usage(
            **{name: getattr(earlier.usage, name) + getattr(answer.usage, name) for name in Usage.model_fields}
        )
    return FinishedRow.of(
        answer.model_copy(
            update={
                "usage": usage,
                "cost_usd": round((earlier.cost_usd or 0.0) + (answer.cost_usd or 0.0), 10),
                "output_retries": earlier.output_retries + 1,
            }
        )
    )


def failed(
    task: PlannedTask,
    status: Status,
    route: Route,
    attempts: int,
    error: ErrorInfo | None,
    batch_id: str | None = None,
) -> FinishedRow:
    """The output row of a task that ended without a result (nothing billed: cost 0)."""
    row = _row(task, status, route, task.model, batch_id, attempts, error)
    return _finished(row, None, task)
