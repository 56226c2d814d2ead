"""The worker's spans of one request: queue, prefill (with the prompt tokens its cache held) and decode; of an
embedding request, one ``worker.embed`` span.

The service starts the request's span from the ``traceparent`` header of the inference message, so it joins
the controller's trace under that attempt's span. Only a recording span gets here: the engine's frames then
pass through :func:`traced_frames`, which notes when generation started and when the first token came, and
when ``Done`` arrives adds the three phase spans, timed after the fact from those moments and the engine's own
timings (its queue wait, its tokens per second; the cached tokens in ``Done.usage``). The worker roles build
their tracer here (:func:`worker_tracer`) and flush it when they stop (:func:`mlxcluster.tracing.stop_tracer`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

from mlxcluster.config import Config
from mlxcluster.errors import NodeError
from mlxcluster.protocol import Done, EmbedRequest, EmbedResult, Error, InferenceRequest, Progress, Token
from mlxcluster.tracing import Span, Tracer, TracingUnavailable, build_tracer
from mlxcluster.worker.engine_base import EngineFrame


def worker_tracer(config: Config, worker_id: str) -> Tracer:
    """The worker's tracer from ``[tracing]``; a :class:`NodeError` when it is set and the extra is missing."""
    try:
        return build_tracer(config.tracing, role="worker", instance=worker_id)
    except TracingUnavailable as exc:
        raise NodeError(str(exc)) from None


def describe_request(span: Span, request: InferenceRequest, worker_id: str) -> None:
    """The worker span's attributes known on arrival."""
    span.set("mlxcluster.worker", worker_id)
    span.set("mlxcluster.request_id", request.request_id)
    span.set("gen_ai.request.model", request.model)
    span.set("gen_ai.request.max_tokens", request.max_tokens)
    span.set("mlxcluster.continuation", request.continuation is not None)


def describe_embedding(span: Span, request: EmbedRequest, worker_id: str) -> None:
    """The ``worker.embed`` span's attributes known on arrival."""
    span.set("mlxcluster.worker", worker_id)
    span.set("mlxcluster.request_id", request.request_id)
    span.set("gen_ai.request.model", request.model)
    span.set("mlxcluster.inputs", len(request.texts or request.tokens or []))


def embedded(span: Span, result: EmbedResult) -> None:
    """The ``worker.embed`` span's outcome: its tokens and vector length, or the error."""
    if result.error is not None:
        span.fail(result.error.code)
        return
    span.set("gen_ai.usage.input_tokens", result.prompt_tokens)
    span.set("mlxcluster.dimensions", result.dimensions)


async def traced_frames(
    frames: AsyncGenerator[EngineFrame, None], span: Span, received_ns: int
) -> AsyncGenerator[EngineFrame, None]:
    """The engine's frames, unchanged; the phase spans added under ``span`` when ``Done`` passes.

    :param received_ns: when the request arrived (``time.time_ns()``): the queue span starts there.
    """
    generating_ns = time.time_ns()
    first_ns = 0
    async with contextlib.aclosing(frames):
        async for frame in frames:
            if not first_ns and (frame.__class__ is Token or (isinstance(frame, Progress) and frame.generated)):
                first_ns = time.time_ns()
            elif isinstance(frame, Done):
                now = time.time_ns()
                phase_spans(span, frame, received_ns, generating_ns, first_ns or now, now)
            elif isinstance(frame, Error):
                span.fail(frame.code)
            yield frame


def phase_spans(span: Span, done: Done, received_ns: int, generating_ns: int, first_ns: int, done_ns: int) -> None:
    """``queue`` (arrival → the engine took the request: waiting for the model, a slot, the batch), ``prefill``
    (→ first token) and ``decode`` (→ Done) under ``span``, and the request's totals on it."""
    timings, usage = done.timings, done.usage
    prefill_ns = min(generating_ns + int(timings.queue_ms * 1_000_000), first_ns)
    queue = span.child("queue", start_ns=received_ns)
    queue.set("mlxcluster.admission_wait_ms", round((generating_ns - received_ns) / 1e6, 3))
    queue.set("mlxcluster.engine_queue_ms", timings.queue_ms)
    queue.end(prefill_ns)
    prefill = span.child("prefill", start_ns=prefill_ns)
    prefill.set("gen_ai.usage.input_tokens", usage.prompt_tokens)
    prefill.set("mlxcluster.cached_tokens", usage.cached_tokens)
    prefill.set("mlxcluster.computed_tokens", max(0, usage.prompt_tokens - usage.cached_tokens))
    prefill.end(first_ns)
    decode = span.child("decode", start_ns=first_ns)
    decode.set("gen_ai.usage.output_tokens", usage.completion_tokens)
    decode.set("mlxcluster.tokens_per_second", round(timings.tokens_per_second, 3))
    decode.end(done_ns)
    span.set("gen_ai.response.finish_reasons", done.finish_reason)
    span.set("gen_ai.usage.input_tokens", usage.prompt_tokens)
    span.set("gen_ai.usage.output_tokens", usage.completion_tokens)
    span.set("mlxcluster.cached_tokens", usage.cached_tokens)
