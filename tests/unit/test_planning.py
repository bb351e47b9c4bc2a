"""Routing, params (thinking rules, cache breakpoints, safe templates), chunking and the output order."""

from __future__ import annotations

import gc
import hashlib
import itertools
import sys
import tracemalloc
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from batch_engine.config import Config, Route, default_config_text, load_config, parse_config
from batch_engine.files import RawRecord
from batch_engine.models import Rejection, TaskRequest, TaskResult
from batch_engine.planning import PlannedTask, make_plan
from batch_engine.planning.chunking import chunk_tasks, row_bytes
from batch_engine.planning.identity import request_digests
from batch_engine.planning.merge import in_input_order
from batch_engine.planning.outcome import FinishedRow
from batch_engine.planning.params import TemplateError, count_breakpoints, render
from batch_engine.planning.routing import route_task
from batch_engine.planning.rows import RowEncoder
from batch_engine.state.ledger import Ledger

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
LONG = "Follow the house style carefully. " * 100  # ~3,400 bytes ≈ 850 tokens, above every 5.x minimum


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config()


def task(**fields: object) -> TaskRequest:
    base: dict[str, object] = {"task_id": "t1", "task_type": "summarize", "input_data": {"document": "d"}}
    base.update(fields)
    return TaskRequest.model_validate(base)


def params_of(request: TaskRequest, config: Config, route: Route) -> dict[str, Any]:
    """The Messages API params the engine would send for `request` on `route`: planned as a run plans it."""
    record = RawRecord(index=0, line=1, value=request.model_dump(mode="json", exclude_none=True))
    plan = make_plan([record], config, NOW, route=route)
    assert not plan.rejections, plan.rejections
    (planned,) = plan.tasks
    return planned.params


def test_task_type_default_route_is_used_without_hints(config: Config) -> None:
    route, reason = route_task(task(), config.task_types["summarize"], NOW, config.batch_sla_s)
    assert route == "batch"
    assert "summarize" in reason


def test_explicit_mode_wins_over_the_task_type(config: Config) -> None:
    chat = config.task_types["chat"]
    assert route_task(task(task_type="chat", mode="batch"), chat, NOW, 86400)[0] == "batch"


def test_deadline_sooner_than_the_batch_sla_goes_realtime(config: Config) -> None:
    soon = task(deadline=(NOW + timedelta(hours=3)).isoformat())
    later = task(deadline=(NOW + timedelta(hours=30)).isoformat())
    summarize = config.task_types["summarize"]
    assert route_task(soon, summarize, NOW, 86400)[0] == "realtime"
    assert route_task(later, summarize, NOW, 86400)[0] == "batch"
    assert route_task(task(max_latency_s=60), summarize, NOW, 86400)[0] == "realtime"


