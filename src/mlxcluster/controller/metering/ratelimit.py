"""Per-key rate limits: requests per minute, tokens per minute, requests at once.

Both per-minute limits are sliding windows of the last 60 seconds (as LiteLLM's ``rpm_limit`` /
``tpm_limit``): a request is admitted while fewer than ``rpm`` requests started in the window and fewer
than ``tpm`` tokens (prompt + completion, counted when a request finishes) were used in it. A refusal is a
429 with ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers, which every admitted response of a
limited key carries too.

With shared state a :class:`ClusterWindows` (``controller/shared/limits.py``) is set as
:attr:`RateLimiter.cluster`: admission then goes to it (:meth:`RateLimiter.admit_async`) and so do release,
token accounting and the snapshot, so the limits hold across every controller. Without it nothing changes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.metering.keys import ApiKey

WINDOW_S = 60.0


@dataclass(slots=True)
class _KeyWindow:
    """The recent activity of one key."""

    starts: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    tokens_used: int = 0
    reserved: int = 0
    """``max_tokens`` of the requests running now: counted against ``tpm`` until each one finishes."""
    running: int = 0

    def prune(self, now: float) -> None:
        horizon = now - WINDOW_S
        while self.starts and self.starts[0] <= horizon:
            self.starts.popleft()
        while self.tokens and self.tokens[0][0] <= horizon:
            self.tokens_used -= self.tokens.popleft()[1]


class RateLimited(ApiError):
    """A 429 carrying the rate-limit headers."""

    def __init__(self, message: str, kind: str, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(429, message, type=kind, code="rate_limit_exceeded", retry_after=max(1.0, retry_after))
        self.headers = headers

    def response(self) -> web.Response:
        """The 429 with ``Retry-After`` in whole seconds (rounded up) and the ``x-ratelimit-*`` headers."""
        response = super().response()
        response.headers["Retry-After"] = str(max(1, math.ceil(self.retry_after or 1)))
        response.headers.update(self.headers)
        return response


def format_reset(seconds: float) -> str:
    """OpenAI's duration format for ``x-ratelimit-reset-*``: ``20ms``, ``6s``, ``1m30s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3g}s" if rest < 10 else f"{round(rest)}s"
    return f"{int(minutes)}m{text}" if minutes else text


class ClusterWindows(Protocol):
    """Limits enforced across controllers (``controller/shared/limits.ClusterLimits``)."""

    async def admit(self, key: ApiKey, reserve: int = 0) -> dict[str, str]: ...

    def release(self, key: ApiKey, reserve: int = 0) -> None: ...

    def record_tokens(self, key_name: str, tokens: int) -> None: ...

    def running(self, key: ApiKey) -> int: ...

    def snapshot(self, key: ApiKey) -> dict[str, int | None]: ...


