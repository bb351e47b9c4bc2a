"""Argument types shared by the commands: durations (250ms, 2s, 5m, 1h), dollars, rates, counts; the state URL."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batch_engine.config import Config
    from batch_engine.state.url import StateUrl

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """Seconds from '2', '2s', '250ms', '5m' or '1h'."""
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number, scale = text[: -len(unit)], _DURATION_UNITS[unit]
            break
    else:
        number, scale = text, 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 250ms, 2s, 5m, 1h)") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"negative duration: {text!r}")
    return seconds


def positive_duration(text: str) -> float:
    seconds = duration(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return seconds


def dollars(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"not an amount of dollars (0 or more): {text!r}")
    return value


def rate(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: RATE must be a number between 0 and 1")
    return value


def _number(text: str) -> float:
    """The float `text` spells, or NaN (which every range check refuses)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


STATE_URL_HELP = (
    "where the run ledger and usage log live: sqlite:///DIR or postgresql://user@host/db (default: "
    "$BATCH_ENGINE_STATE_URL, else the config's state_url, else the SQLite files in --state-dir)"
)


def add_state_url(parser: argparse.ArgumentParser) -> None:
    """`--state-url`, next to a command's `--state-dir`."""
    parser.add_argument("--state-url", default=None, metavar="URL", help=STATE_URL_HELP)


def state_of(args: argparse.Namespace, config: Config | None = None) -> StateUrl:
    """The state URL of a command: --state-url, $BATCH_ENGINE_STATE_URL, the config's, or --state-dir."""
    from batch_engine.state.url import resolve_state_url

    return resolve_state_url(args.state_url, args.state_dir, None if config is None else config.state_url)
