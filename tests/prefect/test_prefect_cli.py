"""`batch-engine run` runs the `batch-orchestrator` flow: same results as a deployment run, a clean terminal,
the same exit codes (0 / 1 some failed / 2 bad input or config before Prefect starts), nothing left running."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from batch_engine.cli import main
from batch_engine.emulator import RunningEmulator

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
CLI = Path(sys.executable).with_name("batch-engine")


def _pids_with_env(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds leftover processes through /proc")
def test_an_emulated_run_ends_with_the_clean_summary_and_leaves_no_process(
    tmp_path: Path, migrated_prefect_db: Path
) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    shutil.copy(migrated_prefect_db, home / "prefect.db")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "ANTHROPIC_"))}
    # Ephemeral Prefect, as a user without a server gets it with --prefect, in a home of its own (and the
    # server's telemetry left at its default: the CLI turns it off, offline it only logs errors).
    env.update(PREFECT_HOME=str(home))
    output = tmp_path / "out.json"
    command = [str(CLI), "run", str(SAMPLES / "nightly_tasks.json"), "-o", str(output), "--prefect"]
    command += ["--config", str(SAMPLES / "config.toml"), "--state-dir", str(tmp_path / "state"), "--emulate"]

    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150, check=False)
        leftovers = _pids_with_env(f"PREFECT_HOME={home}".encode())
    finally:
        for pid in _pids_with_env(f"PREFECT_HOME={home}".encode()):
            os.kill(pid, 9)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("SIMULATED run against the built-in emulator")
    assert done.stdout.splitlines()[-1].startswith(f"output: {output}")
    # The run's own lines, and none of Prefect's banners, state lines or exit-time warnings.
    assert "batch msgbatch_" in done.stderr and "realtime lane: 63 tasks" in done.stderr
    for noise in ("temporary server", "Finished in state", "Beginning flow run", "EventsWorker", "Traceback", "ERROR"):
        assert noise not in done.stderr, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "SIMULATED" in warnings[0], warnings
    # The temporary server's own output went to its log file, not the terminal.
    assert (tmp_path / "state" / "prefect-server.log").exists()
    assert len(orjson.loads(output.read_bytes())["results"]) == 304
    assert leftovers == []


@pytest.mark.skipif(not Path("/proc").exists(), reason="finds leftover processes through /proc")
def test_a_temporary_server_that_fails_to_start_is_one_error_line_naming_its_log(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "ANTHROPIC_"))}
    # A database the server cannot open: its start-up fails (uvicorn exits with code 3, which Prefect takes for
    # a port already taken, and starts it again, and again, until its timeout).
    database = tmp_path / "no-such-dir" / "prefect.db"
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{database}")
    state = tmp_path / "state"
    command = [str(CLI), "run", str(SAMPLES / "nightly_tasks.json"), "-o", str(tmp_path / "out.json"), "--prefect"]
    command += ["--config", str(SAMPLES / "config.toml"), "--state-dir", str(state), "--emulate"]

    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        leftovers = _pids_with_env(f"PREFECT_HOME={home}".encode())
    finally:
        for pid in _pids_with_env(f"PREFECT_HOME={home}".encode()):
            os.kill(pid, 9)

    log = state / "prefect-server.log"
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"Error: Prefect's temporary server did not start (its start-up failed); its log: {log}\n"
    ), done.stderr
    assert "Traceback" not in done.stdout and not (tmp_path / "out.json").exists()
    # The server's own story is in the log the line names, and its processes are gone.
    assert "unable to open database file" in log.read_text()
    assert leftovers == []


def test_bad_input_config_or_key_is_one_error_line_and_exit_2_before_prefect_starts(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[limits\n")
    (tmp_path / "empty.jsonl").write_text("")
    good = str(SAMPLES / "nightly_tasks.json")
    cases = [
        ["run", str(tmp_path / "missing.json"), "-o", "o.json", "--emulate"],
        ["run", str(tmp_path / "empty.jsonl"), "-o", "o.json", "--emulate"],
        ["run", good, "-o", "o.json", "--config", str(tmp_path / "bad.toml"), "--emulate"],
        ["run", good, "-o", "o.json"],  # no key, no --emulate, no Prefect server
    ]
    script = (
        "import sys; from batch_engine.cli import main\n"
        f"codes = [main(args) for args in {cases!r}]\n"
        "print(codes, 'prefect' in sys.modules and 'prefect.flows' in sys.modules)\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "ANTHROPIC_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )

    assert done.stdout.strip() == "[2, 2, 2, 2] False", done.stderr
    errors = done.stderr.splitlines()
    assert len(errors) == 4 and all(line.startswith("Error: ") for line in errors), errors
    assert "missing.json" in errors[0] and "empty" in errors[1] and "bad.toml" in errors[2]
    assert "no API key" in errors[3]


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_with_failed_tasks_exits_1_with_every_task_in_the_output(
    emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    # Every batch row comes back refused: those tasks fail, the realtime ones still succeed.
    emulator.configure(batch_row_error_rate=1.0, batch_row_error_type="invalid_request_error")
    output = tmp_path / "out.json"
    args = ["run", str(SAMPLES / "nightly_tasks.json"), "-o", str(output), "--config", str(SAMPLES / "config.toml")]
    args += ["--state-dir", str(tmp_path / "state"), "--poll-interval", "200ms"]

    assert main(args) == 1

    rows = orjson.loads(output.read_bytes())["results"]
    assert len(rows) == 304
    assert {row["status"] for row in rows if row["route"] == "batch"} == {"errored"}
    assert {row["status"] for row in rows if row["route"] == "realtime"} == {"succeeded"}


@pytest.mark.usefixtures("prefect_harness")
def test_with_prefect_api_url_set_a_run_is_a_flow_run_on_that_server(
    emulator: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emulator.base_url)
    output = tmp_path / "out.json"
    args = ["run", str(SAMPLES / "nightly_tasks.json"), "-o", str(output), "--config", str(SAMPLES / "config.toml")]
    args += ["--state-dir", str(tmp_path / "state"), "--poll-interval", "200ms"]

    assert main(args) == 0

    async def flow_runs_writing_output() -> list[str]:
        async with get_client() as client:
            runs = await client.read_flow_runs()
        return [run.state_name or "" for run in runs if run.parameters.get("output_path") == str(output)]

    assert asyncio.run(flow_runs_writing_output()) == ["Completed"]