def test_long_system_prompt_gets_a_1h_breakpoint_on_batch_and_5m_on_realtime(config: Config) -> None:
    t = task(system=LONG)
    batch = params_of(t, config, "batch")
    realtime = params_of(t, config, "realtime")
    assert batch["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert realtime["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert count_breakpoints(batch) == 1
    assert "stream" not in batch


def test_system_prompt_below_the_model_minimum_is_not_marked(config: Config) -> None:
    params = params_of(task(system="short"), config, "batch")
    assert "cache_control" not in params["system"][0]


def test_claude_5_models_get_adaptive_thinking_never_a_manual_budget(config: Config) -> None:
    params = params_of(task(task_type="critical_fix", input_data={"incident": "i", "code": "c"}), config, "realtime")
    assert params["model"] == "claude-opus-5-5"
    assert params["thinking"] == {"type": "adaptive"}
    assert params["output_config"] == {"effort": "high"}
    assert "temperature" not in params


def test_manual_thinking_is_kept_for_models_that_accept_it() -> None:
    text = load_config().model_dump_json()
    del text  # the shipped config only uses adaptive thinking; build one that uses a manual budget
    from batch_engine.config import default_config_text, parse_config

    custom = (
        default_config_text()
        .replace(
            'tier = "cheap"\nmax_tokens = 512',
            'tier = "cheap"\nmax_tokens = 4096\nthinking = { mode = "manual", budget_tokens = 2048 }',
            1,
        )
        .replace('cheap = "claude-haiku-5-5"', 'cheap = "claude-haiku-4-5"')
    )
    cfg = parse_config(custom)
    params = params_of(task(), cfg, "batch")
    assert params["thinking"] == {"type": "enabled", "budget_tokens": 2048}


def test_manual_thinking_on_a_claude_5_model_is_a_config_error() -> None:
    from batch_engine.config import default_config_text, parse_config
    from batch_engine.errors import ConfigError

    bad = default_config_text().replace(
        'tier = "cheap"\nmax_tokens = 512',
        'tier = "cheap"\nmax_tokens = 4096\nthinking = { mode = "manual", budget_tokens = 2048 }',
        1,
    )
    with pytest.raises(ConfigError, match=r"task_types\.summarize\.thinking"):
        parse_config(bad)


@pytest.mark.parametrize("template", ["{x.__class__}", "{x[0]}", "{x!r}", "{x:>10}", "{0}"])
def test_templates_cannot_walk_objects(template: str) -> None:
    with pytest.raises(TemplateError):
        render(template, {"x": "value"})


def test_missing_template_variable_names_the_field() -> None:
    with pytest.raises(TemplateError) as info:
        render("Hello {name}", {})
    assert info.value.field == "input_data.name"


def planned(i: int, size: int, key: str | None) -> PlannedTask:
    return PlannedTask(
        index=i,
        task_id=f"t{i}",
        task_type="summarize",
        route="batch",
        route_reason="",
        model="claude-haiku-5-5",
        frame={"model": "claude-haiku-5-5", "max_tokens": 10, "messages": None},
        user_text="x" * size,
        estimated_input_tokens=size // 4,
        cache_key=key,
        stream=False,
        metadata_json=None,
    )


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(0, 3000), st.sampled_from([None, "a", "b", "c"])), max_size=120),
    max_requests=st.integers(1, 20),
    max_bytes=st.integers(4000, 20000),
)
def test_chunks_respect_limits_and_cover_every_task_once(
    sizes: list[tuple[int, str | None]], max_requests: int, max_bytes: int
) -> None:
    tasks = [planned(i, size, key) for i, (size, key) in enumerate(sizes)]
    chunks = chunk_tasks(tasks, max_requests, max_bytes)
    positions = [pos for chunk in chunks for pos in chunk.task_positions]
    assert sorted(positions) == list(range(len(tasks)))
    for chunk in chunks:
        assert len(chunk.task_positions) <= max_requests
        assert chunk.size_bytes <= max_bytes
        assert chunk.size_bytes >= sum(row_bytes(tasks[p]) for p in chunk.task_positions)
    # Rows sharing a cache prefix are adjacent in the submission order.
    keys = [tasks[p].cache_key for p in positions]
    seen_done: set[str | None] = set()
    for prev, cur in itertools.pairwise(keys):
        if cur != prev:
            seen_done.add(prev)
            assert cur not in seen_done
    assert chunk_tasks(tasks, max_requests, max_bytes) == chunks  # deterministic


def result(i: int, status: str = "succeeded") -> FinishedRow:
    return FinishedRow.of(
        TaskResult.model_validate({"task_id": f"t{i}", "index": i, "status": status, "text": f"{status} {i}"})
    )


@settings(max_examples=100, deadline=None)
@given(
    st.permutations(list(range(30))),
    st.sets(st.integers(0, 29), max_size=5),
    st.sets(st.integers(30, 40), max_size=5),
)
def test_the_output_rows_are_in_input_order_whatever_the_order_results_arrive(
    order: list[int], retried: set[int], rejected: set[int]
) -> None:
    # What the run writes: rows saved to its ledger as they arrive (some first errored, then retried), read back
    # in index order and merged with the rejected records, exactly as `Run.rows` and `Run.row_json` do.
    rejections = [Rejection(index=i, field="task_id", reason="bad") for i in rejected]
    with Ledger(Path(":memory:")) as ledger:
        ledger.save_results("run", [result(i, "errored") for i in sorted(retried)], 0.0)
        for i in order:
            ledger.save_results("run", [result(i)], 1.0)
        rows = list(in_input_order(((row.index, row) for row in ledger.results("run")), rejections))
        stored = list(in_input_order(ledger.result_json("run"), list(reversed(rejections))))
    assert [row.index for row in rows] == sorted([*range(30), *rejected])
    assert all(row.status == ("rejected" if row.index in rejected else "succeeded") for row in rows)
    assert [row if isinstance(row, TaskResult) else TaskResult.model_validate_json(row) for row in stored] == rows


