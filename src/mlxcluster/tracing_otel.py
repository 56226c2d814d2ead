"""The OpenTelemetry implementation of :mod:`mlxcluster.tracing` (the ``otel`` extra).

Imported only by :func:`mlxcluster.tracing.build_tracer` when ``[tracing]`` is configured (and by tests). Each
node has its own ``TracerProvider`` (never the process-global one): a parent-based ratio sampler, a batch
processor exporting over OTLP/HTTP (protobuf) to ``<endpoint>/v1/traces`` from its own thread, and the W3C
trace-context propagator for the ``traceparent`` headers of HTTP requests and NATS messages.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation import set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mlxcluster import __version__
from mlxcluster.config import TracingSection

if TYPE_CHECKING:  # mlxcluster.tracing imports this module when tracing is on
    from mlxcluster.tracing import AttributeValue, SpanKind

SCOPE = "mlxcluster"
TRACES_PATH = "/v1/traces"
EXPORT_TIMEOUT_S = 10.0
MAX_TRACESTATE = 512
"""Longest ``tracestate`` passed on in a span's headers (the caller's may be up to 8,192 characters): a longer
one is dropped, ``traceparent`` kept, so a caller's header cannot push a NATS message past ``max_payload``."""
_KINDS = {"internal": trace.SpanKind.INTERNAL, "server": trace.SpanKind.SERVER, "client": trace.SpanKind.CLIENT}


def traces_url(endpoint: str) -> str:
    """``<endpoint>/v1/traces``, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` is read (a URL already ending so is kept)."""
    base = endpoint.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


class OtelSpan:
    """A :class:`mlxcluster.tracing.Span` over an OpenTelemetry span."""

    __slots__ = ("_span", "_tracer", "recording")

    def __init__(self, span: trace.Span, tracer: OtelTracer) -> None:
        self._span = span
        self._tracer = tracer
        self.recording = span.is_recording()

    def set(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        self._span.add_event(name, attributes)

    def fail(self, description: str) -> None:
        self._span.set_status(Status(StatusCode.ERROR, description))

    def child(
        self,
        name: str,
        *,
        kind: SpanKind = "internal",
        start_ns: int | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> OtelSpan:
        context = set_span_in_context(self._span)
        return self._tracer.span(name, context, kind, start_ns, attributes)

    def end(self, end_ns: int | None = None) -> None:
        self._span.end(end_ns)  # the SDK ignores (and logs at debug) a second end

    def headers(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        self._tracer.propagator.inject(carrier, context=set_span_in_context(self._span))
        if len(carrier.get("tracestate", "")) > MAX_TRACESTATE:
            del carrier["tracestate"]
        return carrier


class OtelTracer:
    """A :class:`mlxcluster.tracing.Tracer` over its own OpenTelemetry ``TracerProvider``.

    :param processor: where finished spans go (tests: a ``SimpleSpanProcessor`` over an in-memory exporter).
    """

    enabled = True

    def __init__(
        self, processor: SpanProcessor, *, service_name: str, role: str, instance: str, sample_ratio: float = 1.0
    ) -> None:
        resource = Resource.create(
            {
                "service.name": f"{service_name}-{role}",
                "service.namespace": service_name,
                "service.instance.id": instance,
                "service.version": __version__,
            }
        )
        sampler = ParentBased(TraceIdRatioBased(sample_ratio))
        self.provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer(SCOPE, __version__)
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def exporting(cls, section: TracingSection, *, role: str, instance: str) -> OtelTracer:
        """A tracer batching its spans to the OTLP/HTTP collector at ``section.endpoint``."""
        return cls.with_exporter(
            OTLPSpanExporter(endpoint=traces_url(section.endpoint), timeout=EXPORT_TIMEOUT_S),
            section,
            role=role,
            instance=instance,
        )

    @classmethod
    def with_exporter(cls, exporter: SpanExporter, section: TracingSection, *, role: str, instance: str) -> OtelTracer:
        """A tracer batching its spans to ``exporter`` (the OTLP one, or a test's)."""
        return cls(
            BatchSpanProcessor(exporter),
            service_name=section.service_name,
            role=role,
            instance=instance,
            sample_ratio=section.sample_ratio,
        )

    def span(
        self,
        name: str,
        context: Context | None,
        kind: SpanKind,
        start_ns: int | None,
        attributes: Mapping[str, AttributeValue] | None,
    ) -> OtelSpan:
        started = self._tracer.start_span(
            name, context=context, kind=_KINDS[kind], attributes=attributes, start_time=start_ns or time.time_ns()
        )
        return OtelSpan(started, self)

    def start(
        self,
        name: str,
        *,
        headers: Mapping[str, str] | None = None,
        kind: SpanKind = "server",
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> OtelSpan:
        context = self.propagator.extract(headers) if headers else None
        return self.span(name, context, kind, None, attributes)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes the batch processor (bounded by the exporter's timeout)
