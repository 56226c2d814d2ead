"""Request tracing: the small interface the controller and the worker trace through, and its no-op implementation.

A node builds one :class:`Tracer` when it starts (:func:`build_tracer`) and hands it to the parts that trace
(the controller app, the dispatcher, the worker service). With ``[tracing]`` off that is a :class:`NoTracer`:
nothing of OpenTelemetry is imported, every span is one shared :class:`NoSpan` whose methods do nothing, and
code that would compute attributes first asks ``span.recording``. With it on, it is
:class:`mlxcluster.tracing_otel.OtelTracer` (the ``otel`` extra).

Spans are explicit objects handed down (``span.child(...)``), never a "current span" in a context variable:
a request's frames are relayed by async generators that suspend and resume, where an implicit context would
leak between requests. Trace context crosses NATS as W3C ``traceparent`` message headers
(:meth:`Span.headers`, :meth:`Tracer.start` with ``headers=``). The one context variable is
:data:`REQUEST_SPAN`: the HTTP span of the request whose handler runs, which admission and dispatch start
their spans under.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Literal, Protocol

from mlxcluster.config import TracingSection, redact_url

if TYPE_CHECKING:
    from mlxcluster.tracing_otel import OtelTracer

AttributeValue = str | bool | int | float
SpanKind = Literal["internal", "server", "client"]

OTEL_EXTRA = "mlxcluster[otel]"


class TracingUnavailable(Exception):
    """``[tracing]`` is configured but OpenTelemetry is not installed (or the exporter cannot be built)."""


class Span(Protocol):
    """One timed operation of a request."""

    recording: bool
    """Whether attributes set on this span are kept (False: no-op, or not sampled): compute them only if so."""

    def set(self, key: str, value: AttributeValue) -> None:
        """Set one attribute."""

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        """Record a point in time (first token, migration) on this span."""

    def fail(self, description: str) -> None:
        """Mark the span as failed, saying why."""

    def child(
        self,
        name: str,
        *,
        kind: SpanKind = "internal",
        start_ns: int | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Span:
        """Start a span under this one (``start_ns``: a start in the past, in ``time.time_ns()`` units)."""
        ...

    def end(self, end_ns: int | None = None) -> None:
        """End the span (now, or at ``end_ns``); ending twice does nothing."""

    def headers(self) -> dict[str, str] | None:
        """This span's trace context as message headers (``traceparent``, ``tracestate``); ``None`` when off."""


class Tracer(Protocol):
    """Starts the first span of a request on this node."""

    enabled: bool

    def start(
        self,
        name: str,
        *,
        headers: Mapping[str, str] | None = None,
        kind: SpanKind = "server",
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Span:
        """Start a span whose parent is the trace context in ``headers`` (an HTTP request's or a NATS
        message's), or a new trace without one."""
        ...

    def shutdown(self) -> None:
        """Export what is buffered and stop exporting."""


REQUEST_SPAN: ContextVar[Span | None] = ContextVar("mlxcluster_request_span", default=None)
"""The inference request's HTTP span while its handler runs, set by the controller's tracing middleware
(``None``: tracing off, or not an HTTP request)."""


class NoSpan:
    """The span of a node that does not trace: every method does nothing."""

    __slots__ = ()
    recording = False

    def set(self, key: str, value: AttributeValue) -> None:
        pass

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        pass

    def fail(self, description: str) -> None:
        pass

    def child(
        self,
        name: str,
        *,
        kind: SpanKind = "internal",
        start_ns: int | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> NoSpan:
        return self

    def end(self, end_ns: int | None = None) -> None:
        pass

    def headers(self) -> None:
        return None


class NoTracer:
    """The tracer of a node with ``[tracing]`` off."""

    enabled = False

    def __init__(self) -> None:
        self.span = NoSpan()
        """The one span every :meth:`start` returns."""

    def start(
        self,
        name: str,
        *,
        headers: Mapping[str, str] | None = None,
        kind: SpanKind = "server",
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> NoSpan:
        return self.span

    def shutdown(self) -> None:
        pass


def request_span(tracer: Tracer, name: str, *, request_id: str, model: str) -> Span:
    """A request's span on the controller: under the HTTP request's span (:data:`REQUEST_SPAN`), or the first
    of a trace without one (a WebSocket message); with the request's id and model."""
    parent = REQUEST_SPAN.get()
    span = tracer.start(name, kind="internal") if parent is None else parent.child(name)
    if span.recording:
        span.set("mlxcluster.request_id", request_id)
        span.set("gen_ai.request.model", model)
    return span


def build_tracer(section: TracingSection, *, role: str, instance: str) -> Tracer:
    """The node's tracer: a :class:`NoTracer` while ``tracing.endpoint`` is empty, otherwise one exporting
    over OTLP/HTTP. Raises :class:`TracingUnavailable` naming the extra when OpenTelemetry is missing.

    :param role: ``controller`` or ``worker``, appended to the service name.
    :param instance: this node's id (``service.instance.id``).
    """
    if not section.enabled:
        return NoTracer()
    return _otel_tracer_class(section).exporting(section, role=role, instance=instance)


async def stop_tracer(tracer: Tracer) -> None:
    """Export the spans still buffered when a node stops (in a thread: the export is blocking HTTP)."""
    if tracer.enabled:
        await asyncio.to_thread(tracer.shutdown)


def check_tracing(section: TracingSection) -> None:
    """Raise :class:`TracingUnavailable` when ``[tracing]`` is on and the ``otel`` extra is missing: a node checks
    it before it starts anything (connecting to NATS, loading a model)."""
    if section.enabled:
        _otel_tracer_class(section)


def _otel_tracer_class(section: TracingSection) -> type[OtelTracer]:
    try:
        from mlxcluster.tracing_otel import OtelTracer
    except ImportError as exc:
        raise TracingUnavailable(
            f"tracing.endpoint is set ({redact_url(section.endpoint)}) but OpenTelemetry is not installed "
            f"({exc.name or exc}): install the extra with  pip install '{OTEL_EXTRA}'  or leave tracing.endpoint empty"
        ) from None
    return OtelTracer
