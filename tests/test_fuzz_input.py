"""Hostile input through the loader and the CLI: whatever the file holds, the answer is tasks + rejections
(every record accounted for once) or one clean `Error:` line with exit 2 — never a traceback."""

from __future__ import annotations

import re
import string
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
    record: dict[str, Any] = {
        "task_id": draw(ids),
        "task_type": draw(st.one_of(st.sampled_from(TASK_TYPES), st.text(max_size=8), st.integers(-9, 9))),
    }
    if draw(st.booleans()):
        record["input_data"] = draw(
            st.one_of(
                st.dictionaries(st.sampled_from(["text", "document", "question", "logs", "x"]), values, max_size=4),
                values,
            )
        )
    for key, strategy in (
        ("mode", st.sampled_from(["auto", "batch", "realtime", "later", 3])),
        ("max_tokens", st.one_of(st.integers(-5, 200_000), st.text(max_size=3))),
        ("deadline", st.one_of(st.just("2026-11-23T05:00:00Z"), st.text(max_size=12), st.integers(-9, 9))),
        ("model_tier", st.sampled_from(["cheap", "capable", "premium", "gold"])),
        ("metadata", values),
        ("unknown_field", values),
    ):
        if draw(st.integers(0, 4)) == 0:
            record[key] = draw(strategy)
    return draw(st.one_of(st.just(record), st.just(record), values))


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


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=task_files())
def test_generated_files_give_tasks_and_rejections_or_one_clean_error(
    tmp_path: Path, data: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(data)
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 2:
        assert err.startswith("Error: ") and err.count("\n") == 1, err
        return
    assert code in (0, 1) and not err
    # One line per rejection, naming its record and field, then the tally: every record is counted once.
    *rejections, tally = out.splitlines()
    total, valid, rejected = map(int, re.fullmatch(r"(\d+) records: (\d+) valid, (\d+) rejected", tally).groups())
    assert valid + rejected == total and rejected == len(rejections) and (code == 1) == (rejected > 0)
    for line in rejections:
        assert re.match(r"(line|record) \d+( \(task_id [^)]*\))?: [^:]+: .+", line), line


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
