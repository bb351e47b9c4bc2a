"""The stored row's bytes: `succeeded` and `failed` build each row's JSON straight from the decoded answer, and it
must be byte for byte what the pydantic path gives (`TaskResult` built from the answer, `model_dump`, orjson),
so the ledger and the output file do not change. The reference below is that path as the engine ran it before."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch_engine.config import Config, Route, load_config
from batch_engine.files import RawRecord
from batch_engine.models import ErrorInfo, Status, TaskResult, Tokens, Usage
from batch_engine.planning import PlannedTask, compact_json, make_plan
from batch_engine.planning.outcome import (
    FinishedRow,
    answer_outcome,
    failed,
    folded,
    message_text,
    succeeded,
    tokens_from_api,
    usage_from_api,
)
from batch_engine.planning.params import system_prefix, thinking_label
from batch_engine.planning.pricing import baseline_cost, cost
from batch_engine.planning.run_summary import Tally
from batch_engine.state.usage_log import UsageRecord, usage_record
from batch_engine.structured_output import TOOL_NAME, OutputSpec

CONFIG = load_config()
NOW = datetime(2026, 12, 1, tzinfo=UTC)
INVOICE = {
    "invoice_number": "INV-7",
    "issue_date": "2026-11-30",
    "vendor": {"name": "Acme GmbH", "country": "DE", "vat_id": None},
    "currency": "EUR",
    "line_items": [{"description": "Rack rail", "quantity": 2, "unit_price": 19.5, "category": "hardware"}],
    "total": 39.0,
    "status": "due",
}
METADATA: list[Any] = [
    None,
    {},
    {"team": "sre", "ticket": 4711, "tags": ["a", "b"], "nested": {"ok": True, "none": None}},
    {"ünï": "cødé ✓ 🚀", "quote": 'say "hi"\n\ttab \\ slash \u2028', "ctrl": "\x00\x1f"},
    {"floats": [0.1, 1e300, -0.0, 2.5e-308, 123456789.125], "ints": [0, -1, 2**63 - 1, -(2**63)]},
]


def _as_model(
    task: PlannedTask, message: dict[str, Any], route: Route, attempts: int, config: Config, batch_id: str | None
) -> bytes:
    """The row as the pydantic path stores it: a `TaskResult` built from the answer, dumped, encoded."""
    usage = usage_from_api(message.get("usage"))
    content = list(message.get("content") or [])
    model = str(message.get("model") or task.model)
    spec = config.models.get(model) or config.models[task.model]
    text = message_text(content)
    status, parsed, error = answer_outcome(task, message, content, text)
    cost_usd = round(cost(usage, spec, route, config.batch_discount), 10)
    return _dumped(
        task,
        status,
        route,
        model,
        attempts,
        error,
        batch_id,
        text=text,
        parsed=parsed,
        content=content,
        stop_reason=message.get("stop_reason"),
        usage=usage,
        cost_usd=cost_usd,
    )


def _failed_as_model(
    task: PlannedTask, status: Status, route: Route, attempts: int, error: ErrorInfo | None, batch_id: str | None
) -> bytes:
    return _dumped(task, status, route, task.model, attempts, error, batch_id, cost_usd=0.0)


def _dumped(
    task: PlannedTask,
    status: Status,
    route: Route,
    model: str,
    attempts: int,
    error: ErrorInfo | None,
    batch_id: str | None,
    **answer: Any,
) -> bytes:
    result = TaskResult(
        task_id=task.task_id,
        index=task.index,
        status=status,
        task_type=task.task_type,
        route=route,
        model=model,
        batch_id=batch_id,
        attempts=attempts,
        error=error,
        metadata=task.metadata,
        **answer,
    )
    return orjson.dumps(result.model_dump(mode="json"))


def _tasks() -> list[PlannedTask]:
    records = [
        {"task_id": "chat", "task_type": "chat", "input_data": {"message": "Why?"}},
        {"task_id": "cheap", "task_type": "summarize", "input_data": {"document": "doc"}, "model_tier": "cheap"},
        {"task_id": "invoice", "task_type": "extract_invoice", "input_data": {"text": "INV-7 ..."}},
        {"task_id": "raw", "task_type": "chat", "params": {"messages": [{"role": "user", "content": "hi"}]}},
    ]
    plan = make_plan([RawRecord(index=i, line=i + 1, value=r) for i, r in enumerate(records)], CONFIG, NOW)
    assert not plan.rejections and {task.task_id for task in plan.tasks} == {r["task_id"] for r in records}
    invoice = next(task for task in plan.tasks if task.output is not None)
    assert INVOICE is not None and invoice.output is not None
    forms = [replace(invoice, output=OutputSpec.of(invoice.output.schema, form)) for form in ("tool", "prompt")]
    with_metadata = [None if m is None else compact_json(m) for m in METADATA]
    return [replace(task, metadata_json=m) for task in [*plan.tasks, *forms] for m in with_metadata]


def _message(content: list[dict[str, Any]], stop_reason: str | None = "end_turn", **fields: Any) -> dict[str, Any]:
    usage = fields.pop("usage", {"input_tokens": 120, "output_tokens": 31})
    message = {"id": "msg_01", "type": "message", "role": "assistant", "content": content}
    return message | {"stop_reason": stop_reason, "stop_sequence": None, "usage": usage} | fields


THINKING = {"type": "thinking", "thinking": "Let me see…", "signature": "c2ln"}
MESSAGES: dict[str, dict[str, Any]] = {
    "text": _message([{"type": "text", "text": "The answer."}]),
    "unicode text": _message([{"type": "text", "text": 'Ünï "q" \\ \n\t 🚀 \u2028 \x00'}]),
    "thinking": _message(
        [THINKING, {"type": "text", "text": "Done."}],
        usage={"input_tokens": 50, "output_tokens": 900, "output_tokens_details": {"thinking_tokens": 870}},
    ),
    "redacted thinking": _message([{"type": "redacted_thinking", "data": "ZW5j"}, {"type": "text", "text": "ok"}]),
    "tool_use": _message(
        [
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x", "n": [1, 2.5, None, True]}},
        ],
        "tool_use",
    ),
    "server_tool_use": _message(
        [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [{"type": "web_search_result"}]},
            {"type": "text", "text": "Found.", "citations": [{"type": "web_search_result_location", "url": "u"}]},
        ],
        usage={"input_tokens": 10, "output_tokens": 5, "server_tool_use": {"web_search_requests": 1}},
    ),
    "cache split by ttl": _message(
        [{"type": "text", "text": "cached"}],
        usage={
            "input_tokens": 7,
            "output_tokens": 3,
            "cache_read_input_tokens": 4000,
            "cache_creation_input_tokens": 1500,
            "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 1000},
            "service_tier": "batch",
        },
    ),
    "cache not split": _message(
        [{"type": "text", "text": "cached"}],
        usage={"input_tokens": 7, "output_tokens": 3, "cache_creation_input_tokens": 1500, "cache_creation": None},
    ),
    "long prompt": _message([{"type": "text", "text": "long"}], usage={"input_tokens": 150_000, "output_tokens": 9}),
    "no usage": {"content": [{"type": "text", "text": "x"}], "stop_reason": "end_turn"},
    "null usage fields": _message([], usage={"input_tokens": None, "output_tokens": 0}),
    "other model": _message([{"type": "text", "text": "x"}], model="claude-opus-5-5"),
    "refusal": _message(
        [{"type": "text", "text": "I can't."}],
        "refusal",
        stop_details={"type": "refusal", "category": "cyber", "explanation": "no"},
    ),
    "pause_turn": _message([{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}], "pause_turn"),
    "context window": _message([{"type": "text", "text": "cut"}], "model_context_window_exceeded"),
    "max_tokens on thinking": _message([THINKING], "max_tokens"),
    "max_tokens with text": _message([{"type": "text", "text": "cut o"}], "max_tokens"),
    "structured ok": _message([{"type": "text", "text": orjson.dumps(INVOICE).decode()}]),
    "structured fenced": _message([{"type": "text", "text": "```json\n" + orjson.dumps(INVOICE).decode() + "\n```"}]),
    "structured invalid": _message([{"type": "text", "text": '{"invoice_number": 7}'}]),
    "structured not json": _message([{"type": "text", "text": "Sure! Here it is"}]),
    "structured tool": _message(
        [{"type": "tool_use", "id": "toolu_2", "name": TOOL_NAME, "input": INVOICE}], "tool_use"
    ),
    "structured tool invalid": _message(
        [{"type": "tool_use", "id": "toolu_3", "name": TOOL_NAME, "input": {"total": "n/a"}}], "tool_use"
    ),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_a_succeeded_row_is_stored_as_the_pydantic_path_stored_it(name: str) -> None:
    message = MESSAGES[name]
    routes: list[tuple[Route, str | None, int]] = [("batch", "msgbatch_01", 1), ("realtime", None, 3)]
    for task in _tasks():
        for route, batch_id, attempts in routes:
            row = succeeded(task, message, route, attempts, CONFIG, batch_id=batch_id)
            assert row.json == _as_model(task, message, route, attempts, CONFIG, batch_id), (task.task_id, route)
            stored = TaskResult.model_validate_json(row.json)
            assert (row.index, row.task_id, row.status, row.route, row.model) == (
                stored.index,
                stored.task_id,
                stored.status,
                stored.route,
                stored.model,
            )
            assert stored.usage is not None
            assert (row.batch_id, row.attempts, row.cost_usd, row.usage) == (
                stored.batch_id,
                stored.attempts,
                stored.cost_usd,
                Tokens.of(stored.usage),
            )


def test_the_cases_cover_every_status_an_answer_can_end_in_and_both_price_cards() -> None:
    seen = {succeeded(task, m, "batch", 1, CONFIG).status for task in _tasks() for m in MESSAGES.values()}
    assert seen == {"succeeded", "refused", "incomplete", "invalid_output"}
    haiku = CONFIG.models["claude-haiku-5-5"]
    assert haiku.long_prompt_threshold_tokens is not None
    long_usage = usage_from_api(MESSAGES["long prompt"]["usage"])
    assert haiku.price_for_prompt(long_usage.prompt_tokens) != haiku.price
    tool_tasks = [task for task in _tasks() if task.output is not None and task.output.form == "tool"]
    rows = [succeeded(task, MESSAGES["structured tool"], "batch", 1, CONFIG) for task in tool_tasks]
    assert {orjson.dumps(TaskResult.model_validate_json(row.json).parsed) for row in rows} == {orjson.dumps(INVOICE)}


@pytest.mark.parametrize("status", ["errored", "expired", "canceled", "timed_out", "skipped_budget", "rejected"])
def test_a_failed_row_is_stored_as_the_pydantic_path_stored_it(status: Status) -> None:
    errors = [
        None,
        ErrorInfo(type="api_error", message='overloaded "529" ✓'),
        ErrorInfo(type="invalid_request_error", message="bad", request_id="req_01"),
    ]
    for task in _tasks():
        for error in errors:
            for route, batch_id in (("batch", "msgbatch_01"), ("realtime", None)):
                row = failed(task, status, route, 2, error, batch_id=batch_id)  # type: ignore[arg-type]
                assert row.json == _failed_as_model(task, status, route, 2, error, batch_id)  # type: ignore[arg-type]
                assert (row.cost_usd, row.usage, row.status) == (0.0, None, status)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    metadata=st.none() | st.dictionaries(st.text(max_size=8), JSON, max_size=5),
    blocks=st.lists(st.dictionaries(st.text(max_size=8), JSON, max_size=4), max_size=3),
    text=st.text(),
    tokens=st.lists(st.integers(0, 10**9), min_size=6, max_size=6),
)
def test_any_json_in_an_answer_or_in_metadata_is_stored_the_same(
    metadata: dict[str, Any] | None, blocks: list[dict[str, Any]], text: str, tokens: list[int]
) -> None:
    task = replace(_tasks()[0], metadata_json=None if metadata is None else compact_json(metadata))
    usage = {
        "input_tokens": tokens[0],
        "output_tokens": tokens[1],
        "cache_read_input_tokens": tokens[2],
        "cache_creation_input_tokens": tokens[3] + tokens[4],
        "cache_creation": {"ephemeral_5m_input_tokens": tokens[3], "ephemeral_1h_input_tokens": tokens[4]},
        "output_tokens_details": {"thinking_tokens": tokens[5]},
    }
    message = _message([*blocks, {"type": "text", "text": text}], usage=usage)
    for route in ("batch", "realtime"):
        row = succeeded(task, message, route, 1, CONFIG)
        assert row.json == _as_model(task, message, route, 1, CONFIG, None)
        stored = TaskResult.model_validate_json(row.json).usage
        # The row's tokens are what the lanes, the usage log and the cost read: the stored usage, field by field.
        assert stored is not None and row.usage is not None
        assert row.usage._asdict() == stored.model_dump()
        assert tokens_from_api(usage)._asdict() == usage_from_api(usage).model_dump()
        assert usage_record(task, row, "r", 5.0, 0.5, CONFIG, "req_1") == _usage_as_before(row, 0.5, "req_1")


def _usage_as_before(row: FinishedRow, latency_s: float | None, request_id: str | None) -> UsageRecord:
    """The usage-log row as the engine built it before: field by field, by name, from the stored row."""
    task = next(t for t in _tasks() if t.index == row.index and t.task_id == row.task_id)
    stored = TaskResult.model_validate_json(row.json)
    usage = stored.usage or Usage()
    model = stored.model or task.model
    spec = CONFIG.models.get(model) or CONFIG.models[task.model]
    split = usage.cache_write_5m_tokens + usage.cache_write_1h_tokens
    prefix_key, prefix_tokens, ttl = system_prefix(task.frame)
    if stored.batch_id is not None:
        key: str | None = f"batch:{stored.batch_id}:{task.task_id}"
    else:
        key = None if request_id is None else f"request:{request_id}"
    return UsageRecord(
        at=5.0,
        run_key="r",
        task_id=task.task_id,
        task_type=task.task_type,
        route=stored.route or task.route,
        model=model,
        status=stored.status,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_input_tokens,
        cache_write_5m_tokens=usage.cache_write_5m_tokens if split else usage.cache_creation_input_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        thinking_tokens=usage.thinking_tokens,
        cost_usd=stored.cost_usd or 0.0,
        baseline_usd=baseline_cost(usage, spec),
        latency_s=latency_s,
        max_tokens=int(task.frame.get("max_tokens", 0)),
        prefix_key=prefix_key,
        prefix_tokens=prefix_tokens,
        cache_ttl=ttl,
        thinking=thinking_label(task.frame),
        route_reason=task.route_reason,
        request_key=key,
    )


def test_a_billed_row_is_logged_with_the_usage_record_built_field_by_field() -> None:
    for task in _tasks():
        for message in MESSAGES.values():
            for route, batch_id, latency_s, request_id in (
                ("batch", "msgbatch_01", None, None),
                ("realtime", None, 0.25, "req_01"),
                ("realtime", None, None, None),
            ):
                row = succeeded(task, message, route, 1, CONFIG, batch_id=batch_id)  # type: ignore[arg-type]
                logged = usage_record(task, row, "r", 5.0, latency_s, CONFIG, request_id)
                assert logged == _usage_as_before(row, latency_s, request_id)
                assert type(logged) is UsageRecord


def test_a_retried_row_carries_both_requests_usage_and_cost() -> None:
    task = next(t for t in _tasks() if t.output is not None and t.metadata_json is not None)
    earlier = succeeded(task, MESSAGES["structured invalid"], "batch", 1, CONFIG, batch_id="msgbatch_01")
    later = succeeded(task, MESSAGES["structured ok"], "realtime", 2, CONFIG)
    row = folded(earlier.result(), later)
    stored = TaskResult.model_validate_json(row.json)
    assert (stored.status, stored.output_retries, row.status) == ("succeeded", 1, "succeeded")
    assert stored.cost_usd == row.cost_usd == round(earlier.cost_usd + later.cost_usd, 10)
    assert earlier.usage is not None and later.usage is not None
    assert stored.usage is not None
    both = Usage(**{name: getattr(earlier.usage, name) + getattr(later.usage, name) for name in Usage.model_fields})
    assert stored.usage == both
    assert row.usage == Tokens.of(both)
    assert FinishedRow.of(stored) == row


def test_the_run_summary_adds_up_every_stored_rows_usage_and_cost() -> None:
    tasks = _tasks()
    rows = [succeeded(task, message, "batch", 1, CONFIG).json for task in tasks for message in MESSAGES.values()]
    rows += [failed(task, "expired", "batch", 1, None).json for task in tasks]
    # A row whose usage lacks a field (as a row written before that field existed would): counted as zero.
    legacy = orjson.loads(rows[0])
    del legacy["usage"]["thinking_tokens"]
    rows.append(orjson.dumps(legacy))
    tally = Tally(CONFIG)
    for row in rows:
        tally.add(orjson.loads(row))
    summary = tally.summary(
        run_key="k",
        input_path="in",
        output_path="out",
        simulated=True,
        started_at=0.0,
        finished_at=1.0,
        total=len(rows),
        batches=[],
        durations_s={},
    )
    results = [TaskResult.model_validate_json(row) for row in rows]
    usages = [r.usage for r in results if r.usage is not None]
    assert summary.tokens.model_dump() == {
        "input": sum(u.input_tokens for u in usages),
        "output": sum(u.output_tokens for u in usages),
        "cache_read": sum(u.cache_read_input_tokens for u in usages),
        "cache_write": sum(u.cache_creation_input_tokens for u in usages),
        "cache_write_5m": sum(u.cache_write_5m_tokens for u in usages),
        "cache_write_1h": sum(u.cache_write_1h_tokens for u in usages),
        "thinking": sum(u.thinking_tokens for u in usages),
    }
    baseline = sum(
        baseline_cost(r.usage, CONFIG.models[r.model]) for r in results if r.usage is not None and r.model is not None
    )
    assert summary.cost.baseline_usd == round(baseline, 6)
    assert summary.cost.total_usd == round(sum(r.cost_usd or 0.0 for r in results), 6)
    assert summary.counts.by_status == dict(sorted(Counter(r.status for r in results).items()))
