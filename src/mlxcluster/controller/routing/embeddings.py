"""Embedding requests: split into parts that fit the bus, each sent to a worker serving the model, with failover.

An embedding request is one NATS request/reply per part (``worker.<id>.embed``): no stream. A request's
inputs are split so that each part's request and its answer fit ``max_payload`` (the answer's size follows
from the model's vector length, which its catalogue entry gives); the parts go out concurrently, each to the
worker the balancer picks (a worker then batches the inputs of every part and request it holds). A part that
gets no answer, "no responders", a retryable error or a malformed answer (not one vector of the expected length
per input: counted in the bus's invalid messages) is tried on another worker, never the same one twice, up
to ``controller.max_attempts``; a model loaded nowhere is loaded first, as for chat. Once a part fails, its
siblings are cancelled (a ``Cancel`` tells their workers to skip inputs not computed yet), as they are when
the client leaves. Breakers count a worker's failures as dispatch does (not those of our own bus outage), and
every try ends a half-open trial. Every request ends with one :class:`~mlxcluster.api.RequestFinished` event
(the tokens of the parts computed as prompt tokens, even when another part failed), so key usage and the
``tpm`` limit count embedding tokens like any others; a request refused before anything was sent (413) is
not counted as dispatched. With tracing on, a request is an ``embed`` span (under the HTTP request's) with a
``pick`` and an ``attempt`` span per try of each part; the attempt's trace context travels in the NATS
message's headers, so the worker's ``worker.embed`` span joins it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from time import perf_counter
from typing import Protocol

import msgspec

from mlxcluster.api import Balancer, RequestFinished, WorkerView
from mlxcluster.bus import Bus, BusError
from mlxcluster.config import ControllerSection
from mlxcluster.controller.http.errors import ApiError, no_capacity, payload_too_large
from mlxcluster.controller.metering.keys import CURRENT_KEY
from mlxcluster.controller.metering.request_meter import EventSink, discard
from mlxcluster.controller.routing.breaker import Breakers
from mlxcluster.controller.routing.dispatch import SUBJECT_HEADROOM, pick_worker
from mlxcluster.protocol import Cancel, EmbedRequest, EmbedResult, Error, InferenceRequest, encode
from mlxcluster.tracing import NoTracer, Span, Tracer, request_span

log = logging.getLogger(__name__)

VECTOR_OVERHEAD = 8
"""JSON bytes around one base64 vector (quotes, comma)."""
MAX_PART_INPUTS = 256
"""Inputs per part at most: a worker's batch thread takes them together anyway."""
DEFAULT_DIMENSIONS = 4096
"""The vector length assumed when the catalogue does not give it (sizes the parts)."""


class Registry(Protocol):
    """The registry calls embedding dispatch makes."""

    def eligible(self, model: str, exclude: Collection[str] = ...) -> list[WorkerView]: ...
    def loaded_somewhere(self, model: str) -> bool: ...
    def loadable_somewhere(self, model: str) -> bool: ...
    def begin(self, worker_id: str) -> None: ...
    def end(self, worker_id: str) -> None: ...


class Loader(Protocol):
    async def ensure_loaded(self, model: str) -> str: ...


@dataclass(slots=True)
class Embedded:
    """A whole request's answer: one vector per input, in order (little-endian float32 bytes)."""

    vectors: list[bytes]
    dimensions: int
    prompt_tokens: int
    workers: list[str]


