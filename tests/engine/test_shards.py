"""Sharding (pure split, budget split and merge) and the realtime lane's shared rate limit, without Prefect."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch_engine.emulator import RunningEmulator
from batch_engine.files import iter_record_lines, iter_records
from batch_engine.models import CostSummary, RunSummary, TaskResult, TokenTotals, Usage
from batch_engine.planning.run_summary import encode_output
from batch_engine.planning.shards import (
    ShardOutput,
    merged_rows,
    merged_summary,
    parse_output,
    shard_specs,
    split_budget,
    split_lines,
)
from batch_engine.runner import Run, RunOptions
from tests.support.engine import fast_config, generated_tasks, run_engine, write_jsonl


@given(total=st.integers(min_value=0, max_value=500), shards=st.integers(min_value=1, max_value=40))
def test_shards_are_contiguous_near_equal_and_cover_every_record_once(total: int, shards: int) -> None:
    specs = shard_specs(total, shards)
    assert len(specs) == min(total, shards)
    assert [spec.number for spec in specs] == list(range(len(specs)))
    covered = [i for spec in specs for i in range(spec.offset, spec.offset + spec.count)]
    assert covered == list(range(total))
    if specs:
        assert max(s.count for s in specs) - min(s.count for s in specs) <= 1
        assert min(s.count for s in specs) >= 1


MICRO = Decimal("0.000001")


@given(
    cap=st.floats(min_value=0, max_value=1e7, allow_nan=False),
    total=st.integers(min_value=0, max_value=500),
    shards=st.integers(min_value=1, max_value=40),
)
def test_budget_shares_follow_the_record_counts_and_never_add_up_to_more_than_the_cap(
    cap: float, total: int, shards: int
) -> None:
    specs = shard_specs(total, shards)
    shares = [Decimal(repr(share)) for share in split_budget(cap, specs)]
    limit = Decimal(repr(cap))  # the cap as the user wrote it
    assert len(shares) == len(specs)
    assert all(share >= 0 and share % MICRO == 0 for share in shares)
    assert sum(shares) <= limit
    if total:
        # Nothing is held back but the rounding to whole micro-dollars.
        assert limit - sum(shares) < MICRO
        for spec, share in zip(specs, shares, strict=True):
            assert abs(share - limit * spec.count / total) < MICRO


def test_a_cap_is_split_by_records_to_the_micro_dollar() -> None:
    assert split_budget(10.0, shard_specs(7, 3)) == [4.285714, 2.857143, 2.857143]
    assert split_budget(0.3, shard_specs(5, 2)) == [0.18, 0.12]
    assert split_budget(0.3, shard_specs(9, 1)) == [0.3]
    with pytest.raises(ValueError, match="finite amount"):
        split_budget(float("inf"), shard_specs(3, 2))


def test_split_of_a_json_array_and_of_the_same_jsonl_gives_identical_shard_bytes(tmp_path: Path) -> None:
    tasks = generated_tasks(7)
    array = tmp_path / "tasks.json"
    array.write_bytes(orjson.dumps(tasks, option=orjson.OPT_INDENT_2))
    jsonl = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    from_array = split_lines(list(iter_record_lines(array)), 3)
    assert from_array == split_lines(list(iter_record_lines(jsonl)), 3)
    assert [spec.count for spec, _ in from_array] == [3, 2, 2]
    # Each shard is a task file whose records are the input's, in order.
    rebuilt = []
    for index, (_, content) in enumerate(from_array):
        shard = tmp_path / f"shard-{index}.jsonl"
        shard.write_bytes(content)
        rebuilt += [record.value for record in iter_records(shard)]
    assert rebuilt == tasks


def test_unparsable_and_blank_jsonl_lines_keep_the_indexes_the_whole_file_has(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b'{"task_id": "a"}\n\n{not json\n{"task_id": "b"}\n')
    lines = list(iter_record_lines(path))
    assert lines == [b'{"task_id": "a"}', b"{not json", b'{"task_id": "b"}']
    assert [record.index for record in iter_records(path)] == [0, 1, 2]


def _summary(key: str, results: list[TaskResult], cost: float, started: int, finished: int) -> RunSummary:
    return RunSummary(
        run_key=key,
        input_path=f"{key}.jsonl",
        output_path=f"{key}.json",
        started_at=datetime.fromtimestamp(started, UTC),
        finished_at=datetime.fromtimestamp(finished, UTC),
        counts={
            "total": len(results),
            "succeeded": len(results),
            "failed": 0,
            "rejected": 0,
            "by_route": {"realtime": len(results)},
            "by_status": {"succeeded": len(results)},
        },
        batches=[],
        tokens=TokenTotals(input=10 * len(results), output=5 * len(results), cache_read=len(results)),
        cost=CostSummary(total_usd=cost, baseline_usd=2 * cost, savings_usd=cost, savings_pct=50.0),
        cache_hit_rate=0.0,
        durations_s={"realtime": float(finished - started), "total": float(finished - started)},
    )


def _rows(prefix: str, count: int) -> list[TaskResult]:
    return [
        TaskResult(task_id=f"{prefix}{i}", index=i, status="succeeded", route="realtime", usage=Usage(input_tokens=10))
        for i in range(count)
    ]


def test_merge_rebases_indexes_in_input_order_and_adds_up_the_summaries() -> None:
    (first, second) = shard_specs(5, 2)
    outputs = [
        # Given out of order: the merge orders by offset, not by arrival.
        ShardOutput(second, "s1.jsonl", _summary("k1", _rows("b", 2), 0.5, 110, 140), _rows("b", 2)),
        ShardOutput(first, "s0.jsonl", _summary("k0", _rows("a", 3), 1.0, 100, 130), _rows("a", 3)),
    ]
    rows = list(merged_rows(outputs))
    assert [(row.task_id, row.index) for row in rows] == [("a0", 0), ("a1", 1), ("a2", 2), ("b0", 3), ("b1", 4)]
    summary = merged_summary(outputs, input_path="in.jsonl", output_path="out.json")
    assert summary.counts.total == summary.counts.succeeded == 5
    assert summary.counts.by_route == {"realtime": 5}
    assert summary.tokens.input == 50 and summary.tokens.cache_read == 5
    assert summary.cost.total_usd == 1.5 and summary.cost.baseline_usd == 3.0 and summary.cost.savings_pct == 50.0
    assert summary.durations_s["total"] == 40.0
    assert [(s.number, s.offset, s.records, s.run_key) for s in summary.shards] == [(0, 0, 3, "k0"), (1, 3, 2, "k1")]


def test_merge_refuses_a_shard_output_missing_rows() -> None:
    (spec,) = shard_specs(3, 1)
    output = ShardOutput(spec, "s0.jsonl", _summary("k0", _rows("a", 2), 1.0, 0, 1), _rows("a", 2))
    with pytest.raises(Exception, match="2 rows for 3 records"):
        list(merged_rows([output]))


@pytest.mark.parametrize("output_format", ["json", "jsonl"])
def test_merged_output_of_real_shard_runs_reads_like_one_run(
    emulator: RunningEmulator, tmp_path: Path, output_format: str
) -> None:
    tasks = generated_tasks(12)
    source = write_jsonl(tmp_path / "tasks.jsonl", tasks)
    outputs = []
    for spec, content in split_lines(list(iter_record_lines(source)), 3):
        shard = tmp_path / f"shard-{spec.number}.jsonl"
        shard.write_bytes(content)
        done = run_engine(emulator, shard, tmp_path, output_name=f"shard-{spec.number}.json")
        summary, rows = parse_output(done.path.read_bytes())
        outputs.append(ShardOutput(spec, str(shard), summary, rows))
    summary = merged_summary(outputs, input_path=str(source), output_path="merged")
    data = b"".join(encode_output(summary, merged_rows(outputs), output_format))  # type: ignore[arg-type]
    merged_summary_again, rows = parse_output(data)
    assert [row.task_id for row in rows] == [task["task_id"] for task in tasks]
    assert [row.index for row in rows] == list(range(12))
    assert merged_summary_again.counts.succeeded == 12
    assert len({shard.run_key for shard in summary.shards}) == 3


def test_the_same_shard_bytes_give_the_same_run_key_so_a_rerun_reattaches(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(9))
    keys = []
    for attempt in range(2):
        for spec, content in split_lines(list(iter_record_lines(source)), 3):
            shard = tmp_path / f"a{attempt}-shard-{spec.number}.jsonl"
            shard.write_bytes(content)
            run = Run.prepare(shard, tmp_path / "out.json", fast_config(), RunOptions(state_dir=tmp_path / "state"))
            keys.append(run.key)
            run.close()
    assert keys[:3] == keys[3:]
    assert len(set(keys[:3])) == 3
