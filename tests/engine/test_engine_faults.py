"""The engine under injected faults: transient failures are retried to success, permanent ones fail once,
and no batch is ever created twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from batch_engine.emulator import RunningEmulator
from batch_engine.state.ledger import ChunkRecord, Ledger
from tests.support.engine import (
    expected_text_prefix,
    fast_config,
    generated_tasks,
    messages_calls,
    run_engine,
    write_jsonl,
)

FAULT_TASKS = 2000


def test_a_large_run_under_faults_accounts_for_every_task_and_never_duplicates_a_batch(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    emulator.configure(
        fault_rate_429=0.04,
        fault_rate_529=0.04,
        fault_rate_500=0.04,
        fault_rate_drop=0.04,
        fault_retry_after_s=0.01,
        # Every endpoint: dropped batch creates (did it land?), failing polls and results streams too.
        fault_endpoints=("*",),
        batch_row_error_rate=0.08,
        batch_row_expire_rate=0.07,
    )
    tasks = generated_tasks(FAULT_TASKS)
    # Several chunks, and enough row attempts that a retryable row failing every time is vanishingly rare.
    config = fast_config(max_requests_per_batch=400, max_row_attempts=8)

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path, config=config)

    stats = emulator.stats()
    assert [row["task_id"] for row in output.rows] == [task["task_id"] for task in tasks]
    statuses = Counter(row["status"] for row in output.rows)
    assert statuses == {"succeeded": FAULT_TASKS}, statuses
    for task, row in zip(tasks, output.rows, strict=True):
        assert row["text"].startswith(expected_text_prefix(task, row, config))
    routes = Counter(row["route"] for row in output.rows)
    assert routes["batch"] > 1000 and routes["realtime"] > 600
    # The faults really happened, and each retried row counted its attempts.
    injected = stats["faults_injected"]
    assert all(injected.get(kind, 0) > 10 for kind in ("429", "529", "500", "drop")), injected
    assert stats["batch_rows"]["errored"] > 50 and stats["batch_rows"]["expired"] > 50
    assert any(row["attempts"] > 1 for row in output.rows if row["route"] == "batch")
    assert any(row["attempts"] > 1 for row in output.rows if row["route"] == "realtime")
    # Never the same chunk twice, never two successes for one custom_id: every batch the emulator created is
    # one the ledger recorded for its own chunk (a create whose answer was lost was adopted, not repeated).
    with Ledger.open(tmp_path / "state") as ledger:
        chunks = [chunk for chunk in ledger.chunks(output.run["run_key"]) if chunk.batch_id is not None]
    assert stats["batches_created"] == len(chunks) == len({chunk.batch_id for chunk in chunks})
    assert stats["duplicate_batch_payloads"] == _whole_chunk_resubmissions(chunks)
    assert stats["duplicate_succeeded_custom_ids"] == 0


def _whole_chunk_resubmissions(chunks: list[ChunkRecord]) -> int:
    """Resubmissions that carry exactly their parent's rows (every row of it failed again): the emulator sees
    the same payload twice, legitimately. Usually none."""
    rows = {chunk.chunk_key: set(chunk.task_indexes) for chunk in chunks}
    count = 0
    for key, indexes in rows.items():
        base, _, round_ = key.partition("~")
        if round_:
            parent = base if round_ == "1" else f"{base}~{int(round_) - 1}"
            count += rows.get(parent) == indexes
    return count


def test_a_connection_dropped_mid_stream_is_retried_like_any_other(emulator: RunningEmulator, tmp_path: Path) -> None:
    # Streamed bodies fail while being read, after the SDK has returned: the batch results JSONL, and the SSE
    # events of a realtime request whose max_tokens needs streaming.
    emulator.script_fault("batches_results", "drop")
    emulator.script_fault("messages", "drop")
    tasks = [
        {"task_id": "long", "task_type": "user_query", "max_tokens": 30_000, "input_data": {"question": "long?"}},
        *generated_tasks(20, realtime_every=None, prefix="b"),
    ]

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    assert [row["status"] for row in output.rows] == ["succeeded"] * len(tasks)
    assert output.rows[0]["route"] == "realtime" and output.rows[0]["attempts"] == 2
    for task, row in zip(tasks, output.rows, strict=True):
        assert row["text"].startswith(expected_text_prefix(task, row, fast_config()))
    stats = emulator.stats()
    assert stats["faults_injected"] == {"drop": 2}
    assert stats["calls"]["GET /v1/messages/batches/{id}/results"] == {"dropped": 1, "200": 1}
    assert stats["batches_created"] == 1


def _raw(task_id: str, mode: str, **params: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"{task_id} please"}]
    return {"task_id": task_id, "task_type": "chat", "mode": mode, "params": {"messages": messages, **params}}


def test_invalid_requests_end_errored_after_exactly_one_attempt_in_both_lanes(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # Claude 5 models refuse manual thinking budgets: a 400 invalid_request_error, realtime or as a batch row.
    # Claude 4.6 takes them. (The engine does not second-guess raw params the API may still accept.)
    manual = {"max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 2000}}
    tasks = [
        _raw("bad-rt", "realtime", **manual),
        _raw("good-rt", "realtime", **manual) | {"model": "claude-sonnet-4-6"},
        _raw("bad-batch", "batch", **manual),
        _raw("good-batch", "batch"),
    ]

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    rows = {row["task_id"]: row for row in output.rows}
    for task_id, route in (("bad-rt", "realtime"), ("bad-batch", "batch")):
        row = rows[task_id]
        assert (row["status"], row["route"], row["attempts"]) == ("errored", route, 1)
        assert row["error"]["type"] == "invalid_request_error" and "thinking.type.enabled" in row["error"]["message"]
        assert row["text"] is None and row["cost_usd"] == 0
    assert rows["good-rt"]["status"] == rows["good-batch"]["status"] == "succeeded"
    stats = emulator.stats()
    assert messages_calls(stats) == {"400": 1, "200": 1}
    assert stats["batches_created"] == 1
    assert output.run["counts"]["failed"] == 2 and not output.summary.all_succeeded


def test_batch_rows_errored_as_invalid_requests_are_not_resubmitted(emulator: RunningEmulator, tmp_path: Path) -> None:
    emulator.configure(batch_row_error_rate=0.3, batch_row_error_type="invalid_request_error")
    tasks = generated_tasks(100, realtime_every=None)

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    errored = [row for row in output.rows if row["status"] == "errored"]
    stats = emulator.stats()
    assert len(errored) == stats["batch_rows"]["errored"] > 10
    assert all(row["attempts"] == 1 and row["error"]["type"] == "invalid_request_error" for row in errored)
    assert all(row["status"] == "succeeded" for row in output.rows if row not in errored)
    assert stats["batches_created"] == 1 and stats["batch_rows_created"] == 100
    assert messages_calls(stats) == {}  # and none went realtime either


def test_an_error_event_after_the_200_of_a_stream_is_retried_like_its_status(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # `overloaded_error` as an SSE event after the 200 is the API's 529: transient, retried, not a failed task.
    emulator.script_fault("messages", "error_event")
    tasks = [{"task_id": "long", "task_type": "user_query", "max_tokens": 30_000, "input_data": {"question": "l?"}}]

    output = run_engine(emulator, write_jsonl(tmp_path / "tasks.jsonl", tasks), tmp_path)

    (row,) = output.rows
    assert (row["status"], row["route"], row["attempts"]) == ("succeeded", "realtime", 2), row
    assert emulator.stats()["faults_injected"] == {"error_event": 1}
