"""A request's ``keep_alive`` (Ollama's field, on every API): how long its model stays loaded once idle."""

from __future__ import annotations

from typing import Any

from mlxcluster.controller.http.errors import bad_request
from mlxcluster.durations import parse_duration

KeepAlive = str | float | None
"""The field as a body gives it: seconds, or a duration string such as ``"5m"``; negative: for ever."""


def keep_alive_seconds(value: Any, param: str = "keep_alive") -> float | None:
    """A body's ``keep_alive`` (seconds or a duration string, Ollama's semantics) in seconds; None when absent."""
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise bad_request(f"{param}: expected seconds or a duration such as '5m'", param)
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from None
