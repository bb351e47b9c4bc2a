"""A large JSONL file planned on two processes gives the plan one process gives: the same tasks, rejections
(numbered by record and line), warnings, chunks and run key; and whenever the halves cannot be joined as one, the
whole file is planned in one process."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from batch_engine import parallel_plan
from batch_engine.config import Config, load_config
from batch_engine.files import iter_jsonl_part, iter_records, split_jsonl
from batch_engine.parallel_plan import plan_file
from batch_engine.planning import Plan, make_plan
from batch_engine.planning.identity import run_identity

NOW = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config()


def _record(i: int, **fields: Any) -> bytes:
    record: dict[str, Any] = {"task_id": f"t{i}", "task_type": "summarize", "input_data": {"document": f"doc {i}"}}
    if i % 7 == 3:
        record |= {"task_type": "chat", "input_data": {"message": f"question {i}"}}  # realtime
    if i % 11 == 5:
        record["max_tokens"] = 10**7  # capped at the model's output limit: a warning counted over both halves
    if i % 13 == 6:
        record["metadata"] = {"seq": i}
    record.update(fields)
    return orjson.dumps(record)


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _messy(path: Path, count: int = 400, *, last: bytes | None = None) -> Path:
    """`count` records with what a hand-made file has: a BOM, blank and whitespace lines, lines that are not
    JSON, records the validator refuses, a task_id repeated inside one half."""
    lines: list[bytes] = []
    for i in range(count):
        if i % 37 == 36:
            lines.append(b"")
        if i % 53 == 1:
            lines.append(b"  \t\r")
        if i % 41 == 2:
            lines.append(b'{"task_id": "broken",')
            continue
        if i % 43 == 4:
            lines.append(_record(i, task_type="no_such_type"))
            continue
        lines.append(_record(i))
        if i % 97 == 9:
            lines.append(_record(i))  # the same task_id again, right after: rejected where it comes second
    if last is not None:
        lines.append(last)
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a record: a file whose first line does not parse is not split
    return _write(path, lines)


def _same(parallel: Plan, serial: Plan) -> None:
    assert parallel.tasks == serial.tasks
    assert parallel.rejections == serial.rejections
    assert parallel.warnings == serial.warnings
    assert parallel.chunks == serial.chunks
    assert parallel.total_records == serial.total_records
    assert run_identity("input", parallel) == run_identity("input", serial)


def _no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> Plan:
        raise AssertionError("planned in one process: the two halves were not joined")

    monkeypatch.setattr(parallel_plan, "make_plan", refuse)


def test_split_parts_give_the_records_iter_records_gives(tmp_path: Path) -> None:
    path = _messy(tmp_path / "tasks.jsonl")
    split = split_jsonl(path, min_bytes=0)
    assert split is not None
    whole = [(r.index, r.line, r.value, r.error) for r in iter_records(path)]
    parts = [(r.index, r.line, r.value, r.error) for r in iter_jsonl_part(path, split, second=False)]
    parts += [(r.index, r.line, r.value, r.error) for r in iter_jsonl_part(path, split, second=True)]
    assert parts == whole
    # The second part starts on a line of its own, about half way.
    data = path.read_bytes()
    assert data[split.offset - 1 : split.offset] == b"\n"
    assert abs(split.offset - len(data) / 2) < 200


def test_two_processes_plan_what_one_plans(
    tmp_path: Path, config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _messy(tmp_path / "tasks.jsonl")
    serial = make_plan(iter_records(path), config, NOW)
    assert serial.rejections and serial.warnings and {t.route for t in serial.tasks} == {"batch", "realtime"}
    batch_work: list[int] = []
    _no_fallback(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="batch_engine"):
        parallel = plan_file(path, config, NOW, on_batch_work=lambda: batch_work.append(1), min_bytes=0)
    _same(parallel, serial)
    assert batch_work == [1]
    assert not caplog.records
    # Tasks that render alike share one frame object, the second half's too (its frames came once each).
    assert len({id(task.frame) for task in parallel.tasks}) <= 2 * len({id(task.frame) for task in serial.tasks})


def test_a_task_id_in_both_halves_is_rejected_where_one_process_rejects_it(tmp_path: Path, config: Config) -> None:
    path = _messy(tmp_path / "tasks.jsonl", last=_record(10))  # t10 again, as the file's last record
    serial = make_plan(iter_records(path), config, NOW)
    assert serial.rejections[-1].task_id == "t10" and serial.rejections[-1].field == "task_id"
    _same(plan_file(path, config, NOW, min_bytes=0), serial)


def test_a_failed_worker_leaves_the_plan_to_this_process(
    tmp_path: Path, config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _messy(tmp_path / "tasks.jsonl")
    monkeypatch.setattr(parallel_plan, "WORKER", "batch_engine.no_such_module")
    with caplog.at_level(logging.WARNING, logger="batch_engine"):
        plan = plan_file(path, config, NOW, min_bytes=0)
    _same(plan, make_plan(iter_records(path), config, NOW))
    (warning,) = caplog.records
    assert "planning the whole file here" in warning.getMessage()
    assert "No module named" in warning.getMessage()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"[" + b",".join(_record(i) for i in range(50)) + b"]", id="json-array"),
        pytest.param(orjson.dumps(orjson.loads(_record(0)), option=orjson.OPT_INDENT_2), id="pretty-printed-object"),
    ],
)
def test_files_that_are_not_jsonl_are_planned_in_one_process(
    tmp_path: Path, config: Config, content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tasks.json"
    path.write_bytes(content)
    assert split_jsonl(path, min_bytes=0) is None
    monkeypatch.setattr(parallel_plan, "_Worker", None)  # never started
    _same(plan_file(path, config, NOW, min_bytes=0), make_plan(iter_records(path), config, NOW))


def test_small_files_are_planned_in_one_process(tmp_path: Path, config: Config) -> None:
    path = _messy(tmp_path / "tasks.jsonl", count=20)
    assert split_jsonl(path, min_bytes=path.stat().st_size + 1) is None
    assert split_jsonl(path, min_bytes=path.stat().st_size) is not None
    blank_first = tmp_path / "blank_first.jsonl"
    blank_first.write_bytes(b"\n" + path.read_bytes())
    assert split_jsonl(blank_first, min_bytes=0) is None