def test_raw_params_with_more_than_four_breakpoints_are_rejected(config: Config) -> None:
    from batch_engine.planning.validate import validate_record

    marked = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    record = {
        "task_id": "raw",
        "task_type": "chat",
        "params": {"system": [marked] * 3, "messages": [{"role": "user", "content": [marked, marked]}]},
    }
    rejection = validate_record(record, 0, 1, config)
    assert isinstance(rejection, Rejection)
    assert rejection.field == "params"
    record["params"]["messages"][0]["content"] = [marked]  # type: ignore[index]
    assert isinstance(validate_record(record, 0, 1, config), TaskRequest)


def records_of(values: list[dict[str, object]]) -> list[RawRecord]:
    return [RawRecord(index=i, line=i + 1, value=value) for i, value in enumerate(values)]


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(user_texts=st.lists(_TEXT, min_size=1, max_size=5), system=_TEXT)
def test_a_batch_row_is_the_bytes_its_params_encode_to(config: Config, user_texts: list[str], system: str) -> None:
    # Frames are encoded once and rows spliced from them: the upload must still send exactly the task's params.
    records = [
        {"task_id": f"t{i}", "task_type": "summarize", "input_data": {"document": text}, "system": system + '%s"{'}
        for i, text in enumerate(user_texts)
    ]
    records.append(
        {"task_id": "raw", "task_type": "summarize", "params": {"messages": [{"role": "user", "content": "r"}]}}
    )
    plan = make_plan(records_of(records), config, NOW)
    encoder = RowEncoder()
    for planned in plan.tasks:
        expected = orjson.dumps({"custom_id": planned.task_id, "params": planned.params})
        assert encoder.row(planned) == expected
        assert encoder.size(planned) == len(expected) == row_bytes(planned) - 1


def test_a_shared_system_prompt_is_one_string_for_every_task(config: Config) -> None:
    records = [{"task_id": f"t{i}", "task_type": "analyze_logs", "input_data": {"service": "s", "logs": str(i)}}
               for i in range(3)]  # fmt: skip
    plan = make_plan(records_of(records), config, NOW)
    systems = {id(planned.params["system"][0]["text"]) for planned in plan.tasks}
    assert len(systems) == 1
    assert len({id(planned.frame) for planned in plan.tasks}) == 1


def test_a_tasks_metadata_json_holds_its_bytes_not_an_encoder_buffer(config: Config) -> None:
    # orjson returns its bytes inside its ~4 KB write buffer (sys.getsizeof does not show it): kept in each planned
    # task, that was ~4 KB a task, most of a run's peak memory (598 MiB instead of 212 at 100k tasks). Enough tasks
    # that the few KB other tests leave in planning's caches are small beside the bytes counted (CI saw 12 KB).
    TASKS = 2000
    records = [{"task_id": f"t{i}", "task_type": "summarize", "input_data": {"document": "d"},
                "metadata": {"source": "nightly", "seq": i}} for i in range(TASKS)]  # fmt: skip
    make_plan(records_of(records), config, NOW)  # the caches planning fills once are filled before counting
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        plan = make_plan(records_of(records), config, NOW)
        kept = [planned.metadata_json for planned in plan.tasks]
        del plan
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - baseline  # what the metadata of the tasks holds, and `kept`
    finally:
        tracemalloc.stop()
    assert [orjson.loads(raw or b"null")["seq"] for raw in kept] == list(range(TASKS))
    exact = sum(sys.getsizeof(raw) for raw in kept) + sys.getsizeof(kept)
    assert held < 2 * exact, f"{held} bytes held for {exact} bytes of metadata JSON"


