"""Argument types shared by the commands: durations (250ms, 2s, 5m, 1h), dollars, rates, counts."""

from __future__ import annotations

import argparse
import math

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
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"not an amount of dollars (0 or more): {text!r}")
    return value


def rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: RATE must be a number between 0 and 1")
    return rate


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value
