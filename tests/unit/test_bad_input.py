"""The bad inputs a new user hit (issue 18), through the real `batch-engine` command: each is a per-record
rejection naming the field, a warning line, or one `Error:` line with exit 2, before anything is sent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("batch-engine")
MESSAGES = [{"role": "user", "content": "Where are the daily aggregates?"}]

# task_id -> (record, the field its rejection names; None: it runs)
RECORDS: dict[str, tuple[dict[str, Any], str | None]] = {
    "tools_not_objects": ({"params": {"messages": MESSAGES, "tools": [1, 2]}}, "params.tools"),
    "tools_not_a_list": ({"params": {"messages": MESSAGES, "tools": "search"}}, "params.tools"),
    "max_tokens_null": ({"params": {"messages": MESSAGES, "max_tokens": None}}, "params.max_tokens"),
    "max_tokens_text": ({"params": {"messages": MESSAGES, "max_tokens": "abc"}}, "params.max_tokens"),
    "max_tokens_huge": ({"params": {"messages": MESSAGES, "max_tokens": 10**9}}, "params.max_tokens"),
    "message_not_object": ({"params": {"messages": ["hi"]}}, "params.messages.0"),
    "system_number": ({"params": {"messages": MESSAGES, "system": 3}}, "params.system"),
    "model_unknown": ({"params": {"messages": MESSAGES, "model": "gpt-4"}}, "params.model"),
    "model_contradicts": (
        {"model": "claude-haiku-5-5", "params": {"messages": MESSAGES, "model": "claude-sonnet-5-5"}},
        "params.model",
    ),
    "max_latency_nan": ({"input_data": {"question": "q"}, "max_latency_s": "NaN"}, "max_latency_s"),
    "model_honoured": (
        {"params": {"messages": MESSAGES, "model": "claude-sonnet-4-6"}},
        None,
    ),  # thinks only when asked
    "capped": ({"input_data": {"question": "q"}, "max_tokens": 10**9}, None),
}


def _clean_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "ANTHROPIC_"))}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args], env=_clean_env(), cwd=cwd, capture_output=True, text=True, timeout=180, check=False
    )


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    rows = [{"task_id": task_id, "task_type": "user_query", **record} for task_id, (record, _) in RECORDS.items()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def test_bad_records_are_rejections_naming_the_field_in_validate_plan_and_run(bad_file: Path, tmp_path: Path) -> None:
    rejected = {task_id: field for task_id, (_, field) in RECORDS.items() if field is not None}

    validate = _cli("validate", str(bad_file), cwd=tmp_path)
    plan = _cli("plan", str(bad_file), "--json", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    output = tmp_path / "out.json"
    run = _cli(
        "run", str(bad_file), "-o", str(output), "--state-dir", str(tmp_path / "state"), "--emulate", cwd=tmp_path
    )

    for done in (validate, plan, run):
        assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert validate.returncode == 1, validate.stderr
    for task_id, field in rejected.items():
        assert any(f"(task_id {task_id}): {field}: " in line for line in validate.stdout.splitlines()), task_id
    capped = "warning: the record's max_tokens 1000000000 is above claude-haiku-5-5's output limit; capped at"
    assert capped in validate.stdout

    assert plan.returncode == 0, plan.stderr
    summary = orjson.loads(plan.stdout)
    assert (summary["tasks"], summary["rejected"]) == (len(RECORDS) - len(rejected), len(rejected))
    assert any(capped in warning for warning in summary["warnings"])

    # Every record is in the output: the two valid ones answered, the rest rejected naming their field.
    assert run.returncode == 1, run.stderr
    assert "WARNING | the record's max_tokens 1000000000 is above" in run.stderr
    rows = {row["task_id"]: row for row in orjson.loads(output.read_bytes())["results"]}
    assert set(rows) == set(RECORDS)
    for task_id, field in rejected.items():
        assert rows[task_id]["status"] == "rejected" and field in rows[task_id]["error"]["message"], rows[task_id]
    assert rows["model_honoured"]["status"] == "succeeded" and rows["model_honoured"]["model"] == "claude-sonnet-4-6"
    assert rows["capped"]["status"] == "succeeded"


def test_a_pretty_printed_json_object_is_one_task(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    task = {"task_id": "only", "task_type": "user_query", "input_data": {"question": "Where is it?"}}
    path.write_bytes(orjson.dumps(task, option=orjson.OPT_INDENT_2))

    done = _cli("validate", str(path), cwd=tmp_path)

    assert (done.returncode, done.stdout) == (0, "1 records: 1 valid, 0 rejected\n"), done.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--poll-interval", "0"), ("--max-cost-usd", "-1"), ("--max-cost-usd", "nan"), ("--batch-timeout", "0s")],
)
def test_a_bad_run_flag_is_one_error_line_and_exit_2(flag: str, value: str, tmp_path: Path) -> None:
    source = ROOT / "samples" / "nightly_tasks.json"

    done = _cli("run", str(source), "-o", str(tmp_path / "out.json"), "--emulate", flag, value, cwd=tmp_path)

    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"Error: batch-engine run: argument {flag}: ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "out.json").exists()
