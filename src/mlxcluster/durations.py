"""Durations as Ollama's ``keep_alive`` takes them: a number of seconds, or a Go-style string (``"5m"``,
``"1h30m"``, ``"90s"``, ``"250ms"``, ``"-1"``). Shared by the config and the controller's request parsing."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")


def parse_duration(value: str | float | int) -> float:
    """Seconds from a number or a duration string; negative means "for ever" (returned as is).

    :raises ValueError: naming what is wrong (an empty string, an unknown unit, not a finite number).
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as '5m', not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError("a duration must be a finite number of seconds")
        return seconds
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if not body:
        raise ValueError("a duration cannot be empty: give seconds or a string such as '5m'")
    total, position = 0.0, 0
    for match in _PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(body):
        raise ValueError(f"{value!r} is not a duration: use seconds or units ms, s, m, h (e.g. '5m', '1h30m')")
    return sign * total