class RateLimiter:
    """Admission and accounting for every limited key (unlimited keys cost nothing)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _KeyWindow] = {}
        self.cluster: ClusterWindows | None = None
        """Set while shared state is on: the cluster-wide limits every call goes to instead."""

    async def admit_async(self, key: ApiKey, reserve: int = 0) -> dict[str, str]:
        """:meth:`admit`, cluster-wide while :attr:`cluster` is set (which may lease from JetStream)."""
        if self.cluster is None:
            return self.admit(key, reserve)
        return await self.cluster.admit(key, reserve)

    def _window(self, key: ApiKey) -> _KeyWindow:
        window = self._windows.get(key.name)
        if window is None:
            window = self._windows[key.name] = _KeyWindow()
        return window

    def admit(self, key: ApiKey, reserve: int = 0) -> dict[str, str]:
        """Start one request of ``key`` or raise :class:`RateLimited`; return the headers to send.

        ``reserve`` (the request's ``max_tokens``) counts against ``tpm`` while the request runs, so many
        long requests started at once cannot each take the whole budget. Every admitted request must be
        followed by exactly one :meth:`release` with the same ``reserve``.
        """
        if not key.limited:
            return {}
        now = self._clock()
        window = self._window(key)
        window.prune(now)
        headers = self._headers(key, window, now, starting=1, reserve=reserve)
        if key.rpm is not None and len(window.starts) >= key.rpm:
            wait = window.starts[0] + WINDOW_S - now
            raise RateLimited(
                f"Rate limit reached for key '{key.name}' on requests per min (RPM): limit {key.rpm}, "
                f"used {len(window.starts)}. Please try again in {format_reset(wait)}.",
                "requests",
                wait,
                headers,
            )
        if key.tpm is not None and window.tokens_used + window.reserved >= key.tpm:
            wait = self._tokens_reset(key, window, now) if window.tokens_used >= key.tpm else 1.0
            raise RateLimited(
                f"Rate limit reached for key '{key.name}' on tokens per min (TPM): limit {key.tpm}, "
                f"used {window.tokens_used}, reserved by running requests {window.reserved}. "
                f"Please try again in {format_reset(wait)}.",
                "tokens",
                wait,
                headers,
            )
        if key.max_concurrent is not None and window.running >= key.max_concurrent:
            raise RateLimited(
                f"Key '{key.name}' already has {window.running} request(s) running, its max_concurrent limit",
                "requests",
                1.0,
                headers,
            )
        window.starts.append(now)
        window.running += 1
        window.reserved += reserve
        return headers

    def release(self, key: ApiKey, reserve: int = 0) -> None:
        """One admitted request of ``key`` ended (its actual tokens come through :meth:`record_tokens`)."""
        if self.cluster is not None:
            self.cluster.release(key, reserve)
            return
        window = self._windows.get(key.name)
        if window is not None and window.running > 0:
            window.running -= 1
            window.reserved = max(0, window.reserved - reserve)

    def record_tokens(self, key_name: str, tokens: int) -> None:
        """Count ``tokens`` (prompt + completion) of a finished request against the key's TPM window."""
        if self.cluster is not None:
            self.cluster.record_tokens(key_name, tokens)
            return
        window = self._windows.get(key_name)
        if window is None or tokens <= 0:
            return
        window.tokens.append((self._clock(), tokens))
        window.tokens_used += tokens

    def running(self, key: ApiKey) -> int:
        """Requests of ``key`` running now."""
        if self.cluster is not None:
            return self.cluster.running(key)
        window = self._windows.get(key.name)
        return window.running if window is not None else 0

    def snapshot(self, key: ApiKey) -> dict[str, int | None]:
        """The key's use of its windows now: requests and tokens in the last minute, running."""
        if self.cluster is not None:
            return self.cluster.snapshot(key)
        window = self._windows.get(key.name)
        if window is None:
            return {"requests_last_minute": 0, "tokens_last_minute": 0, "tokens_reserved": 0, "running": 0}
        window.prune(self._clock())
        return {
            "requests_last_minute": len(window.starts),
            "tokens_last_minute": window.tokens_used,
            "tokens_reserved": window.reserved,
            "running": window.running,
        }

    def _tokens_reset(self, key: ApiKey, window: _KeyWindow, now: float) -> float:
        """Seconds until the window's tokens fall below ``tpm`` again."""
        assert key.tpm is not None
        used = window.tokens_used
        for at, count in window.tokens:
            if used < key.tpm:
                break
            used -= count
            if used < key.tpm:
                return max(0.0, at + WINDOW_S - now)
        return 0.0

    def _headers(self, key: ApiKey, window: _KeyWindow, now: float, starting: int, reserve: int = 0) -> dict[str, str]:
        """OpenAI's headers; a reset is the time until the next unit of the limit frees up."""
        headers: dict[str, str] = {}
        if key.rpm is not None:
            oldest = window.starts[0] if window.starts else now
            headers["x-ratelimit-limit-requests"] = str(key.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - len(window.starts) - starting))
            headers["x-ratelimit-reset-requests"] = format_reset(oldest + WINDOW_S - now)
        if key.tpm is not None:
            if window.tokens_used >= key.tpm:
                reset = self._tokens_reset(key, window, now)
            else:
                reset = window.tokens[0][0] + WINDOW_S - now if window.tokens else 0.0
            headers["x-ratelimit-limit-tokens"] = str(key.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(
                max(0, key.tpm - window.tokens_used - window.reserved - reserve)
            )
            headers["x-ratelimit-reset-tokens"] = format_reset(reset)
        return headers
