"""Dispatch: pick a worker → subscribe its reply stream → send → relay frames, with failover.

Before the first token a failure (no responders, no ``Accepted`` in time, a retryable error, the
first-token timeout, the worker going offline) is retried on another worker — never the same one
twice — up to ``controller.max_attempts``. After the first token a lost worker (offline, silent past
``controller.stall_timeout_s``, frames lost, a retryable error) moves the stream to another worker, which
continues the text relayed so far (:mod:`mlxcluster.controller.routing.migration`), at most
``controller.migration_limit`` times; past that, or with no worker left, the stream ends with an
``Error`` frame: it is never silently truncated. A stream closed early (client gone) sends ``Cancel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Collection
from typing import Literal, Protocol

from mlxcluster.api import Balancer, MetricsEvent, RequestFinished, RequestRetried, WorkerView
from mlxcluster.bus import Bus, ReplyStream, Signal, StreamInbox, WorkerFrame, headers_size
from mlxcluster.config import ControllerSection
from mlxcluster.controller.http.errors import ApiError, model_not_found, no_capacity, payload_too_large
from mlxcluster.controller.metering.dispatch_stats import DispatchStats
from mlxcluster.controller.metering.request_meter import EventSink, RequestMeter, discard
from mlxcluster.controller.routing.breaker import Breakers
from mlxcluster.controller.routing.migration import LostMidStream, StreamSoFar, unmovable
from mlxcluster.controller.routing.registry import WorkerEvent
from mlxcluster.protocol import (
    Accepted,
    Cancel,
    Done,
    Error,
    InferenceRequest,
    Progress,
    Token,
    encode,
)
from mlxcluster.tracing import NoTracer, Span, Tracer, request_span

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = 0.05
SUBJECT_HEADROOM = 1024  # bytes of max_payload left for the subject and headers

StreamFrame = Token | Done | Error
CacheShare = Callable[[InferenceRequest, str], float]
"""The share of a request's prompt a worker's prompt cache holds, as the controller's cache index knows it."""


class Candidates(Protocol):
    """The one registry call a pick makes (chat and embeddings dispatch alike)."""

    def eligible(self, model: str, exclude: Collection[str] = ...) -> list[WorkerView]: ...


class Registry(Protocol):
    """The registry calls dispatch makes."""

    def eligible(self, model: str, exclude: Collection[str] = ...) -> list[WorkerView]: ...
    def has_model(self, model: str) -> bool: ...
    def loaded_somewhere(self, model: str) -> bool: ...
    def loadable_somewhere(self, model: str) -> bool: ...
    def is_offline(self, worker_id: str) -> bool: ...
    def begin(self, worker_id: str) -> None: ...
    def end(self, worker_id: str) -> None: ...
    def add_listener(self, listener: Callable[[WorkerEvent], None]) -> None: ...


def pick_worker(
    registry: Candidates,
    balancer: Balancer,
    request: InferenceRequest,
    exclude: Collection[str] = frozenset(),
    span: Span | None = None,
    *,
    blocked: frozenset[str] | set[str] = frozenset(),
    strategy: str = "",
) -> WorkerView | None:
    """The pick: a worker for ``request`` among the registry's eligible ones, minus ``exclude`` (the workers
    tried) and ``blocked`` (open breakers) (``None``: nobody can take it). A recording ``span`` gets the
    candidates, the ``strategy`` and the choice."""
    if blocked:
        exclude = {*exclude, *blocked}
    workers = registry.eligible(request.model, exclude)
    chosen = balancer.pick(workers, request) if workers else None
    if span is not None and span.recording:
        if strategy:
            span.set("mlxcluster.strategy", strategy)
        span.set("mlxcluster.candidates", len(workers))
        span.set("mlxcluster.excluded", len(exclude))
        if chosen is not None:
            span.set("mlxcluster.worker", chosen.id)
            span.set("mlxcluster.worker_load", chosen.load)
    return chosen