class EmbeddingDispatcher:
    """Sends embedding requests to workers (see the module docstring)."""

    def __init__(
        self,
        *,
        bus: Bus,
        registry: Registry,
        balancer: Balancer,
        config: ControllerSection,
        breakers: Breakers | None = None,
        loader: Loader | None = None,
        events: EventSink = discard,
        tracer: Tracer | None = None,
        strategy: str = "",
    ) -> None:
        self.bus = bus
        self.registry = registry
        self.balancer = balancer
        self.config = config
        self.breakers = breakers or Breakers()
        self.loader = loader
        self.events = events
        self.tracer: Tracer = tracer or NoTracer()
        """Spans of each request (embed, pick, attempt); a no-op tracer with ``[tracing]`` off."""
        self.strategy = strategy
        """The balancer's name, for the pick span."""

    def parts(self, request: EmbedRequest, dimensions: int) -> list[EmbedRequest]:
        """``request`` split so that each part and its answer fit the bus (413 for one input that cannot)."""
        limit = self.bus.max_payload - SUBJECT_HEADROOM
        vector_bytes = 4 * ((4 * (dimensions or DEFAULT_DIMENSIONS) + 2) // 3) + VECTOR_OVERHEAD
        per_part = max(1, min(MAX_PART_INPUTS, (limit - 512) // vector_bytes))
        items: list[str] | list[list[int]] = request.texts if request.texts is not None else request.tokens or []
        base = len(encode(msgspec.structs.replace(request, texts=None, tokens=None)))
        parts: list[EmbedRequest] = []
        start = 0
        while start < len(items):
            size, end = base, start
            while end < len(items) and end - start < per_part:
                item_bytes = len(msgspec.json.encode(items[end])) + 1
                if size + item_bytes > limit:
                    break
                size += item_bytes
                end += 1
            if end == start:
                raise payload_too_large(base + len(msgspec.json.encode(items[start])), self.bus.max_payload)
            chunk = items[start:end]
            parts.append(
                msgspec.structs.replace(
                    request,
                    request_id=f"{request.request_id}.{len(parts)}",
                    texts=chunk if request.texts is not None else None,
                    tokens=chunk if request.texts is None else None,
                )
            )
            start = end
        return parts

    async def embed(self, request: EmbedRequest, dimensions: int = 0) -> Embedded:
        """Every input's vector (``dimensions``: the model's vector length, to size the parts).

        :raises ApiError: the first failed part's error (a 400 naming the field for the request's own fault).
        """
        started, wall = perf_counter(), time.time()
        key = CURRENT_KEY.get()
        span = self._request_span(request)
        tasks: list[asyncio.Task[EmbedResult]] = []
        dispatched = False
        error: str | None = None
        try:
            expected = request.dimensions or dimensions
            parts = self.parts(request, expected)
            dispatched = True
            if span.recording:
                span.set("mlxcluster.parts", len(parts))
            try:
                async with asyncio.TaskGroup() as group:  # one part failing cancels the others
                    tasks = [group.create_task(self._part(part, expected, span)) for part in parts]
            except BaseExceptionGroup as failed:
                raise first_error(failed) from None
            results = [task.result() for task in tasks]
            vectors = [vector for result in results for vector in result.vectors]
            tokens, workers = _computed(tasks)
            return Embedded(vectors, results[0].dimensions if results else 0, tokens, workers)
        except ApiError as exc:
            error = exc.code or "error"
            raise
        except BaseException:
            error = "cancelled"
            raise
        finally:
            tokens, workers = _computed(tasks)
            if span.recording:
                span.set("mlxcluster.status", "ok" if error is None else error)
                span.set("gen_ai.usage.input_tokens", tokens)
                if error is not None:
                    span.fail(error)
            span.end()
            self.events(
                RequestFinished(
                    time=time.time(),
                    request_id=request.request_id,
                    model=request.model,
                    worker=workers[0] if workers else None,
                    status="ok" if error is None else ("cancelled" if error == "cancelled" else "error"),
                    error=error if error not in (None, "cancelled") else None,
                    duration_s=perf_counter() - started,
                    prompt_tokens=tokens,
                    stream=False,
                    key=key,
                    started=wall,
                    dispatched=dispatched,
                )
            )

    def _request_span(self, request: EmbedRequest) -> Span:
        """The embed span: under the HTTP request's span, or the first of a trace."""
        span = request_span(self.tracer, "embed", request_id=request.request_id, model=request.model)
        if span.recording:
            span.set("mlxcluster.inputs", len(request.texts or request.tokens or []))
        return span

    async def _part(self, part: EmbedRequest, dimensions: int, span: Span) -> EmbedResult:
        """One part's answer from the first worker that gives one (``dimensions``: the vector length expected,
        0 when not known; ``span``: the request's, under which each try's pick and attempt spans go)."""
        tried: set[str] = set()
        reasons: list[str] = []
        pick_request = InferenceRequest(request_id=part.request_id, model=part.model, stream=False)
        for attempt in range(1, self.config.max_attempts + 1):
            pick = span.child("pick")
            try:
                worker = self._pick(pick_request, tried, pick)
                if worker is None and attempt == 1 and self.loader is not None:
                    if not self.registry.loaded_somewhere(part.model) and self.registry.loadable_somewhere(part.model):
                        await self.loader.ensure_loaded(part.model)  # a 503 when it cannot
                        worker = self._pick(pick_request, tried, pick)
            finally:
                pick.end()
            if worker is None:
                break
            tried.add(worker.id)
            result = await self._attempt(part, worker.id, dimensions, span, attempt)
            if result.error is None:
                return result
            if not result.error.retryable:
                raise embed_error(result.error)
            reasons.append(f"{worker.id}: {result.error.code}: {result.error.message}")
            log.info("embedding %s: %s failed (%s)", part.request_id, worker.id, result.error.message)
        if reasons:
            raise no_capacity(f"No worker could embed the input after {len(reasons)} attempt(s): " + "; ".join(reasons))
        raise no_capacity(f"No worker serving '{part.model}' is available right now")

    def _pick(self, request: InferenceRequest, tried: set[str], span: Span) -> WorkerView | None:
        return pick_worker(
            self.registry, self.balancer, request, tried, span, blocked=self.breakers.open_ids(), strategy=self.strategy
        )

    async def _attempt(
        self, part: EmbedRequest, worker_id: str, dimensions: int, parent: Span, attempt: int
    ) -> EmbedResult:
        """:meth:`_send` under an ``attempt`` span (an error span when the try failed)."""
        span = parent.child("attempt", kind="client")  # the worker's span joins the trace under this one
        if span.recording:
            span.set("mlxcluster.worker", worker_id)
            span.set("mlxcluster.attempt", attempt)
            span.set("mlxcluster.part", part.request_id)
            span.set("mlxcluster.inputs", len(part.texts or part.tokens or []))
        try:
            result = await self._send(part, worker_id, dimensions, span.headers())
        except BaseException as exc:
            span.fail(str(exc) or type(exc).__name__)
            span.end()
            raise
        if result.error is not None:
            span.fail(result.error.code)
        span.end()
        return result

    async def _send(
        self, part: EmbedRequest, worker_id: str, dimensions: int = 0, headers: dict[str, str] | None = None
    ) -> EmbedResult:
        """Ask one worker; a lost or silent one, or a malformed answer, is a retryable error. The worker's breaker
        records a success, a failure (not during our own bus outage), or else its half-open trial ends."""
        timeout = self.config.request_timeout_s
        if part.deadline is not None:
            timeout = max(0.001, part.deadline - time.time())
        subject = self.bus.subjects.embed(worker_id)
        self.registry.begin(worker_id)
        self.breakers.begin(worker_id)
        epoch = self.bus.epoch
        recorded = False
        try:
            result = await self.bus.request(subject, part, EmbedResult, timeout=timeout, headers=headers)
            if result.error is None:
                problem = malformed(result, len(part.texts or part.tokens or []), part.dimensions or dimensions)
                if problem is not None:
                    self.bus.invalid_messages[subject] += 1
                    self.breakers.record_failure(worker_id)
                    recorded = True
                    log.warning("embedding %s: %s answered %s", part.request_id, worker_id, problem)
                    message = f"malformed answer: {problem}"
                    return EmbedResult(error=Error(code="invalid_reply", message=message, retryable=True))
                self.breakers.record_success(worker_id)
                recorded = True
            return result
        except BusError as exc:
            if part.deadline is not None and time.time() >= part.deadline:
                raise ApiError(504, "The request timed out", type="server_error", code="timeout") from None
            self.breakers.blame(worker_id, epoch=epoch, now=self.bus.epoch)
            recorded = True
            return EmbedResult(error=Error(code="worker_lost", message=str(exc), retryable=True))
        except asyncio.CancelledError:  # a sibling part failed, or the client left: the worker may skip the rest
            with contextlib.suppress(Exception):
                cancel = Cancel(request_id=part.request_id, reason="controller gave up on the embedding request")
                await self.bus.publish(self.bus.subjects.cancel(worker_id), cancel)
            raise
        finally:
            if not recorded:
                self.breakers.forgive(worker_id)
            self.registry.end(worker_id)


def malformed(result: EmbedResult, inputs: int, dimensions: int) -> str | None:
    """What is wrong with a worker's answer to a part of ``inputs`` inputs (``dimensions``: the vector length
    expected, 0 when not known), or ``None``."""
    if len(result.vectors) != inputs:
        return f"{len(result.vectors)} vectors for {inputs} inputs"
    if result.dimensions < 1 or (dimensions and result.dimensions != dimensions):
        return f"vectors of {result.dimensions} dimensions, expected {dimensions or 'at least 1'}"
    size = 4 * result.dimensions
    wrong = next((i for i, vector in enumerate(result.vectors) if len(vector) != size), None)
    if wrong is not None:
        return f"vector {wrong} has {len(result.vectors[wrong])} bytes, not {size} (float32 × {result.dimensions})"
    return None


def first_error(failed: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first :class:`ApiError` of a task group's failures (else its first failure)."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [failed]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        else:
            leaves.append(error)
    return next((error for error in leaves if isinstance(error, ApiError)), leaves[0])


def _computed(tasks: list[asyncio.Task[EmbedResult]]) -> tuple[int, list[str]]:
    """The prompt tokens and workers of the parts that were computed (whatever became of the others)."""
    results = [task.result() for task in tasks if task.done() and not task.cancelled() and task.exception() is None]
    return sum(result.prompt_tokens for result in results), sorted({result.worker_id for result in results})


def embed_error(error: Error) -> ApiError:
    """A worker's refusal as the HTTP error (the request's own fault: a 400 naming the field)."""
    if error.code == "invalid_request":
        return ApiError(400, error.message, param=error.param, code="invalid_request")
    if error.code == "model_load_failed":
        return ApiError(503, error.message, type="server_error", code="model_load_failed")
    if error.code == "deadline_exceeded":
        return ApiError(504, "The request timed out on the worker", type="server_error", code="timeout")
    if error.code == "payload_too_large":
        return ApiError(413, error.message, code="payload_too_large")
    return ApiError(502, f"Worker error ({error.code}): {error.message}", type="server_error", code=error.code)
