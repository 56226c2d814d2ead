"""Timing one request as the dispatcher relays it, for the :class:`RequestFinished` event.

Kept cheap for the hot path: one ``perf_counter()`` and a few additions per token frame, one Struct per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from time import perf_counter

from mlxcluster.api import (
    MAX_INTER_TOKEN_SAMPLES,
    MetricsEvent,
    RequestFinished,
    RequestStatus,
)
from mlxcluster.controller.metering.keys import CURRENT_KEY
from mlxcluster.protocol import Done, Error, InferenceRequest, Token

EventSink = Callable[[MetricsEvent], None]
"""Where the dispatcher sends events (the app's :class:`~mlxcluster.controller.metering.metrics_feed.MetricsFeed`)."""


def discard(_event: MetricsEvent) -> None:
    """The sink used when nobody listens."""


class RequestMeter:
    """Start time, first token, gaps between token frames, token counts and the outcome of one request."""

    __slots__ = (
        "started",
        "first_token",
        "last_token",
        "gaps",
        "completion_tokens",
        "prompt_tokens",
        "cached_tokens",
        "worker",
        "status",
        "error",
        "attempts",
        "model_known",
        "key",
        "finish_reason",
        "queue_s",
        "migrations",
        "request",
        "started_wall",
        "dispatched",
        "error_frame",
        "unmoved",
        "tokens_per_second",
        "_live",
    )

    def __init__(self, request: InferenceRequest | None = None, live: dict[str, RequestMeter] | None = None) -> None:
        """``live``: the table of requests in flight; this meter is in it from now until :meth:`finished`."""
        self.started = perf_counter()
        self.started_wall = time.time()
        self.request = request
        self.key = CURRENT_KEY.get()
        self.finish_reason: str | None = None
        self.queue_s: float | None = None
        self.migrations = 0
        self.dispatched = False
        self.error_frame = False
        self.unmoved = False
        self.tokens_per_second = 0.0
        self._live = live
        if live is not None and request is not None:
            live[request.request_id] = self
        self.first_token: float | None = None
        self.last_token = 0.0
        self.gaps: list[float] = []
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.worker: str | None = None
        self.status: RequestStatus | None = None
        self.error: str | None = None
        self.attempts = 0
        self.model_known = True

    def frame(self, frame: Token | Done | Error) -> None:
        """Account for one relayed frame."""
        if frame.__class__ is Token:  # the hot case: no isinstance chain
            now = perf_counter()
            count = frame.count or 1
            if self.last_token:  # a Token frame came before: a gap between tokens
                if len(self.gaps) < MAX_INTER_TOKEN_SAMPLES:
                    self.gaps.append((now - self.last_token) / count)
            elif self.first_token is None:
                self.first_token = now
            self.last_token = now
            self.completion_tokens += count
        elif isinstance(frame, Done):
            self.status = "ok"
            self.finish_reason = frame.finish_reason
            self.queue_s = frame.timings.queue_ms / 1000 if frame.timings.queue_ms else None
            usage = frame.usage
            self.prompt_tokens = usage.prompt_tokens
            self.cached_tokens = usage.cached_tokens
            self.completion_tokens = usage.completion_tokens or self.completion_tokens
            self.tokens_per_second = frame.timings.tokens_per_second
        elif isinstance(frame, Error):
            self.status, self.error = "error", frame.code
            self.error_frame = True

    def generating(self) -> None:
        """The worker reports tokens generated whose text it holds (a tool call being parsed): the first
        token, if none came before. The gaps between tokens still start at the first Token frame."""
        if self.first_token is None:
            self.first_token = perf_counter()

    def retrying(self) -> None:
        """The request starts over on another worker before any token reached the client: what the worker
        given up on generated is not the answer, so it marks no first token."""
        if not self.last_token:
            self.first_token = None

    def ended(self, exc: BaseException) -> None:
        """The stream stopped with ``exc``: the consumer left (cancelled) or an error was raised."""
        if isinstance(exc, GeneratorExit | asyncio.CancelledError):
            self.cancel()
        else:
            self.fail(getattr(exc, "code", None) or type(exc).__name__)

    def fail(self, code: str | None) -> None:
        """The request ended with an error raised to the route (404, 503, 504...)."""
        if self.status is None:
            self.status, self.error = "error", code or "error"

    def cancel(self) -> None:
        """The consumer left before the stream ended (client gone, handler cancelled)."""
        if self.status is None:
            self.status = "cancelled"

    def finished(self, request: InferenceRequest) -> RequestFinished:
        """The event for this request; a stream that ended without Done or Error counts as an error."""
        now = perf_counter()
        if self._live is not None:
            self._live.pop(request.request_id, None)
        status: RequestStatus = self.status or "error"
        error = self.error if self.status is not None else "incomplete_stream"
        return RequestFinished(
            time=time.time(),
            request_id=request.request_id,
            model=request.model,
            worker=self.worker,
            status=status,
            error=error if status == "error" else None,
            duration_s=now - self.started,
            ttft_s=None if self.first_token is None else self.first_token - self.started,
            inter_token_s=tuple(self.gaps),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
            attempts=self.attempts,
            stream=request.stream,
            model_known=self.model_known,
            key=self.key,
            finish_reason=self.finish_reason,
            queue_s=self.queue_s,
            started=self.started_wall,
            migrations=self.migrations,
            dispatched=self.dispatched,
            error_frame=self.error_frame,
            unmoved=self.unmoved,
            tokens_per_second=self.tokens_per_second,
        )
