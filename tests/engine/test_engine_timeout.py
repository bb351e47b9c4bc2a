"""A batch that never ends: cancelled at the batch timeout, its rows routed per `on_batch_timeout`."""

from __future__ import annotations

from pathlib import Path

from batch_engine.emulator import RunningEmulator
from batch_engine.runner import RunOptions
from tests.support.engine import (
    Output,
    expected_text_prefix,
    fast_config,
    generated_tasks,
    messages_calls,
    run_engine,
    write_jsonl,
)

BATCH_TIMEOUT_S = 1.0
CANCEL = "POST /v1/messages/batches/{id}/cancel"


def _run_never_ending_batch(emulator: RunningEmulator, tmp_path: Path, on_batch_timeout: str) -> Output:
    emulator.configure(batch_never_ends=True)
    tasks = generated_tasks(12, realtime_every=None)
    return run_engine(
        emulator,
        write_jsonl(tmp_path / "tasks.jsonl", tasks),
        tmp_path,
        config=fast_config(on_batch_timeout=on_batch_timeout),
        options=RunOptions(state_dir=tmp_path / "state", batch_timeout_s=BATCH_TIMEOUT_S),
    )


def test_a_batch_past_the_timeout_is_cancelled_and_its_rows_go_realtime(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    output = _run_never_ending_batch(emulator, tmp_path, "realtime")

    tasks = generated_tasks(12, realtime_every=None)
    for task, row in zip(tasks, output.rows, strict=True):
        assert (row["status"], row["route"], row["attempts"]) == ("succeeded", "realtime", 2)
        assert row["text"].startswith(expected_text_prefix(task, row, fast_config()))
    stats = emulator.stats()
    assert stats["calls"][CANCEL] == {"200": 1}
    assert stats["batches"] == {"in_progress": 0, "canceling": 0, "ended": 1}
    assert stats["batch_rows"]["canceled"] == 12 and stats["batch_rows"]["succeeded"] == 0
    assert messages_calls(stats) == {"200": 12}
    [batch] = output.run["batches"]
    assert batch["request_counts"]["canceled"] == 12
    assert output.summary.all_succeeded


def test_under_the_timed_out_policy_cancelled_rows_are_reported_timed_out(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    output = _run_never_ending_batch(emulator, tmp_path, "timed_out")

    batch_id = output.run["batches"][0]["id"]
    for row in output.rows:
        assert (row["status"], row["route"], row["attempts"], row["batch_id"]) == ("timed_out", "batch", 1, batch_id)
        assert row["error"]["type"] == "timed_out" and row["cost_usd"] == 0
    stats = emulator.stats()
    assert stats["calls"][CANCEL] == {"200": 1}
    assert stats["batch_rows"]["canceled"] == 12
    assert messages_calls(stats) == {}
    assert output.run["counts"]["by_status"] == {"timed_out": 12}
