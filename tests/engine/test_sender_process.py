"""The realtime lane's requests through a sender process (`[limits] realtime_sender = "process"`): the same rows as
inline, the same answers to faults, no task lost when the process dies, and no process left behind."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from batch_engine.client import ApiSettings, Connection, RetryPolicy
from batch_engine.config import Config, TaskType, load_config
from batch_engine.emulator import RunningEmulator
from batch_engine.errors import ApiError
from batch_engine.lanes.sender import AUTO_PROCESS_REQUESTS, Sender, SenderMode
from batch_engine.runner import RunOptions
from batch_engine.sender_process import MODULE
from tests.support.engine import NO_WAIT_POLICY, fast_config, messages_calls, run_engine, write_jsonl

# Fields that differ between two runs of the same work whatever sends it: ids and times.
_RUN_FIELDS = ("run_key", "input_path", "output_path", "started_at", "finished_at", "durations_s", "batches")


def _config(sender: str, **limits: Any) -> Config:
    base = load_config()
    capable = {"tier": "capable", "system": "You answer briefly.", "user": "{question}", "mode": "realtime"}
    types = {
        **base.task_types,
        "streamed": TaskType(max_tokens=512, stream=True, **capable),
        # Over 21,333 max_tokens the SDK refuses a non-streamed call: such a task is streamed either way.
        "long_answer": TaskType(max_tokens=30_000, **capable),
    }
    return fast_config(base.model_copy(update={"task_types": types}), realtime_sender=sender, **limits)


def _tasks(count: int) -> list[dict[str, Any]]:
    kinds = ("user_query", "streamed", "long_answer", "classify_bulk")
    tasks = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        field = "text" if kind == "classify_bulk" else "question"
        tasks.append({"task_id": f"t{i}", "task_type": kind, "input_data": {field: f"item {i}?"}})
    # A structured output, sent realtime.
    tasks.append({"task_id": "inv", "task_type": "extract_invoice", "mode": "realtime", "input_data": {"text": "n"}})
    return tasks


def _sender_processes() -> list[int]:
    """This process's children that are sender processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == os.getpid() and MODULE.encode() in command:
            found.append(int(entry.name))
    return found


