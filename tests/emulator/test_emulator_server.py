"""Running the emulator: background thread lifecycle, state across restarts, the CLI, the benchmark."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import orjson
import pydantic
import pytest

from batch_engine.bench.emulator import main as bench_main
from batch_engine.cli import main
from batch_engine.emulator import EmulatorSettings, RunningEmulator, start_emulator
from batch_engine.emulator.faults import FAULT_KINDS

HAIKU = "claude-haiku-5-5"
ROOT = Path(__file__).resolve().parents[2]


def _emulator_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("emulator:")]


def test_start_and_stop_leave_no_thread_or_open_port() -> None:
    before = _emulator_threads()
    with start_emulator() as emulator:
        port = emulator.port
        with anthropic.Anthropic(base_url=emulator.base_url, api_key="k", max_retries=0) as client:
            client.messages.create(model=HAIKU, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert f"emulator:{port}" in _emulator_threads()
    assert _emulator_threads() == before
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    with socket.socket() as rebind:
        rebind.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rebind.bind(("127.0.0.1", port))


def test_settings_reject_impossible_fault_mixes() -> None:
    with pytest.raises(pydantic.ValidationError, match="more than 1"):
        EmulatorSettings(fault_rate_429=0.6, fault_rate_500=0.6)
    with pytest.raises(pydantic.ValidationError, match="unknown"):
        EmulatorSettings(fault_endpoints=("nowhere",))


def test_state_file_carries_batches_cache_and_counters_across_a_restart(tmp_path: Path) -> None:
    settings = EmulatorSettings(state_file=tmp_path / "emulator.json", batch_duration_s=3600)
    system = [{"type": "text", "text": "Long shared instructions. " * 100, "cache_control": {"type": "ephemeral"}}]
    with start_emulator(settings) as first, anthropic.Anthropic(base_url=first.base_url, api_key="k") as client:
        batch = client.messages.batches.create(
            requests=[
                {
                    "custom_id": f"row-{index}",
                    "params": {"model": HAIKU, "max_tokens": 8, "messages": [{"role": "user", "content": "q"}]},
                }
                for index in range(3)
            ]
        )
        written = client.messages.create(
            model=HAIKU, max_tokens=5, system=system, messages=[{"role": "user", "content": "x"}]
        )
        assert written.usage.cache_creation_input_tokens > 0

    with start_emulator(settings) as second, anthropic.Anthropic(base_url=second.base_url, api_key="k") as client:
        resumed = client.messages.batches.retrieve(batch.id)
        assert resumed.processing_status == "in_progress" and resumed.created_at == batch.created_at
        read = client.messages.create(
            model=HAIKU, max_tokens=5, system=system, messages=[{"role": "user", "content": "y"}]
        )
        assert read.usage.cache_read_input_tokens == written.usage.cache_creation_input_tokens
        second.advance_clock(3600)
        deadline = time.monotonic() + 10
        while client.messages.batches.retrieve(batch.id).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert sorted(row.custom_id for row in client.messages.batches.results(batch.id)) == [
            "row-0",
            "row-1",
            "row-2",
        ]
        stats = second.stats()
        assert stats["batches_created"] == 1 and stats["messages_succeeded"] == 2


def _start_cli(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "batch_engine.cli", "emulator", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+", line)
    if not found:
        process.kill()
        raise AssertionError(f"no URL in {line!r}; stderr: {process.communicate()[1]}")
    return process, found.group(0)


def test_cli_serves_with_its_options_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    process, base_url = _start_cli("--rpm", "7", "--latency", "10ms", "--state-file", str(state), "--seed", "3")
    try:
        with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0) as client:
            raw = client.messages.with_raw_response.create(
                model=HAIKU, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "7"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr
    assert "Emulator stopped." in stdout
    assert orjson.loads(state.read_bytes())["stats"]["messages_succeeded"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fault-rate", "418=0.1"], "unknown fault kind"),
        (["--batch-duration", "soon"], "not a duration"),
        (["--fault-rate", "429=0.7", "--fault-rate", "500=0.7"], "Error: emulator: "),
    ],
)
def test_cli_rejects_bad_options_with_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "batch_engine.cli", "emulator", "--port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_benchmark_reports_requests_per_second(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--requests", "200", "--concurrency", "8", "--mode", mode]) == 0
    figures = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["requests"] == 200 and figures["errors"] == 0
    assert figures["requests_per_s"] > 20
    if mode == "process":
        assert figures["server_cpu_ms_per_request"] > 0 and figures["server_capacity_rps"] > 0


def test_cli_refuses_a_port_in_use() -> None:
    with start_emulator() as running:
        result = subprocess.run(
            [sys.executable, "-m", "batch_engine.cli", "emulator", "--port", str(running.port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_cli_refuses_a_corrupt_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    result = subprocess.run(
        [sys.executable, "-m", "batch_engine.cli", "emulator", "--port", "0", "--state-file", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "not a usable emulator state file" in result.stderr and "Traceback" not in result.stderr


def test_the_emulator_help_documents_every_setting_and_fault_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["emulator", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # Every setting a user can set has its flag; the random fault rates share --fault-rate KIND=RATE.
    flags = {
        "fault_rate_429": "--fault-rate",
        "fault_rate_529": "--fault-rate",
        "fault_rate_500": "--fault-rate",
        "fault_rate_drop": "--fault-rate",
        "batch_row_error_rate": "--fault-rate",
        "batch_row_expire_rate": "--fault-rate",
        "batch_row_error_type": "--row-error-type",
        "batch_duration_s": "--batch-duration",
        "fault_retry_after_s": None,  # the scripted 429's retry-after: set over /_emulator/config only
        "latency_s": "--latency",
        "jitter_s": "--jitter",
        "rpm": "--rpm",
        "itpm": "--itpm",
        "otpm": "--otpm",
        "batch_rpm": "--batch-rpm",
        "count_tokens_rpm": "--count-tokens-rpm",
        "fault_after_commit_rate": "--fault-after-commit",
        "config_path": "--config",
        # The API's documented request limits (32 MB Messages, 256 MB / 100,000 requests per batch): not flags.
        "max_message_body_bytes": None,
        "max_batch_body_bytes": None,
        "max_batch_requests": None,
    }
    for name in EmulatorSettings.model_fields:
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if flag is not None:
            assert flag in text, name
    for kind in FAULT_KINDS:
        assert kind in text, kind


def test_a_request_body_is_read_in_large_pieces(emulator: RunningEmulator) -> None:
    # A 256 MB batch create read 256 KiB per event-loop turn, between turns answering realtime requests, took
    # 15-25 s to arrive under realtime load: the emulator's connections read READ_BYTES at a time.
    from batch_engine.emulator.server import READ_BYTES

    with socket.create_connection((emulator.host, emulator.port)) as client:
        client.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")  # half a request
        deadline = time.monotonic() + 5
        sizes: list[int] = []
        while not sizes and time.monotonic() < deadline:
            connections = emulator._call(lambda: list(emulator._server.server_state.connections))
            sizes = [protocol.transport.max_size for protocol in connections]
            time.sleep(0.02)

    assert sizes and set(sizes) == {READ_BYTES} and READ_BYTES >= 4 * 2**20
