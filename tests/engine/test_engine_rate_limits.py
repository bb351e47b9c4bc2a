"""The realtime lane against a rate-limited emulator: it converges on the server's RPM without a 429 storm."""

from __future__ import annotations

import time
from pathlib import Path

from batch_engine.emulator import RunningEmulator
from batch_engine.runner import RunOptions
from tests.support.engine import TimedProgress, messages_calls, run_engine, write_jsonl

RPM = 600
TASKS = 1000
# Completions counted as the initial burst: the server's full bucket plus what it refills while that burst
# is being answered (a few seconds at 10 requests/s); the rate after that is the sustained rate.
BURST = RPM + 50


def test_realtime_run_sustains_the_server_rpm_with_few_429s(emulator: RunningEmulator, tmp_path: Path) -> None:
    # The config seeds the buckets at 1,000 RPM: the lane must learn the real 600 from the response headers.
    emulator.configure(rpm=RPM)
    tasks = [
        {"task_id": f"r{i}", "task_type": "user_query", "input_data": {"question": f"q {i}?"}} for i in range(TASKS)
    ]
    progress = TimedProgress()
    started = time.monotonic()

    output = run_engine(
        emulator,
        write_jsonl(tmp_path / "tasks.jsonl", tasks),
        tmp_path,
        options=RunOptions(state_dir=tmp_path / "state", mode="realtime"),
        policy=None,  # the run's own policy: real waits, as in production
        progress=progress,
    )

    assert output.run["counts"]["succeeded"] == TASKS
    calls = messages_calls(emulator.stats())
    sent = sum(calls.values())
    rate_limited_pct = 100 * calls.get("429", 0) / sent
    finished = sorted(progress.finished_at)
    sustained_rpm = (TASKS - BURST) / (finished[-1] - finished[BURST - 1]) * 60
    sustained_pct = 100 * sustained_rpm / RPM
    # What the server would have admitted over the whole run (full bucket + refill) against what we sent.
    elapsed = finished[-1] - started
    utilisation_pct = 100 * TASKS / (RPM + RPM * elapsed / 60)
    print(
        f"\nrate limits: {sent} requests, {calls.get('429', 0)} got 429 ({rate_limited_pct:.2f}%); "
        f"sustained after the burst {sustained_rpm:.0f}/min = {sustained_pct:.1f}% of RPM {RPM}; "
        f"whole run {elapsed:.1f}s = {utilisation_pct:.1f}% of what the server could admit"
    )
    assert rate_limited_pct < 2
    assert sustained_pct >= 90