_RECORD = st.fixed_dictionaries(
    {"task_type": st.sampled_from(["summarize", "long", "templated", "extract_invoice", "chat"])},
    optional={
        "model_tier": st.sampled_from(["cheap", "capable", "premium"]),
        "model": st.sampled_from(["claude-haiku-5-5", "claude-sonnet-4-6"]),
        "max_tokens": st.sampled_from([16, 512, 200_000]),
        "mode": st.sampled_from(["auto", "batch", "realtime"]),
        "system": st.sampled_from(["", "Be brief.", LONG]),
        "max_latency_s": st.sampled_from([5.0, 10**9]),
    },
)


# A long constant system prompt (its breakpoint's TTL depends on the route) and one with a placeholder.
_SHARED_CONFIG = parse_config(
    default_config_text()
    + f'\n[task_types.long]\nmode = "batch"\ntier = "cheap"\nsystem = "{LONG}"\nuser = "{{document}}"\n'
    + '\n[task_types.templated]\nmode = "realtime"\nsystem = "About {service}."\nuser = "{logs}"\n',
    "test.toml",
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_RECORD, min_size=1, max_size=12), st.sampled_from([None, "batch", "realtime"]))
@example([{"task_type": "long"}, {"task_type": "long", "mode": "realtime"}], None)
@example([{"task_type": "summarize"}, {"task_type": "summarize", "model_tier": "premium"}], None)
@example([{"task_type": "summarize"}, {"task_type": "summarize", "max_tokens": 16}], None)
@example([{"task_type": "summarize"}, {"task_type": "summarize", "system": "Be brief."}], None)
@example([{"task_type": "templated"}, {"task_type": "templated"}], None)
def test_tasks_that_share_a_frame_are_planned_as_each_would_be_alone(
    shapes: list[dict[str, object]], route: Route | None
) -> None:
    # A frame built for one task is reused for the next with the same key: every task must still get exactly the
    # params, model and estimate it gets planned on its own.
    config = _SHARED_CONFIG
    records = [
        {
            "task_id": f"t{i}",
            "input_data": {"document": "d", "service": f"s{i}", "logs": "x", "text": "I", "message": "m"},
        }
        | shape
        for i, shape in enumerate(shapes)
    ]
    together = make_plan(records_of(records), config, NOW, route=route)
    alone = [make_plan(records_of([record]), config, NOW, route=route) for record in records]
    assert [r.index for r in together.rejections] == [i for i, plan in enumerate(alone) if plan.rejections]
    planned = {task.index: task for task in together.tasks}
    for index, plan in enumerate(alone):
        if plan.rejections:
            continue
        (single,) = plan.tasks
        task = planned[index]
        assert (task.params, task.model, task.route, task.estimated_input_tokens, task.cache_key) == (
            single.params,
            single.model,
            single.route,
            single.estimated_input_tokens,
            single.cache_key,
        )
        assert task.output is None if single.output is None else task.output is not None


def test_a_request_digest_frames_each_part_after_its_length(config: Config) -> None:
    # Run keys must stay what earlier versions computed (a re-run re-attaches to its batches by them): each task's
    # digest is blake2b-128 over its id, route, streaming flag, frame digest and user text, each after its length.
    records = [
        {"task_id": "a", "task_type": "summarize", "input_data": {"document": "ü"}},
        {"task_id": "b", "task_type": "summarize", "input_data": {"document": ""}, "mode": "realtime"},
        {"task_id": "c", "task_type": "chat", "params": {"messages": [{"role": "user", "content": "raw"}]}},
    ]
    plan = make_plan(records_of(records), config, NOW)
    plan = replace(plan, tasks=(*plan.tasks, replace(plan.tasks[0], index=9, task_id="s", stream=True)))

    def framed(*parts: bytes) -> bytes:
        whole = b"".join(len(part).to_bytes(8, "little") + part for part in parts)
        return hashlib.blake2b(whole, digest_size=16).digest()

    expected = {
        task.index: framed(
            task.task_id.encode(),
            task.route.encode(),
            b"stream" if task.stream else b"",
            framed(orjson.dumps(task.frame, option=orjson.OPT_SORT_KEYS)),
            b"\x00" if task.user_text is None else task.user_text.encode(),
        )
        for task in plan.tasks
    }
    assert request_digests(plan) == expected