def _comparable(output: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = {key: value for key, value in output.run.items() if key not in _RUN_FIELDS}
    rows = [{key: value for key, value in row.items() if key != "batch_id"} for row in output.rows]
    return run, rows


def test_auto_uses_a_sender_process_only_for_a_big_lane_on_two_cpus() -> None:
    api = ApiSettings(SecretStr("sk-test"), "http://127.0.0.1:9")
    log = logging.getLogger("batch_engine")

    def pays(mode: SenderMode, requests: int, cpus: int) -> bool:
        return Sender(Connection(api), mode, log, cpus=cpus).pays(requests)

    assert pays("auto", AUTO_PROCESS_REQUESTS, cpus=2) and not pays("auto", AUTO_PROCESS_REQUESTS - 1, cpus=2)
    assert not pays("auto", 10 * AUTO_PROCESS_REQUESTS, cpus=1)
    assert pays("process", 1, cpus=1) and not pays("inline", 10 * AUTO_PROCESS_REQUESTS, cpus=2)
    # The samples (63 realtime tasks) and the startup benchmark (1,000) stay inline.
    assert AUTO_PROCESS_REQUESTS > 1000


def test_a_run_through_the_sender_process_writes_what_an_inline_run_writes(
    emulator: RunningEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tasks = write_jsonl(tmp_path / "tasks.jsonl", _tasks(40))
    outputs = {}
    for sender in ("inline", "process"):
        emulator.reset()  # the same cache and counters for both runs
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="batch_engine"):
            # One request at a time: the cache is written and read in the same order in both runs.
            outputs[sender] = run_engine(
                emulator, tasks, tmp_path / sender, config=_config(sender, realtime_concurrency=1)
            )
        assert _sender_processes() == []
        sent = [record.getMessage() for record in caplog.records if "requests sent" in record.getMessage()]
        # Every realtime request really went through the process when it was asked for, none otherwise.
        assert [line.split(",")[0] for line in sent] == (
            ["realtime sender process: 31 requests sent"] if sender == "process" else []
        )

    inline, process = (_comparable(outputs[sender]) for sender in ("inline", "process"))
    assert process == inline
    rows = outputs["process"].rows
    assert Counter(row["status"] for row in rows) == {"succeeded": 41}
    assert Counter(row["route"] for row in rows) == {"realtime": 31, "batch": 10}
    assert next(row for row in rows if row["task_id"] == "inv")["parsed"] is not None


class _Retries:
    """The retry policy's hook: each failed attempt's status, class, retry-after and rate-limit headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    async def sleep(self, _: float) -> None:
        return None

    def on_retry(self, error: ApiError, _wait: float) -> None:
        headers = error.headers
        limits = sorted(name for name in headers if name.startswith("anthropic-ratelimit-requests"))
        self.seen.append((error.status, type(error).__name__, error.retry_after_s, headers.get("retry-after"), limits))


def test_faults_through_the_sender_process_are_answered_as_inline(emulator: RunningEmulator, tmp_path: Path) -> None:
    tasks = write_jsonl(tmp_path / "tasks.jsonl", _tasks(12)[:-1])
    results = {}
    for sender in ("inline", "process"):
        emulator.reset()
        emulator.configure(fault_retry_after_s=0.5)
        for kind in ("429", "529", "500", "drop", "error_event", "500_no_retry"):
            emulator.script_fault("messages", kind)
        retries = _Retries()
        policy = RetryPolicy(attempts=10, sleep=retries.sleep, on_retry=retries.on_retry)
        output = run_engine(
            emulator,
            tasks,
            tmp_path / sender,
            config=_config(sender, realtime_concurrency=1),
            options=RunOptions(state_dir=tmp_path / sender / "state", mode="realtime"),
            policy=policy,
        )
        # Request ids are the emulator's random ones: present, and otherwise the same.
        assert all(row["error"]["request_id"].startswith("req_") for row in output.rows if row["error"])
        rows = [
            (row["task_id"], row["status"], row["attempts"], row["error"] and {**row["error"], "request_id": None})
            for row in output.rows
        ]
        results[sender] = (retries.seen, rows, messages_calls(emulator.stats()))

    assert results["process"] == results["inline"]
    seen, rows, calls = results["process"]
    # The 429's headers reached the policy and the limiter: its retry-after and the rate-limit state.
    assert seen[0][:4] == (429, "TransientApiError", 0.5, "0.500") and seen[0][4]
    assert [status for status, *_ in seen] == [429, 529, 500, None, 529]
    # The 500 marked x-should-retry: false failed its task at once, as inline.
    failed = [row for row in rows if row[1] == "errored"]
    assert len(failed) == 1 and failed[0][3]["type"] == "api_error"
    assert calls == {"429": 1, "529": 2, "500": 2, "dropped": 1, "200": 11}


def test_the_limiter_learns_the_servers_limit_from_replies_through_the_sender_process(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    # The config says 1,000 RPM; the server allows 120: only the replies' headers can tell the lane.
    emulator.configure(rpm=120)
    tasks = [{"task_id": f"r{i}", "task_type": "user_query", "input_data": {"question": f"q {i}?"}} for i in range(135)]

    output = run_engine(
        emulator,
        write_jsonl(tmp_path / "tasks.jsonl", tasks),
        tmp_path,
        config=_config("process", realtime_concurrency=8),
        options=RunOptions(state_dir=tmp_path / "state", mode="realtime"),
        policy=None,  # real waits
    )

    assert output.run["counts"]["succeeded"] == 135
    calls = messages_calls(emulator.stats())
    assert calls.get("429", 0) <= 2, calls


@pytest.mark.timeout(120)
def test_a_killed_sender_process_loses_no_task_and_leaves_no_process(
    emulator: RunningEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.configure(latency_s=0.05)
    count = 300
    tasks = [{"task_id": f"r{i}", "task_type": "user_query", "input_data": {"question": str(i)}} for i in range(count)]
    killed: list[int] = []

    def kill_midway() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answered = messages_calls(emulator.stats()).get("200", 0)
            if answered >= 60:
                for pid in _sender_processes():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_midway)
    killer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="batch_engine"):
            output = run_engine(
                emulator,
                write_jsonl(tmp_path / "tasks.jsonl", tasks),
                tmp_path,
                config=_config("process", realtime_concurrency=8),
                options=RunOptions(state_dir=tmp_path / "state", mode="realtime"),
                policy=NO_WAIT_POLICY,
            )
    finally:
        killer.join()

    assert len(killed) == 1
    assert [row["task_id"] for row in output.rows] == [task["task_id"] for task in tasks]
    assert all(row["status"] == "succeeded" for row in output.rows)
    # The requests in flight when it died were sent again (from this process), like dropped connections.
    assert any(row["attempts"] == 2 for row in output.rows)
    assert "realtime sender process exited" in caplog.text
    assert _sender_processes() == []