class _TryElsewhere(Exception):
    """This worker failed before the first token; another may succeed."""

    def __init__(self, reason: str, code: str = "") -> None:
        super().__init__(reason)
        self.code = code
        """The worker's error code, when it answered with a retryable Error."""


class Loader(Protocol):
    """Loads a model on demand (:class:`~mlxcluster.controller.routing.model_loads.ModelLoader`)."""

    async def ensure_loaded(self, model: str) -> str: ...


class Dispatcher:
    """Sends requests to workers and relays their frames.

    Every request is metered: the dispatcher emits its events (one :class:`RequestFinished` per request,
    :class:`RequestRetried`, :class:`RequestMigrated`) to :attr:`stats` (the counters the API shows) and
    then to ``events`` (operations and exporters). The registry tells it when a worker goes offline, and
    it wakes the streams waiting on that worker at once.
    """

    def __init__(
        self,
        *,
        bus: Bus,
        registry: Registry,
        balancer: Balancer,
        config: ControllerSection,
        inbox: StreamInbox,
        breakers: Breakers | None = None,
        events: EventSink | None = None,
        loader: Loader | None = None,
        tracer: Tracer | None = None,
        strategy: str = "",
        cache_share: CacheShare | None = None,
    ) -> None:
        self.bus = bus
        self.tracer: Tracer = tracer or NoTracer()
        """Spans of each request (dispatch, pick, attempt); a no-op tracer with ``[tracing]`` off."""
        self.strategy = strategy
        """The balancer's name, for the pick span."""
        self.cache_share = cache_share
        """For the pick span: how much of the prompt the chosen worker holds (``None``: not known)."""
        self.loader = loader
        """Loads a model that is in a worker's catalogue but loaded nowhere (None: such requests get a 503)."""
        self.inbox = inbox
        self.registry = registry
        self.balancer = balancer
        self.config = config
        self.breakers = breakers or Breakers()
        self.live: dict[str, RequestMeter] = {}
        """Meters of the requests in flight, by request id (for ``/api/cluster/requests``)."""
        self.stats = DispatchStats(self.live)
        sink, stats = events or discard, self.stats

        def emit(event: MetricsEvent) -> None:
            stats.on_event(event)
            sink(event)

        self.events: EventSink = emit
        """Where the dispatcher's events go: its stats first, then the sink it was given."""
        registry.add_listener(self._on_worker_event)

    def _on_worker_event(self, event: WorkerEvent) -> None:
        """The registry's push: a worker gone offline (or removed) wakes the streams waiting on it."""
        if event.current is None or event.current == "offline":
            self.inbox.interrupt(event.worker_id)

    def check_size(self, request: InferenceRequest) -> bytes:
        """Encode the request, refusing one the bus cannot carry (413, not a timeout)."""
        payload = encode(request)
        limit = self.bus.max_payload - SUBJECT_HEADROOM
        if len(payload) > limit:
            raise payload_too_large(len(payload), self.bus.max_payload)
        return payload

    def check_message(self, payload: bytes, headers: dict[str, str] | None) -> None:
        """Refuse (413) a message whose payload and encoded headers together exceed the server's
        ``max_payload``: nats-py checks only the payload, and the server closes the connection on a larger one."""
        size = len(payload) + headers_size(headers)
        if size > self.bus.max_payload:
            raise payload_too_large(size, self.bus.max_payload)

    def _pick(self, request: InferenceRequest, tried: set[str], span: Span) -> WorkerView | None:
        chosen = pick_worker(
            self.registry, self.balancer, request, tried, span, blocked=self.breakers.open_ids(), strategy=self.strategy
        )
        if span.recording and chosen is not None and self.cache_share is not None:
            span.set("mlxcluster.cache_share", round(self.cache_share(request, chosen.id), 4))
        return chosen

    def _request_span(self, request: InferenceRequest) -> Span:
        """The dispatch span: under the HTTP request's span, or the first of a trace (a WebSocket message)."""
        span = request_span(self.tracer, "dispatch", request_id=request.request_id, model=request.model)
        if span.recording:
            span.set("mlxcluster.stream", request.stream)
        return span

    async def stream(
        self, request: InferenceRequest, *, disconnected: Callable[[], bool] | None = None
    ) -> AsyncGenerator[StreamFrame, None]:
        """Yield the frames of one request: Tokens, then Done or Error.

        Raises :class:`ApiError` (404/413/503/504) when no frame could be obtained at all. The request is
        metered and one :class:`RequestFinished` event is emitted when it ends. ``disconnected`` says
        whether the client has gone: such a stream is not migrated.
        """
        meter = RequestMeter(request, self.live)
        span = self._request_span(request)
        try:
            payload = self.check_size(request)
            if not self.registry.has_model(request.model):
                raise model_not_found(request.model)
        except ApiError as exc:
            meter.model_known = exc.code != "model_not_found"
            meter.ended(exc)
            self._finished(request, meter, span)
            raise
        meter.dispatched = True
        so_far = StreamSoFar(request)
        current = request
        try:
            while True:
                relay = await self._open(current, payload, so_far, meter, span)
                if isinstance(relay, Error):  # a continuation that no worker could start
                    yield self._unmoved(relay, meter)
                    return
                try:
                    async with contextlib.aclosing(relay):  # closed now, not by the GC, when our consumer leaves
                        async for frame in relay:
                            frame = so_far.relayed(frame)
                            meter.frame(frame)
                            yield frame
                    return
                except LostMidStream as lost:
                    so_far.loss = lost
                    so_far.lost.add(lost.worker_id)
                    gone = disconnected is not None and disconnected()
                    ending = so_far.ending(lost, self.config.migration_limit, client_gone=gone)
                    if ending is None:
                        current = so_far.continuation()
                        try:
                            payload = self.check_size(current)
                        except ApiError as exc:
                            ending = unmovable(lost, exc.message)
                    if ending is not None:
                        yield self._unmoved(ending, meter)
                        return
                    log.info(
                        "request %s: %s lost mid-stream (%s) after %d token(s); moving it (%d/%d)",
                        request.request_id,
                        lost.worker_id,
                        lost.reason,
                        so_far.tokens,
                        so_far.moves + 1,
                        self.config.migration_limit,
                    )
        except BaseException as exc:  # an ApiError, or the consumer gone (GeneratorExit, CancelledError)
            meter.ended(exc)
            raise
        finally:
            meter.migrations = so_far.moves
            self._finished(request, meter, span)

    @staticmethod
    def _unmoved(ending: Done | Error, meter: RequestMeter) -> Done | Error:
        """Meter the last frame of a stream that lost its worker and did not move on."""
        meter.frame(ending)
        meter.unmoved = isinstance(ending, Error)
        return ending

    async def _open(
        self, request: InferenceRequest, payload: bytes, so_far: StreamSoFar, meter: RequestMeter, span: Span
    ) -> AsyncGenerator[StreamFrame, None] | Error:
        """Start ``request`` (the original or a continuation) on a worker, retrying on others before its
        first frame; return the relay of its stream. When no worker could start it: a 503, or for a
        continuation the Error frame that ends the stream."""
        moving = so_far.loss is not None
        tried: set[str] = set(so_far.lost)
        reasons: list[str] = []
        codes: list[str] = []
        for segment_attempt in range(1, self.config.max_attempts + 1):
            pick = span.child("pick")
            try:
                worker = self._pick(request, tried, pick)
                if worker is None and segment_attempt == 1 and not moving and self.loader is not None:
                    registry = self.registry
                    if not registry.loaded_somewhere(request.model) and registry.loadable_somewhere(request.model):
                        pick.event("model_load")
                        await self.loader.ensure_loaded(request.model)  # a 503 when it cannot
                        worker = self._pick(request, tried, pick)
            finally:
                pick.end()
            if worker is None:
                break
            worker_id = worker.id
            tried.add(worker_id)
            so_far.attempts += 1
            attempt = so_far.attempts
            if segment_attempt > 1:
                self._retried(request, attempt, reasons)
            meter.worker, meter.attempts = worker_id, attempt
            if segment_attempt > 1:
                meter.retrying()
            try:
                relay = await self._start(request, payload, worker_id, attempt, meter, span)
            except _TryElsewhere as exc:
                reasons.append(f"{worker_id}: {exc}")
                codes.append(exc.code)
                log.info("request %s: %s failed before the first token (%s)", request.request_id, worker_id, exc)
                await asyncio.sleep(RETRY_BACKOFF_S * segment_attempt)
                continue
            if moving:
                self._moved(so_far, worker_id, span)
            return relay
        if moving and so_far.loss is not None:
            why = "; ".join(reasons) if reasons else f"no other worker serving '{request.model}' is available"
            return unmovable(so_far.loss, f"no worker could continue it: {why}")
        if codes and all(code == "exceeds_memory_budget" for code in codes):
            raise ApiError(
                400,
                "The request can never fit the memory budget of any worker serving "
                f"'{request.model}' (its prompt and max_tokens need more KV cache than the budget leaves beside "
                f"the model's weights): {'; '.join(reasons)}. Lower max_tokens or shorten the prompt.",
                param="max_tokens",
                code="exceeds_memory_budget",
            )
        if reasons:
            raise no_capacity(
                f"No worker could serve the request after {len(reasons)} attempt(s): " + "; ".join(reasons)
            )
        raise no_capacity(f"No worker serving '{request.model}' is available right now")

    def _moved(self, so_far: StreamSoFar, worker_id: str, span: Span) -> None:
        event = so_far.moved_to(worker_id)
        log.info("request %s continues on %s (%.2fs without a token)", event.request_id, worker_id, event.gap_s)
        if span.recording:
            span.event(
                "migrated",
                {
                    "mlxcluster.from_worker": event.worker,
                    "mlxcluster.to_worker": worker_id,
                    "mlxcluster.reason": event.reason,
                    "mlxcluster.tokens_so_far": event.tokens,
                    "mlxcluster.gap_s": round(event.gap_s, 6),
                },
            )
        self.events(event)

    def _finished(self, request: InferenceRequest, meter: RequestMeter, span: Span) -> None:
        try:
            finished = meter.finished(request)
            self.events(finished)
            if span.recording:
                describe_finished(span, finished)
        except Exception:
            log.exception("could not emit the metrics event of %s", request.request_id)
        finally:
            span.end()

    def _retried(self, request: InferenceRequest, attempt: int, reasons: list[str]) -> None:
        failed_worker, _, reason = reasons[-1].partition(": ") if reasons else ("", "", "")
        self.events(
            RequestRetried(
                time=time.time(),
                request_id=request.request_id,
                model=request.model,
                worker=failed_worker,
                attempt=attempt,
                reason=reason,
            )
        )

    async def _start(
        self,
        request: InferenceRequest,
        payload: bytes,
        worker_id: str,
        attempt: int,
        meter: RequestMeter,
        parent: Span,
    ) -> AsyncGenerator[StreamFrame, None]:
        """Send to one worker and wait for its first token; return the relay of the whole stream."""
        span = parent.child("attempt", kind="client")  # the worker's spans join the trace under this one
        if span.recording:
            span.set("mlxcluster.worker", worker_id)
            span.set("mlxcluster.attempt", attempt)
            span.set("mlxcluster.continuation", request.continuation is not None)
        headers = span.headers()
        if headers is not None:  # without headers, check_size has already made sure the payload fits
            try:
                self.check_message(payload, headers)
            except ApiError:
                span.fail("payload_too_large")
                span.end()
                raise
        stream = self.inbox.open(f"{request.request_id}.{attempt}", worker_id)
        self.registry.begin(worker_id)
        self.breakers.begin(worker_id)
        epoch = self.bus.epoch
        try:
            subject = self.bus.subjects.inference(worker_id)
            await self.bus.publish_encoded(subject, payload, reply=stream.reply, headers=headers)
            first = await self._first_frame(stream, request, meter, span)
        except BaseException as exc:
            if isinstance(exc, _TryElsewhere):
                self._blame(worker_id, epoch)
            span.fail(str(exc) or type(exc).__name__)
            span.end()
            await self._cancel(worker_id, request.request_id, f"controller gave up: {exc}")
            self._close(stream)
            raise
        return self._relay(stream, request, first, epoch, span)

    def _blame(self, worker_id: str, epoch: int) -> None:
        """A failure of the try begun at bus ``epoch``, unless the bus dropped since (:meth:`Breakers.blame`)."""
        self.breakers.blame(worker_id, epoch=epoch, now=self.bus.epoch)

    async def _first_frame(
        self, stream: ReplyStream, request: InferenceRequest, meter: RequestMeter, span: Span
    ) -> StreamFrame:
        """Wait for Accepted, then for the first Token/Done/Error, within the timeouts.

        The first-token timeout measures silence: each Progress frame (of a long prefill, or of tokens the
        worker holds, such as a tool call being parsed) restarts it. The first Progress with ``generated``
        marks the request's first token (TTFT), as a Token would."""
        now = time.monotonic()
        first_token_by = now + self.config.first_token_timeout_s
        accepted_by = now + min(self.config.accept_timeout_s, self.config.first_token_timeout_s)
        accepted = False
        while True:
            limit = first_token_by if accepted else accepted_by
            frame = stream.take() or await self._next(stream, limit, request)
            match frame:  # the usual frames first: each case is a type test
                case Accepted():
                    accepted = True
                    if span.recording:
                        span.event("accepted", {"mlxcluster.queued": frame.queued})
                case Token() | Done():
                    if (seq := stream.out_of_order(frame)) is not None:
                        # lost frames, none sent on yet: start over elsewhere
                        raise _TryElsewhere(f"lost the first frame(s) of the stream (got #{seq})")
                    return frame
                case Progress():
                    accepted = True
                    first_token_by = time.monotonic() + self.config.first_token_timeout_s
                    if frame.generated:
                        meter.generating()
                case Error(retryable=True):
                    raise _TryElsewhere(f"{frame.code}: {frame.message}", frame.code)
                case Error():
                    return frame
                case None:
                    raise _TryElsewhere("no first token in time" if accepted else "did not accept the request in time")
                case Signal.NO_RESPONDERS:
                    raise _TryElsewhere("no responders (worker gone)")
                case Signal():
                    continue

    async def _relay(
        self, stream: ReplyStream, request: InferenceRequest, first: StreamFrame, epoch: int, span: Span
    ) -> AsyncGenerator[StreamFrame, None]:
        """Yield ``first`` and the rest of the stream; raise :class:`LostMidStream` if the worker is lost
        (the stream may then continue on another worker)."""
        worker_id = stream.worker_id
        finished = False
        try:
            frame: StreamFrame | None = first
            while True:
                if frame is not None:
                    if not isinstance(frame, Token):
                        finished = True
                        if isinstance(frame, Error):
                            span.fail(frame.code)
                        if isinstance(frame, Error) and frame.retryable:  # e.g. its engine reset the batch
                            raise LostMidStream(worker_id, "worker_error", frame)
                        # we never read on after cancelling, so this cancel is the worker's (a drain ran out)
                        if isinstance(frame, Done) and frame.finish_reason == "cancelled":
                            message = f"worker {worker_id} cancelled the stream"
                            raise LostMidStream(worker_id, "worker_error", Error(code="worker_lost", message=message))
                        if isinstance(frame, Done):
                            self.breakers.record_success(worker_id)
                        yield frame
                        return
                    yield frame
                # frames that came batched are already queued: take them without the timed wait
                received = stream.take() or await self._next_live(stream, request)
                if isinstance(received, str):
                    span.fail(f"worker {received}")
                    self._blame(worker_id, epoch)
                    message = f"worker {worker_id} stopped responding mid-stream ({received})"
                    raise LostMidStream(worker_id, received, Error(code="worker_lost", message=message))
                frame = None if isinstance(received, Accepted | Progress | Signal) else received
                if isinstance(frame, Token | Done) and (seq := stream.out_of_order(frame)) is not None:
                    # NATS delivers at most once: frames were lost
                    message = f"lost frames from worker {worker_id} (expected #{stream.expected}, got #{seq})"
                    span.fail("frames_lost")
                    # not finished: the worker still generates, so the finally cancels it
                    raise LostMidStream(worker_id, "frames_lost", Error(code="frames_lost", message=message))
        finally:
            span.end()
            self._close(stream)
            if not finished:  # the client went away, or the worker is lost (a frozen one may wake up)
                await self._cancel(worker_id, request.request_id, "controller gave up on the stream")

    async def _next_live(
        self, stream: ReplyStream, request: InferenceRequest
    ) -> WorkerFrame | Signal | Literal["offline", "stalled"]:
        """Next frame (or :class:`Signal`) of a started stream; ``"offline"`` when the worker went offline in the
        registry, ``"stalled"`` when ``request_timeout_s`` passed or neither a frame nor the worker's liveness probe
        came for ``controller.stall_timeout_s`` (a frozen worker, or frames lost, for instance across a NATS
        reconnect, after which the worker may have finished or forgotten the request)."""
        until = time.monotonic() + self.config.request_timeout_s
        heard = time.monotonic()
        while True:
            received = await self._next(stream, min(until, heard + self.config.stall_timeout_s), request)
            if received is None:
                if self.registry.is_offline(stream.worker_id):
                    return "offline"
                probed = stream.probed_at
                if probed is None or probed <= heard or time.monotonic() >= until:
                    return "stalled"
                heard = probed
            else:
                return received

    async def _next(self, stream: ReplyStream, until: float, request: InferenceRequest) -> WorkerFrame | Signal | None:
        """Next frame (or :class:`Signal`) before ``until`` (monotonic); ``None`` on timeout or when the
        worker is offline in the registry (it pushes that: no polling). Raises a 504 when the request
        deadline passes."""
        deadline = request.deadline
        while True:
            if not stream.pending:
                if deadline is not None and time.time() > deadline:
                    raise ApiError(504, "The request timed out", type="server_error", code="timeout")
                if time.monotonic() >= until or self.registry.is_offline(stream.worker_id):
                    return None
            limit = until if deadline is None else min(until, time.monotonic() + deadline - time.time())
            received = await stream.receive(limit)
            if received is not Signal.SILENT and received is not Signal.INTERRUPTED:
                return received

    async def _cancel(self, worker_id: str, request_id: str, reason: str) -> None:
        try:
            await self.bus.publish(self.bus.subjects.cancel(worker_id), Cancel(request_id=request_id, reason=reason))
        except Exception as exc:  # the bus may be down; the worker's probe will notice us gone
            log.debug("could not send cancel for %s: %s", request_id, exc)

    def _close(self, stream: ReplyStream) -> None:
        self.inbox.discard(stream.key)
        self.registry.end(stream.worker_id)


def describe_finished(span: Span, finished: RequestFinished) -> None:
    """The dispatch span's attributes once the request ended (from its metrics event)."""
    span.set("mlxcluster.status", finished.status)
    span.set("mlxcluster.attempts", finished.attempts)
    span.set("mlxcluster.migrations", finished.migrations)
    if finished.worker is not None:
        span.set("mlxcluster.worker", finished.worker)
    if finished.finish_reason is not None:
        span.set("gen_ai.response.finish_reasons", finished.finish_reason)
    span.set("gen_ai.usage.input_tokens", finished.prompt_tokens)
    span.set("gen_ai.usage.output_tokens", finished.completion_tokens)
    span.set("mlxcluster.cached_tokens", finished.cached_tokens)
    if finished.ttft_s is not None:
        span.set("mlxcluster.ttft_s", round(finished.ttft_s, 6))
    if finished.status == "error":
        span.fail(finished.error or "error")
