"""A new user's first `batch-engine run`: with no Prefect server configured it runs the run loop in its own process
(no Prefect imported, no temporary server), and its terminal shows the run's lines only: no ERROR, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from batch_engine.emulator import RunningEmulator

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"


def _clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "ANTHROPIC_"))}


def test_a_run_without_a_prefect_server_runs_in_this_process_and_prints_no_error(tmp_path: Path) -> None:
    output = tmp_path / "out.json"
    args = ["run", str(SAMPLES / "nightly_tasks.json"), "-o", str(output), "--config", str(SAMPLES / "config.toml")]
    args += ["--state-dir", str(tmp_path / "state"), "--emulate"]
    script = (
        "import sys; from batch_engine.cli import main\n"
        f"code = main({args!r})\n"
        "print('exit', code, 'prefect imported:', 'prefect' in sys.modules)\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", script], env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )

    assert done.stdout.splitlines()[-1] == "exit 0 prefect imported: False", done.stderr
    assert "realtime lane: 63 tasks, 63 succeeded" in done.stderr
    assert "batch lane: 1 batch submitted, 1 ended; 241 rows succeeded" in done.stderr
    for noise in ("ERROR", "Traceback", "temporary server"):
        assert noise not in done.stderr, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "SIMULATED" in warnings[0], warnings
    assert len(orjson.loads(output.read_bytes())["results"]) == 304
    assert not (tmp_path / "state" / "prefect-server.log").exists()


def test_the_run_durations_cover_the_whole_wall_time_of_the_command(tmp_path: Path, emulator: RunningEmulator) -> None:
    # `durations_s` is the invocation's phases back to back, start-up (interpreter, imports) and the output's
    # write included: their sum is the command's wall time but for the interpreter's exit after the run (module
    # teardown: ~0.1 s on an idle machine, 2 s at load 9 on 2 cores; hence the allowance). Before, it left out
    # start-up and the write: 5.2 s of a 37.9 s command.
    output = tmp_path / "out.json"
    command = [sys.executable, "-m", "batch_engine.cli", "run", str(SAMPLES / "nightly_tasks.json"), "-o", str(output)]
    command += ["--config", str(SAMPLES / "config.toml"), "--state-dir", str(tmp_path / "state")]
    command += ["--poll-interval", "0.2"]
    env = _clean_env() | {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": emulator.base_url}

    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    wall = time.perf_counter() - started

    assert done.returncode == 0, done.stderr
    durations = orjson.loads(output.read_bytes())["run"]["durations_s"]
    assert 0.75 * wall - 1.0 <= durations["total"] <= wall, (durations, wall)
    phases = ("startup", "plan", "send", "write")
    assert set(durations) == {*phases, "total"}
    assert all(durations[phase] >= 0 for phase in phases)
    assert durations["total"] == pytest.approx(sum(durations[phase] for phase in phases), abs=0.005)


# What `run` imports before its first request is start-up the user waits through (`bench startup`): Prefect (~1 s)
# only runs as the flow, the emulator only with --emulate, rich only draws the live table on a terminal, and the SDK
# (2-3 s of CPU for its pydantic models) only for what is not a non-streamed Messages request.
_FIRST_REQUEST_IMPORTS = """
import json, sys
address = ("127.0.0.1", {port})
imported = []

def at_first_request(event, args):
    if event == "socket.connect" and not imported and tuple(args[1])[:2] == address:
        imported.append(sorted(sys.modules))

sys.addaudithook(at_first_request)
from batch_engine.cli import main
code = main({args!r})
print(json.dumps({{"code": code, "modules": imported[0] if imported else None}}))
"""


def test_a_run_imports_neither_prefect_nor_the_sdk_nor_the_emulator_nor_rich_before_its_first_request(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(b"".join(orjson.dumps(task) + b"\n" for task in _QUESTIONS))
    args = ["run", str(tasks), "-o", str(tmp_path / "out.json"), "--state-dir", str(tmp_path / "state")]
    script = _FIRST_REQUEST_IMPORTS.format(port=emulator.port, args=args)
    env = _clean_env() | {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": emulator.base_url}

    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)

    report = orjson.loads(done.stdout.splitlines()[-1])
    assert report["code"] == 0, done.stderr
    modules = report["modules"]
    assert "httpx2" in modules  # taken as the first request went out, not before the run began
    late = [m for m in modules if m.split(".")[0] in _NOT_YET_PACKAGES or m.startswith(_NOT_YET)]
    assert late == [], late


_NOT_YET_PACKAGES = ("prefect", "rich", "uvicorn", "anthropic")
_NOT_YET = ("batch_engine.emulator", "batch_engine.orchestration")
_QUESTIONS = [
    {"task_id": f"q{i}", "task_type": "user_query", "input_data": {"question": f"Table {i}?"}, "mode": "realtime"}
    for i in range(4)
]


def test_a_run_on_a_terminal_draws_the_live_progress_table(tmp_path: Path, emulator: RunningEmulator) -> None:
    # rich takes FORCE_COLOR for a terminal. The table is drawn once the first requests are on their way (rich is
    # imported then), and cleared when the run ends: its title is in what stderr received.
    emulator.configure(latency_s=0.3)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(b"".join(orjson.dumps(task) + b"\n" for task in _QUESTIONS))
    command = [sys.executable, "-m", "batch_engine.cli", "run", str(tasks), "-o", str(tmp_path / "out.json")]
    command += ["--state-dir", str(tmp_path / "state"), "--concurrency", "1"]
    env = _clean_env() | {"ANTHROPIC_API_KEY": "sk-test", "ANTHROPIC_BASE_URL": emulator.base_url, "FORCE_COLOR": "1"}

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert "batch_engine: 4 tasks" in done.stderr
    assert "realtime lane: 4 tasks, 4 succeeded" in done.stderr
    assert "4 tasks: 4 succeeded" in done.stdout
