"""Hostile input through the loader and the CLI: whatever the file holds, the answer is tasks + rejections
(every record accounted for once) or one clean `Error:` line with exit 2 — never a traceback."""

from __future__ import annotations

import re
import string
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_engine.cli import main
from batch_engine.config import load_config
from batch_engine.planning.params import render

CONFIG = load_config()
_NOW = datetime(2026, 11, 23, tzinfo=UTC)
TASK_TYPES = sorted(CONFIG.task_types)

ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    st.sampled_from(["", "a" * 65, "has space", "sl/ash", "ünï", "\x00", "dup"]),
    st.integers(-(2**63), 2**63 - 1),
    st.none(),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
)


@st.composite
def records(draw: st.DrawFn) -> Any:
    record: dict[str, Any] = {"task_id": draw(ids), "task_type": draw(_TASK_TYPE_VALUES)}
    if draw(st.booleans()):
        record["input_data"] = draw(_INPUT_DATA)
    for key, strategy in _RECORD_FIELDS:
        if draw(st.integers(0, 4)) == 0:
            record[key] = draw(strategy)
    return draw(st.one_of(st.just(record), st.just(record), values))


MODELS = sorted(CONFIG.models)
models = st.one_of(st.sampled_from(MODELS), st.sampled_from(["", "gpt-4", "claude-x"]), values)
latencies = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6), st.text(max_size=6), st.none()
)
contents = st.one_of(
    st.text(max_size=20),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
            st.fixed_dictionaries(
                {"type": st.just("text"), "text": st.text(max_size=10), "cache_control": st.just({"type": "ephemeral"})}
            ),
            values,
        ),
        max_size=6,
    ),
    values,
)


# Every strategy is built once, here: strategies built inside a draw fill Hypothesis's strategy cache with new
# entries on every example (slower, and its eviction once failed with a KeyError inside Hypothesis).
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]), "content": contents})
_MESSAGES = st.lists(st.one_of(_MESSAGE, values), max_size=3)
_PARAMS_MESSAGES = st.one_of(_MESSAGES, _MESSAGES, values)
_TOOL = st.one_of(st.fixed_dictionaries({"name": st.text(max_size=5)}), values)
_PARAMS_FIELDS = (
    ("max_tokens", st.one_of(st.integers(-3, 300_000), st.none(), st.text(max_size=4), st.booleans(), st.floats())),
    ("model", models),
    ("system", contents),
    ("tools", st.one_of(st.lists(_TOOL, max_size=3), values)),
    ("stop_sequences", st.one_of(st.lists(st.text(max_size=4), max_size=2), values)),
    ("stream", st.booleans()),
    ("temperature", st.one_of(st.floats(), values)),
    ("cache_control", st.just({"type": "ephemeral"})),
    ("metadata", values),
)


@st.composite
def raw_params(draw: st.DrawFn) -> Any:
    """Raw Messages API params, mostly near-valid: each field right, wrong-typed or out of range."""
    params: dict[str, Any] = {"messages": draw(_PARAMS_MESSAGES)}
    for key, strategy in _PARAMS_FIELDS:
        if draw(st.integers(0, 3)) == 0:
            params[key] = draw(strategy)
    return draw(st.one_of(st.just(params), st.just(params), st.just(params), values))


_TASK_TYPE_VALUES = st.one_of(st.sampled_from(TASK_TYPES), st.text(max_size=8), st.integers(-9, 9))
_INPUT_DATA = st.one_of(
    st.dictionaries(st.sampled_from(["text", "document", "question", "logs", "x"]), values, max_size=4), values
)
_RECORD_FIELDS = (
    ("mode", st.sampled_from(["auto", "batch", "realtime", "later", 3])),
    ("max_tokens", st.one_of(st.integers(-5, 200_000), st.text(max_size=3), st.just(10**9), st.none())),
    ("deadline", st.one_of(st.just("2026-11-23T05:00:00Z"), st.text(max_size=12), st.integers(-9, 9))),
    ("model_tier", st.sampled_from(["cheap", "capable", "premium", "gold"])),
    ("model", models),
    ("system", st.one_of(st.text(max_size=30), values)),
    ("max_latency_s", latencies),
    ("params", raw_params()),
    ("metadata", values),
    ("unknown_field", values),
)


