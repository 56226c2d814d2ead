"""Request monitoring: the requests in flight, the last N finished ones, one access-log line per request.

Built from what the dispatcher already produces: its table of live :class:`RequestMeter` objects (requests
in flight) and its :class:`RequestFinished` events (finished requests). Nothing here is on the token path:
a finished request costs a deque append (its event is kept as it is and becomes a :class:`RequestRecord`
only when someone lists it) and, when the access log is on, one log call.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from time import perf_counter

from mlxcluster.api import RequestFinished
from mlxcluster.controller.metering.request_meter import RequestMeter
from mlxcluster.protocol import RequestRecord, RequestsListing

access_log = logging.getLogger("mlxcluster.access")

LATENCY_WINDOW = 64
"""Finished requests per worker kept for its average latency."""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def live_record(meter: RequestMeter, controller: str | None = None) -> RequestRecord:
    """A request in flight, as its meter knows it now."""
    request = meter.request
    assert request is not None
    if meter.worker is None:
        state = "routing"
    elif meter.first_token is None:
        state = "waiting"
    else:
        state = "streaming"
    return RequestRecord(
        id=request.request_id,
        key=meter.key,
        model=request.model,
        worker=meter.worker,
        state=state,
        started=meter.started_wall,
        stream=request.stream,
        ttft_ms=None if meter.first_token is None else _ms(meter.first_token - meter.started),
        total_ms=_ms(perf_counter() - meter.started),
        completion_tokens=meter.completion_tokens,
        attempts=meter.attempts,
        migrations=meter.migrations,
        controller=controller,
    )


def finished_record(event: RequestFinished, controller: str | None = None) -> RequestRecord:
    """A finished request, from its event."""
    return RequestRecord(
        id=event.request_id,
        key=event.key,
        model=event.model if event.model_known else "(unknown)",
        worker=event.worker,
        state=event.status,
        started=event.started or event.time - event.duration_s,
        stream=event.stream,
        queued_ms=_ms(event.queue_s),
        ttft_ms=_ms(event.ttft_s),
        total_ms=_ms(event.duration_s),
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        finish_reason=event.finish_reason,
        error=event.error,
        attempts=event.attempts,
        migrations=event.migrations,
        controller=controller,
    )


class RequestLog:
    """The last ``size`` finished requests, average latency per worker, and the access log."""

    def __init__(self, size: int = 200, controller_id: str | None = None) -> None:
        self.controller_id = controller_id
        """Named in each listed record (the tier's monitor shows which process served it)."""
        self.finished: deque[RequestFinished] = deque(maxlen=size)
        """The events of the latest finished requests, oldest first (records are made when listed)."""
        self._latency: dict[str, deque[tuple[float, float | None]]] = {}

    def on_finished(self, event: RequestFinished) -> None:
        """Record one finished request and write its access-log line."""
        self.finished.append(event)
        if event.worker is not None and event.status == "ok":
            window = self._latency.get(event.worker)
            if window is None:
                window = self._latency[event.worker] = deque(maxlen=LATENCY_WINDOW)
            window.append((event.duration_s, event.ttft_s))
        if access_log.isEnabledFor(logging.INFO):
            _log_access(finished_record(event))

    def latency(self, worker_id: str) -> dict[str, float | None]:
        """Average total and first-token latency (ms) of the worker's latest successful requests."""
        window = self._latency.get(worker_id)
        if not window:
            return {"avg_latency_ms": None, "avg_ttft_ms": None, "latency_samples": 0}
        ttfts = [t for _, t in window if t is not None]
        return {
            "avg_latency_ms": round(sum(d for d, _ in window) / len(window) * 1000, 2),
            "avg_ttft_ms": round(sum(ttfts) / len(ttfts) * 1000, 2) if ttfts else None,
            "latency_samples": len(window),
        }

    def forget_worker(self, worker_id: str) -> None:
        """Drop a forgotten worker's latency window."""
        self._latency.pop(worker_id, None)

    def listing(
        self,
        live: Mapping[str, RequestMeter],
        *,
        key: str | None = None,
        limit: int | None = None,
        state: str | None = None,
    ) -> RequestsListing:
        """In-flight (oldest first) and recent requests (newest first), only those of ``key`` when given."""
        own = self.controller_id
        in_flight = [live_record(m, own) for m in list(live.values()) if m.request is not None]
        recent = [finished_record(event, own) for event in reversed(self.finished)]
        if key is not None:
            in_flight = [r for r in in_flight if r.key == key]
            recent = [r for r in recent if r.key == key]
        if state is not None:
            in_flight = [r for r in in_flight if r.state == state]
            recent = [r for r in recent if r.state == state]
        in_flight.sort(key=lambda r: r.started)
        if limit is not None:
            recent = recent[:limit]
        return RequestsListing(
            controller_id=own or "", in_flight=in_flight, recent=recent, recent_capacity=self.finished.maxlen or 0
        )


def _log_access(record: RequestRecord) -> None:
    """One line per request: readable text, and every field as JSON keys with ``logging.format = "json"``."""
    fields = {
        "request_id": record.id,
        "key": record.key,
        "model": record.model,
        "worker": record.worker,
        "status": record.state,
        "queued_ms": record.queued_ms,
        "ttft_ms": record.ttft_ms,
        "total_ms": record.total_ms,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "finish_reason": record.finish_reason,
        "error": record.error,
        "attempts": record.attempts,
        "migrations": record.migrations,
        "stream": record.stream,
    }
    text = " ".join(f"{name}={value}" for name, value in fields.items() if value is not None)
    access_log.info("request %s", text, extra={"access": True, **fields})
