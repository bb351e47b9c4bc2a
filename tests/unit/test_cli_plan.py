"""`batch-engine plan | validate | schema` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from batch_engine.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def test_plan_json_counts_routes_batches_and_cost(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(SAMPLES / "nightly_tasks.json"), "--config", str(SAMPLES / "config.toml"), "--json"]) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["tasks"] == summary["records"] >= 300
    assert set(summary["by_route"]) == {"batch", "realtime"}
    assert len(summary["by_task_type"]) >= 6
    assert summary["batches"] >= 1
    assert 0 < summary["estimated_cost_usd"] < summary["baseline_cost_usd"]


def test_validate_lists_each_rejection_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(SAMPLES / "bad_tasks.jsonl")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("line 5 (task_id unknown-type): task_type:") for line in out)
    assert out[-1] == "11 records: 2 valid, 9 rejected"


@pytest.mark.parametrize("kind", ["input", "output"])
def test_committed_schemas_match_the_command(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", kind]) == 0
    assert orjson.loads(capsys.readouterr().out) == orjson.loads((SAMPLES / "schema" / f"{kind}.json").read_bytes())


@pytest.mark.parametrize(
    ("content", "config", "message"),
    [
        (b"not json at all\n", None, "not JSON or JSONL"),
        (b"", None, "empty"),
        (b'[{"task_id":"a","task_type":"chat"}]', b"[tiers]\ncheap = 3\n", "tiers"),
    ],
)
def test_bad_files_are_one_error_line_and_exit_2(
    tmp_path: Path, content: bytes, config: bytes | None, message: str
) -> None:
    path = tmp_path / "in.json"
    path.write_bytes(content)
    args = [sys.executable, "-m", "batch_engine.cli", "plan", str(path)]
    if config is not None:
        (tmp_path / "c.toml").write_bytes(config)
        args += ["--config", str(tmp_path / "c.toml")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ")
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
