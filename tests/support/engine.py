"""Helpers for the engine tests: generate task files, run the engine against the emulator, read the output.

Everything goes through the public library API (`batch_engine.runner.run`) and the real SDK over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from batch_engine.client import ApiSettings, RetryPolicy
from batch_engine.config import Config, load_config
from batch_engine.emulator import RunningEmulator, reply_digest
from batch_engine.lanes import Progress
from batch_engine.models import RunSummary, TaskResult
from batch_engine.runner import RunOptions, run

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TASKS = ROOT / "samples" / "nightly_tasks.json"
SAMPLE_CONFIG = ROOT / "samples" / "config.toml"


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


# Retries without waiting (STYLE: a testing mode turns waits off instead of patching sleep).
NO_WAIT_POLICY = RetryPolicy(attempts=10, sleep=_no_sleep)


def fast_config(config: Config | None = None, **limits: Any) -> Config:
    """A config whose batch polling suits an emulator that ends batches in a fraction of a second."""
    base = config or load_config()
    updates: dict[str, Any] = {"batch_poll_initial_s": 0.05, "batch_poll_interval_s": 0.2, **limits}
    return base.model_copy(update={"limits": base.limits.model_copy(update=updates)})


def write_jsonl(path: Path, tasks: Iterable[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(task) + b"\n" for task in tasks))
    return path


def generated_tasks(count: int, *, realtime_every: int | None = 3, prefix: str = "t") -> list[dict[str, Any]]:
    """`count` distinct tasks; every `realtime_every`-th one is a realtime task type (None: none), the rest batch."""
    tasks = []
    for i in range(count):
        if realtime_every and i % realtime_every == 0:
            tasks.append({"task_id": f"{prefix}{i}", "task_type": "user_query", "input_data": {"question": f"q {i}?"}})
        else:
            tasks.append({"task_id": f"{prefix}{i}", "task_type": "classify_bulk", "input_data": {"text": f"t {i}"}})
    return tasks


def rendered_user_text(task: dict[str, Any], config: Config) -> str:
    """The user message a task should have sent, rendered here independently of the engine's planning."""
    if task.get("params") is not None:
        content = task["params"]["messages"][-1]["content"]
        return str(content)
    template = config.task_types[task["task_type"]].user
    return template.format_map(task.get("input_data") or {})


def expected_text_prefix(task: dict[str, Any], row: dict[str, Any], config: Config) -> str:
    """What the emulator's reply to this task's own request starts with (batch rows also echo custom_id)."""
    echo = f"echo:{reply_digest(rendered_user_text(task, config))}"
    return f"{echo} custom_id:{task['task_id']}" if row["route"] == "batch" else echo


@dataclass
class TimedProgress(Progress):
    """Progress that also notes when each row finished (monotonic seconds), for rate measurements."""

    finished_at: list[float] = field(default_factory=list)

    def add(self, result: TaskResult) -> None:
        super().add(result)
        self.finished_at.append(time.monotonic())


@dataclass(frozen=True)
class Output:
    summary: RunSummary
    run: dict[str, Any]
    rows: list[dict[str, Any]]
    path: Path


def read_output(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The `run` section and the result rows of a JSON or JSONL output file."""
    data = path.read_bytes()
    if path.suffix != ".jsonl":
        document = orjson.loads(data)
        return document["run"], document["results"]
    lines = [orjson.loads(line) for line in data.splitlines()]
    return lines[0]["run"], lines[1:]


def run_engine(
    emulator: RunningEmulator,
    input_path: Path,
    tmp_path: Path,
    *,
    config: Config | None = None,
    options: RunOptions | None = None,
    policy: RetryPolicy | None = NO_WAIT_POLICY,
    progress: Progress | None = None,
    output_name: str = "out.json",
) -> Output:
    """One `batch_engine.runner.run` against the emulator; the state directory lives in `tmp_path`."""
    output_path = tmp_path / output_name
    summary = asyncio.run(
        run(
            input_path,
            output_path,
            api=ApiSettings(api_key=SecretStr("sk-test"), base_url=emulator.base_url),
            config=config or fast_config(),
            options=options or RunOptions(state_dir=tmp_path / "state"),
            policy=policy,
            progress=progress,
        )
    )
    run_section, rows = read_output(output_path)
    return Output(summary, run_section, rows, output_path)


def messages_calls(stats: dict[str, Any]) -> dict[str, int]:
    """Calls to POST /v1/messages by status ("200", "429", "dropped", ...)."""
    return dict(stats["calls"].get("POST /v1/messages", {}))


class FakeClock:
    """Time that moves only when something sleeps on it (or the test says so); every requested sleep is recorded.
    A sleep yields to the event loop once, as a real one would."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)
