"""`Run.leftovers()` runs when every task of a run has finished (a million at a nightly job's scale): it walks the
finished indexes as a stream beside the plan, and holds no set of them (~60 MiB at a million, at the run's peak)."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

from batch_engine.config import load_config
from batch_engine.models import ErrorInfo
from batch_engine.planning.outcome import failed
from batch_engine.runner import Run, RunOptions
from tests.support.engine import generated_tasks, write_jsonl

TASKS = 100_000


def test_leftovers_streams_the_finished_indexes(tmp_path: Path) -> None:
    input_path = write_jsonl(tmp_path / "tasks.jsonl", generated_tasks(TASKS, realtime_every=None))
    run = Run.prepare(input_path, tmp_path / "out.json", load_config(), RunOptions(state_dir=tmp_path / "state"))
    try:
        error = ErrorInfo(type="api_error", message="m")
        unfinished = {7, 50_001, TASKS - 1}
        rows = [failed(t, "errored", "batch", 1, error) for t in run.plan.tasks if t.index not in unfinished]
        run.ledger.save_results(run.key, rows, time.time())
        del rows
        import anthropic  # noqa: F401  # planning started loading the SDK in a thread: done before measuring

        tracemalloc.start()
        try:
            leftovers = run.leftovers()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        run.close()
    assert [task.index for task in leftovers] == sorted(unfinished)
    # A set of 100k indexes is ~7 MB (its table and the ints); the stream holds a few rows at a time.
    assert peak < 1 << 20, peak