@st.composite
def task_files(draw: st.DrawFn) -> bytes:
    rows = draw(st.lists(records(), min_size=0, max_size=8))
    as_jsonl = draw(st.booleans())
    data = b"\n".join(orjson.dumps(row) for row in rows) if as_jsonl else orjson.dumps(rows)
    mutation = draw(
        st.sampled_from(["none", "truncate", "nul", "non_utf8", "bom", "huge", "deep", "dup_ids", "garbage_line"])
    )
    if mutation == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "nul":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\x00" + data[at:]
    elif mutation == "non_utf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff\xfe\xc3" + data[at:]
    elif mutation == "bom":
        data = b"\xef\xbb\xbf" + data
    elif mutation == "huge":
        huge = {"task_id": "huge", "task_type": "summarize", "input_data": {"document": "x" * 300_000}}
        data = data + b"\n" + orjson.dumps(huge) if as_jsonl else orjson.dumps([*rows, huge])
    elif mutation == "deep":
        depth = draw(st.sampled_from([200, 1100, 3000]))
        nested = b'{"task_id":"deep","task_type":"summarize","input_data":' + b'{"a":' * depth + b"1" + b"}" * depth
        data = data + b"\n" + nested + b"}"
    elif mutation == "dup_ids":
        twin = orjson.dumps({"task_id": "twin", "task_type": TASK_TYPES[0], "input_data": {}})
        data = data + b"\n" + twin + b"\n" + twin if as_jsonl else orjson.dumps([*rows, orjson.loads(twin)] * 2)
    elif mutation == "garbage_line":
        data = data + b"\n" + draw(st.binary(max_size=40))
    return data


CI = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _one_error_line(err: str) -> None:
    assert err.startswith("Error: ") and err.count("\n") == 1, err


def _validate_and_plan(tmp_path: Path, data: bytes, capsys: pytest.CaptureFixture[str]) -> list[str] | None:
    """`validate` then `plan --json` of one generated file: the same records, each a task or a rejection.

    Returns `validate`'s rejection lines, in record order; None when the file as a whole is refused (exit 2).
    """
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(data)
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 2:
        _one_error_line(err)
        assert main(["plan", str(path), "--json", "--state-dir", str(tmp_path / "none")]) == 2
        _one_error_line(capsys.readouterr().err)
        return None
    assert code in (0, 1) and not err
    # One line per rejection, naming its record and field, then warnings, then the tally: every record once.
    *lines, tally = out.splitlines()
    warnings = [line for line in lines if line.startswith("warning: ")]
    rejections = [line for line in lines if not line.startswith("warning: ")]
    total, valid, rejected = map(int, re.fullmatch(r"(\d+) records: (\d+) valid, (\d+) rejected", tally).groups())
    assert valid + rejected == total and rejected == len(rejections) and (code == 1) == (rejected > 0)
    for line in rejections:
        assert re.match(r"(line|record) \d+( \(task_id [^)]*\))?: [^:]+: .+", line), line
    for line in warnings:
        assert re.match(r"warning: .*max_tokens \d+ is above .* capped at \d+ for \d+ tasks", line), line

    assert main(["plan", str(path), "--json", "--state-dir", str(tmp_path / "none")]) == 0
    out, err = capsys.readouterr()
    assert not err
    summary = orjson.loads(out)
    assert (summary["records"], summary["tasks"], summary["rejected"]) == (total, valid, rejected)
    # `plan` warns of what `validate` does (capped max_tokens) and of what only a plan shows (thinking that may
    # take a task type's whole max_tokens): one line each.
    assert set(warnings) <= set(summary["warnings"])
    assert all(w.startswith("warning: ") and "\n" not in w for w in summary["warnings"])
    return rejections


