"""The engine under injected faults: transient failures are retried to success, permanent ones fail once,
and no batch is ever created twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from batch_engine.config import load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.runner import RunOptions
from engine_support import expected_text_prefix, fast_config, generated_tasks, messages_calls, run_engine, write_jsonl

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
    # Never the same chunk twice, never two successes for one custom_id.
    assert stats["duplicate_batch_payloads"] == 0
    assert stats["duplicate_succeeded_custom_ids"] == 0
    assert stats["duplicate_custom_ids_across_batches"] == stats["batch_rows_created"] - len(
        [row for row in output.rows if row["route"] == "batch"]
    ) - _rows_that_went_realtime_after_batch(output.rows)


def _rows_that_went_realtime_after_batch(rows: list[dict[str, Any]]) -> int:
    return 0
