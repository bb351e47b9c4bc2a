"""Pure: the report's recommended changes written into the config's own TOML text — every other line, comment
and key kept — each changed line carrying a comment that says why and what it saves."""

from __future__ import annotations

import re
from collections.abc import Sequence

from batch_engine.config import Config, parse_config
from batch_engine.errors import ConfigError
from batch_engine.files import dumps
from batch_engine.telemetry.advice import ConfigChange, ConfigValue, Period, Recommendation, usd

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[")


def toml_value(value: ConfigValue) -> str:
    """A config value as TOML (an inline table for thinking)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return dumps(value).decode()  # a JSON string is a valid TOML basic string
    fields = value.model_dump(exclude_none=True)
    return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in fields.items()) + " }"


def change_comment(rec: Recommendation, period: Period) -> str:
    """The comment on a changed line: what the report saw and what the change saves, per month."""
    change = rec.config_change
    was = f"was {toml_value(change.old)}. " if change is not None else ""
    if rec.kind == "saving":
        what = (
            f"saves ~{usd(period.monthly(rec.saved_usd))}/month at the log's volume "
            f"({usd(period.monthly(rec.before_usd))} → {usd(period.monthly(rec.after_usd))})"
        )
    elif rec.kind == "budget":
        what = "frees budget only: unused max_tokens is not billed"
    elif rec.kind == "trial":
        what = f"{usd(period.monthly(rec.at_stake_usd))}/month of thinking at stake; try on a sample first"
    else:
        what = "same bill"
    return f"report: {was}{rec.reason}; {what}"


def _table_name(line: str) -> tuple[str, ...] | None:
    match = _HEADER.match(line)
    if match is None or _ARRAY_HEADER.match(line):
        return None
    return tuple(part.strip().strip('"').strip("'") for part in match.group(1).split("."))


def apply_changes(text: str, config: Config, changes: Sequence[tuple[ConfigChange, str]], source: str) -> str:
    """`text` (the TOML `config` was loaded from) with each change set in its `[task_types.<name>]` table and
    commented; the result is checked to load as exactly `config` with the changes applied."""
    lines = text.splitlines()
    for change, comment in changes:
        lines = _set_key(lines, change, comment, source)
    written = "\n".join(lines) + "\n"
    expected = _applied(config, [change for change, _ in changes])
    try:
        loaded = parse_config(written, source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: the recommended changes do not fit this file's layout ({exc})") from exc
    if loaded != expected:
        raise ConfigError(f"{source}: the recommended changes do not fit this file's layout; apply them by hand")
    return written


def _set_key(lines: list[str], change: ConfigChange, comment: str, source: str) -> list[str]:
    table = ("task_types", change.task_type)
    start = next((i for i, line in enumerate(lines) if _table_name(line) == table), None)
    if start is None:
        raise ConfigError(f"{source}: no [task_types.{change.task_type}] table to write the change into")
    end = next(
        (i for i in range(start + 1, len(lines)) if _table_name(lines[i]) or _ARRAY_HEADER.match(lines[i])),
        len(lines),
    )
    key = re.compile(rf"^(\s*)(?:{re.escape(change.key)}|\"{re.escape(change.key)}\")\s*=")
    new = f"{change.key} = {toml_value(change.new)}  # {comment}"
    for i in range(start + 1, end):
        match = key.match(lines[i])
        if match:
            return [*lines[:i], match.group(1) + new, *lines[i + 1 :]]
    # Not set: the key took its default; set it right under the table's header.
    return [*lines[: start + 1], new, *lines[start + 1 :]]


def _applied(config: Config, changes: Sequence[ConfigChange]) -> Config:
    task_types = dict(config.task_types)
    for change in changes:
        task_types[change.task_type] = task_types[change.task_type].model_copy(update={change.key: change.new})
    return config.model_copy(update={"task_types": task_types})