@settings(CI, max_examples=1000)
@given(data=task_files())
def test_generated_files_give_tasks_and_rejections_or_one_clean_error(
    tmp_path: Path, data: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    _validate_and_plan(tmp_path, data, capsys)


@pytest.mark.nightly
@settings(CI, max_examples=20_000)
@given(data=task_files())
def test_nightly_generated_files_give_tasks_and_rejections_or_one_clean_error(
    tmp_path: Path, data: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    _validate_and_plan(tmp_path, data, capsys)


@pytest.mark.parametrize(
    "template",
    [
        "{x.__class__.__init__.__globals__}",
        "{x[0]}",
        "{x!r}",
        "{x:>{y}}",
        "{__import__}",
        "{0}",
        "{}",
    ],
)
def test_templates_cannot_reach_objects_files_or_the_environment(template: str) -> None:
    from batch_engine.planning.params import TemplateError

    with pytest.raises(TemplateError):
        render(template, {"x": "value", "y": "3", "0": "zero"})


@given(st.text(alphabet=string.printable, max_size=60))
def test_rendering_is_plain_name_substitution_or_a_refusal(template: str) -> None:
    from batch_engine.planning.params import TemplateError

    try:
        rendered = render(template, {"name": "NAME"})
    except (TemplateError, ValueError):
        return
    # Whatever render accepts, it renders exactly as a format with nothing but the plain name would.
    assert rendered == template.format_map({"name": "NAME"})


# --- config values: any value for any key of the sample config is a working config or one Error: line ---------

SAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "samples" / "config.toml"
CONFIG_LINES = SAMPLE_CONFIG.read_text().splitlines()
SETTABLE = [n for n, line in enumerate(CONFIG_LINES) if re.match(r"[a-z_0-9]+ = ", line)]
SMALL_TASKS = [
    {"task_id": "a", "task_type": "classify_bulk", "input_data": {"text": "t"}},
    {"task_id": "b", "task_type": "user_query", "input_data": {"question": "q?"}, "max_tokens": 10**9},
    {"task_id": "c", "task_type": "summarize", "input_data": {"document": "d"}, "mode": "realtime"},
]
toml_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e308", "0.0", "true", "false", "[]", "{}", '""', '"x"']),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(alphabet=string.ascii_letters + string.digits + " -_", max_size=10).map(lambda text: f'"{text}"'),
)


def _config_case(
    tmp_path: Path, line: int, value: Any, capsys: pytest.CaptureFixture[str], *, run: bool = False
) -> None:
    """`validate` and `plan` with one config value changed; then `run --emulate`, for every refused config (it must
    refuse it the same way, before starting anything) and, with `run`, for every other one too."""
    lines = list(CONFIG_LINES)
    key = lines[line].split(" = ", 1)[0]
    lines[line] = f"{key} = {value}"
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(b"".join(orjson.dumps(task) + b"\n" for task in SMALL_TASKS))
    codes = []
    for command in (["validate"], ["plan", "--json", "--state-dir", str(tmp_path / "none")]):
        code = main([command[0], str(tasks), "--config", str(config), *command[1:]])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        if code == 2:
            _one_error_line(err)
            assert str(config) in err  # the error names the file (and the key)
        else:
            assert code in (0, 1) and not err, err
        codes.append(code)
    if 2 in codes or run:
        flags = {"--config": str(config), "--route": "--realtime-only"}
        code, _, err = _emulated_run(Path(tempfile.mkdtemp(dir=tmp_path)), tasks, flags, capsys)
        if 2 in codes:
            assert code == 2 and str(config) in err.splitlines()[-1], err


@settings(CI, max_examples=300)
@given(line=st.sampled_from(SETTABLE), value=toml_values)
def test_any_config_value_gives_a_plan_or_one_clean_error(
    tmp_path: Path, line: int, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _config_case(tmp_path, line, value, capsys)


@settings(CI, max_examples=20)
@given(line=st.sampled_from(SETTABLE), value=toml_values)
def test_any_config_value_runs_emulated_or_gives_one_clean_error(
    tmp_path: Path, line: int, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _config_case(tmp_path, line, value, capsys, run=True)


@pytest.mark.nightly
@settings(CI, max_examples=5_000)
@given(line=st.sampled_from(SETTABLE), value=toml_values)
def test_nightly_any_config_value_gives_a_plan_or_one_clean_error(
    tmp_path: Path, line: int, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _config_case(tmp_path, line, value, capsys, run=True)


# --- run --emulate: generated records, files and flags through a whole simulated run, in this process ----------

flag_values = st.fixed_dictionaries(
    {},
    optional={
        "--poll-interval": st.sampled_from(["0", "-1", "nan", "abc", "100ms", "0.2"]),
        "--max-cost-usd": st.sampled_from(["-1", "nan", "inf", "0", "100", "abc", "1e9"]),
        "--concurrency": st.sampled_from(["0", "-3", "1", "8", "x"]),
        "--batch-timeout": st.sampled_from(["0", "-1s", "1h", "2s"]),
        "--format": st.sampled_from(["json", "jsonl", "xml"]),
        "--route": st.sampled_from(["--realtime-only", "--batch-only"]),
    },
)
# A run's log line on stderr (the CLI's format): nothing else may reach stderr, ERROR lines and tracebacks least.
_LOG_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \| (INFO   |WARNING) \| .+")


def _emulated_run(
    tmp_path: Path, source: Path, flags: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[dict[str, Any]] | None, str]:
    """`run SOURCE --emulate FLAGS` in this process: the exit code, the output's rows (None when exit 2), stderr.

    Whatever happens, no traceback, every stderr line a log line but one final `Error:` line for exit 2, which
    leaves no output; for 0/1 every record of the file is in the output once, in order, and exit 0 means that
    every one succeeded.
    """
    output = tmp_path / "out.json"
    output.unlink(missing_ok=True)
    args = ["run", str(source), "-o", str(output), "--state-dir", str(tmp_path / "state"), "--emulate"]
    for flag, value in flags.items():
        args += [value] if flag == "--route" else [flag, value]
    with pytest.MonkeyPatch.context() as env:
        for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "PREFECT_API_URL"):
            env.delenv(name, raising=False)  # --emulate needs no key, and runs without Prefect
        try:
            code = main(args)
        except SystemExit as exc:  # argparse: a bad flag
            code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    if code == 2:
        assert lines and lines[-1].startswith("Error: "), err
        assert all(_LOG_LINE.fullmatch(line) for line in lines[:-1]), err
        assert not output.exists()
        return code, None, err
    assert code in (0, 1), err
    assert all(_LOG_LINE.fullmatch(line) for line in lines), err
    if flags.get("--format") == "jsonl":
        head, *rest = output.read_bytes().splitlines()
        run, rows = orjson.loads(head)["run"], [orjson.loads(line) for line in rest]
    else:
        written = orjson.loads(output.read_bytes())
        run, rows = written["run"], written["results"]
    assert [row["index"] for row in rows] == list(range(run["counts"]["total"]))
    assert (code == 0) == all(row["status"] == "succeeded" for row in rows)
    return code, rows, err


def _run_case(tmp_path: Path, data: bytes, flags: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "tasks.jsonl"
    source.write_bytes(data)
    _emulated_run(tmp_path, source, {"--poll-interval": "0.1", **flags}, capsys)


@settings(CI, max_examples=40)
@given(data=task_files(), flags=flag_values)
def test_generated_runs_write_every_record_or_one_clean_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, flags: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _run_case(tmp_path_factory.mktemp("run"), data, flags, capsys)


@pytest.mark.nightly
@settings(CI, max_examples=2_000)
@given(data=task_files(), flags=flag_values)
def test_nightly_generated_runs_write_every_record_or_one_clean_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, flags: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _run_case(tmp_path_factory.mktemp("run"), data, flags, capsys)


# Records in runs of 25: a run's start-up (the emulator, the ledger) is paid once for 25 generated records. Most
# records near-valid (a valid task with one or two fields generated, right or wrong) so that most runs send: the
# rest as hostile as above. Most runs realtime only: a batch takes the emulator's 2 s to end, whatever its size.
RECORDS_PER_RUN = 25
_VALID_INPUTS = {
    "classify_bulk": {"text": "The invoice total is wrong."},
    "summarize": {"document": "Disk usage rose 40% after the deploy."},
    "user_query": {"question": "Where is the orders table?"},
    "chat": {"message": "How do I rotate a key?"},
}


_VALID_TASK_TYPES = st.sampled_from(sorted(_VALID_INPUTS))
_CHANGED_PARAMS = st.lists(st.sampled_from(_PARAMS_FIELDS), max_size=2, unique_by=lambda field: field[0])


@st.composite
def near_valid_params(draw: st.DrawFn) -> dict[str, Any]:
    """Raw params that would be sent as they are, but for one or two fields generated, right or wrong."""
    params: dict[str, Any] = {"messages": [{"role": "user", "content": "Where is the orders table?"}], "max_tokens": 64}
    for key, strategy in draw(_CHANGED_PARAMS):
        params[key] = draw(strategy)
    return params


_CHANGED_FIELDS = st.lists(
    st.sampled_from([*_RECORD_FIELDS, ("params", near_valid_params()), ("params", near_valid_params())]),
    max_size=2,
    unique_by=lambda field: field[0],
)


@st.composite
def near_valid_records(draw: st.DrawFn, index: int) -> dict[str, Any]:
    task_type = draw(_VALID_TASK_TYPES)
    record = {"task_id": f"n{index}", "task_type": task_type, "input_data": dict(_VALID_INPUTS[task_type])}
    for key, strategy in draw(_CHANGED_FIELDS):
        record[key] = draw(strategy)
    return record


# One strategy per position, built once (see above): three near-valid records (a unique task_id) to one hostile.
_RECORD_SLOTS = [
    st.one_of(near_valid_records(i), near_valid_records(i), near_valid_records(i), records())
    for i in range(RECORDS_PER_RUN)
]


@st.composite
def record_runs(draw: st.DrawFn) -> list[Any]:
    return [draw(slot) for slot in _RECORD_SLOTS]


record_run_flags = st.fixed_dictionaries(
    {"--route": st.sampled_from(["--realtime-only"] * 5 + ["auto"])},
    optional={
        "--concurrency": st.sampled_from(["1", "8"]),
        "--format": st.sampled_from(["json", "jsonl"]),
        "--max-cost-usd": st.sampled_from(["0.000001", "100"]),
    },
)


def _records_case(tmp_path: Path, rows: list[Any], flags: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each generated record through `validate`, `plan` and `run --emulate`: the run rejects exactly the records
    `validate` rejects, with the same line, and every other record ends as a row (sent, or failed by the API)."""
    data = b"\n".join(orjson.dumps(row) for row in rows)
    rejected = _validate_and_plan(tmp_path, data, capsys)
    flags = {key: value for key, value in flags.items() if value != "auto"}
    code, written, _ = _emulated_run(tmp_path, tmp_path / "tasks.jsonl", {"--poll-interval": "0.1", **flags}, capsys)
    if rejected is None:  # a first line that is a JSON array: the file is read as one JSON document
        assert code == 2
        return
    if written is None:  # only a budget the plan's estimate is over stops a run of valid flags, before it sends
        assert flags.get("--max-cost-usd") == "0.000001"
        return
    assert len(written) == len(rows)
    assert [row["error"]["message"] for row in written if row["status"] == "rejected"] == rejected


@settings(CI, max_examples=40)
@given(rows=record_runs(), flags=record_run_flags)
def test_generated_records_are_rejected_as_validate_says_or_run_emulated(
    tmp_path_factory: pytest.TempPathFactory, rows: list[Any], flags: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _records_case(tmp_path_factory.mktemp("records"), rows, flags, capsys)


@pytest.mark.nightly
@settings(CI, max_examples=1_000)
@given(rows=record_runs(), flags=record_run_flags)
def test_nightly_generated_records_are_rejected_as_validate_says_or_run_emulated(
    tmp_path_factory: pytest.TempPathFactory, rows: list[Any], flags: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _records_case(tmp_path_factory.mktemp("records"), rows, flags, capsys)


def test_a_huge_tokenizer_factor_is_one_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Found by the test above: `tokenizer_factor = 1e308` overflowed the token estimate (a traceback in validate).
    line = next(n for n in SETTABLE if CONFIG_LINES[n].startswith("tokenizer_factor = "))
    _config_case(tmp_path, line, "1e308", capsys)


def test_a_template_without_placeholders_has_its_escaped_braces_rendered() -> None:
    # Found by the test above: a template with `{{` but no placeholder was returned as written, braces doubled.
    # (str.format's parser gives one literal, and no placeholder, when the only escape ends the template.)
    assert render("Close every object with }}", {}) == "Close every object with }"
    assert render("{{", {}) == "{"
