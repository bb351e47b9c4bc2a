"""The loader: JSON arrays and JSONL, per-record rejections, one clean error for hopeless files."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_engine.config import load_config
from batch_engine.errors import InputError
from batch_engine.files import count_records, iter_records
from batch_engine.planning import make_plan

CONFIG = load_config()
NOW = datetime(2026, 11, 22, tzinfo=UTC)
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def plan_bytes(tmp_path: Path, data: bytes, name: str = "in.jsonl"):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_bytes(data)
    return make_plan(iter_records(path), CONFIG, NOW)


def test_json_array_and_jsonl_give_the_same_plan(tmp_path: Path) -> None:
    records = [{"task_id": f"t{i}", "task_type": "chat", "input_data": {"message": str(i)}} for i in range(5)]
    as_array = plan_bytes(tmp_path, orjson.dumps(records), "a.json")
    as_lines = plan_bytes(tmp_path, b"\n".join(orjson.dumps(r) for r in records), "b.jsonl")
    assert [t.params for t in as_array.tasks] == [t.params for t in as_lines.tasks]


def test_bad_records_are_rejected_and_the_rest_still_plans() -> None:
    plan = make_plan(iter_records(SAMPLES / "bad_tasks.jsonl"), CONFIG, NOW)
    assert [t.task_id for t in plan.tasks] == ["ok-1", "ok-2"]
    assert len(plan.rejections) == plan.total_records - 2
    fields = {r.field for r in plan.rejections}
    assert {"task_type", "task_id", "input_data.logs", "model_tier", "<record>"} <= fields
    assert all("\n" not in r.one_line() for r in plan.rejections)


def test_bom_and_blank_lines_are_tolerated(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + b'{"task_id":"a","task_type":"chat","input_data":{"message":"m"}}\n\n\n'
    assert [t.task_id for t in plan_bytes(tmp_path, data).tasks] == ["a"]


@pytest.mark.parametrize("data", [b"", b"   \n\n", b"hello world\n", b"[]", b'{"a": 1'])
def test_hopeless_files_are_one_clean_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InputError):
        plan_bytes(tmp_path, data)


def test_every_sample_task_is_planned_on_both_routes() -> None:
    plan = make_plan(iter_records(SAMPLES / "nightly_tasks.json"), load_config(SAMPLES / "config.toml"), NOW)
    assert plan.total_records == len(plan.tasks) >= 300
    assert {t.route for t in plan.tasks} == {"batch", "realtime"}
    assert sum(len(c.task_positions) for c in plan.chunks) == len(plan.batch_tasks())
    assert all(t.cache_key for t in plan.tasks)  # the sample prompts are long enough to cache


record = st.fixed_dictionaries(
    {},
    optional={
        "task_id": st.one_of(st.text(max_size=70), st.integers(-(2**63), 2**63 - 1), st.none()),
        "task_type": st.one_of(st.sampled_from(["chat", "summarize", "nope"]), st.integers(-5, 5)),
        "input_data": st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5)), st.text()),
        "mode": st.text(max_size=10),
        "deadline": st.text(max_size=30),
        "max_tokens": st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=3)),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=400),
        st.lists(record, max_size=8).map(lambda rs: b"\n".join(orjson.dumps(r) for r in rs)),
    )
)
def test_any_bytes_give_results_and_rejections_or_one_input_error(tmp_path: Path, data: bytes) -> None:
    try:
        plan = plan_bytes(tmp_path, data)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert len(plan.tasks) + len(plan.rejections) == plan.total_records
    indexes = [t.index for t in plan.tasks] + [r.index for r in plan.rejections]
    assert sorted(indexes) == list(range(plan.total_records))


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    from batch_engine.files import atomic_write_bytes

    target = tmp_path / "out" / "results.json"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    from batch_engine.files import atomic_write_bytes

    # Temp names carry the writer's host and pid (#14): only a dead writer's file of this target is swept.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace(".", "_")
    target = tmp_path / "results.json"
    (tmp_path / f".results.json.{host}.{int(gone.stdout)}.abc123.tmp").write_bytes(b"half a fil")
    other = f".other.json.{host}.{int(gone.stdout)}.abc123.tmp"
    (tmp_path / other).write_bytes(b"someone else's")
    atomic_write_bytes(target, b"whole")
    assert os.path.exists(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other, "results.json"]


_LINE = st.one_of(
    st.just(b""), st.just(b"  "), st.just(b"{}"), st.just(b'{"task_id": "a"}'), st.just(b"[1]"), st.binary(max_size=12)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.lists(_LINE, max_size=12).map(b"\n".join),
        st.lists(_LINE, max_size=12).map(lambda lines: b"\xef\xbb\xbf" + b"\r\n".join(lines)),
        st.binary(max_size=200),
    )
)
def test_the_record_count_is_the_number_of_records_read(tmp_path: Path, data: bytes) -> None:
    # The CLI counts records up front for its progress display without decoding them all.
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(data)
    try:
        expected = len(list(iter_records(path)))
    except InputError as exc:
        with pytest.raises(InputError, match=re.escape(str(exc))):
            count_records(path)
        return
    assert count_records(path) == expected


def test_lines_are_read_whole_across_read_blocks(tmp_path: Path) -> None:
    lines = [orjson.dumps({"task_id": f"t{i}", "pad": "x" * (i * 7919 % 300_000)}) for i in range(40)]
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert [r.value for r in iter_records(path)] == [orjson.loads(line) for line in lines]
    assert count_records(path) == 40


@pytest.mark.parametrize(("mode", "calls"), [(None, 1), ("realtime", 0), ("batch", 1)])
def test_the_batch_lanes_preparation_starts_once_at_the_first_batch_task(mode: str | None, calls: int) -> None:
    # `on_batch_work` (the runner starts importing the SDK there) is called once if any task goes to a batch.
    seen: list[int] = []
    plan = make_plan(
        iter_records(SAMPLES / "nightly_tasks.json"),
        load_config(SAMPLES / "config.toml"),
        NOW,
        route=mode,  # type: ignore[arg-type]
        on_batch_work=lambda: seen.append(1),
    )

    assert len(seen) == calls
    assert any(task.route == "batch" for task in plan.tasks) is (calls == 1)
