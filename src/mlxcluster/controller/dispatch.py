"""Dispatch: pick a worker → subscribe its reply stream → send → relay frames, with failover.

Before the first token a failure (no responders, no ``Accepted`` in time, a retryable error, the
first-token timeout, the worker going offline) is retried on another worker — never the same one
twice — up to ``controller.max_attempts``. After the first token a lost worker (offline, silent past
``controller.stall_timeout_s``, frames lost, a retryable error) moves the stream to another worker, which
continues the text relayed so far (:mod:`mlxcluster.controller.migration`), at most
``controller.migration_limit`` times; past that, or with no worker left, the stream ends with an
``Error`` frame: it is never silently truncated. A stream closed early (client gone) sends ``Cancel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass, field
from typing import Literal, Protocol

from nats.aio.msg import Msg

from mlxcluster.bus import Bus
from mlxcluster.config import ControllerSection
from mlxcluster.controller.balancer_api import Balancer, WorkerView
from mlxcluster.controller.breaker import Breakers
from mlxcluster.controller.errors import ApiError, model_not_found, no_capacity, payload_too_large
from mlxcluster.controller.exporter_api import RequestRetried
from mlxcluster.controller.inbox import ResponseInbox
from mlxcluster.controller.migration import LostMidStream, StreamSoFar, unmovable
from mlxcluster.controller.request_meter import EventSink, RequestMeter, discard
from mlxcluster.protocol import (
    Accepted,
    Cancel,
    Done,
    Error,
    InferenceRequest,
    Progress,
    ProtocolError,
    Token,
    decode_frame,
    encode,
)

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 3.0
POLL_S = 0.25  # how soon a waiting stream notices its worker marked offline (a move starts then)
RETRY_BACKOFF_S = 0.05
SUBJECT_HEADROOM = 1024  # bytes of max_payload left for the subject and headers
RECENT_WINDOW = 64  # requests kept for the rolling figures in cluster status (dashboard sparklines)

StreamFrame = Token | Done | Error


class Registry(Protocol):
    """The registry calls dispatch makes."""

    def eligible(self, model: str, exclude: Collection[str] = ...) -> list[WorkerView]: ...
    def has_model(self, model: str) -> bool: ...
    def is_offline(self, worker_id: str) -> bool: ...
    def begin(self, worker_id: str) -> None: ...
    def end(self, worker_id: str) -> None: ...


def pick_worker(
    registry: Registry, balancer: Balancer, request: InferenceRequest, exclude: Collection[str] = frozenset()
) -> WorkerView | None:
    """The pick: a worker for ``request`` among the registry's eligible ones, minus ``exclude`` (``None``:
    nobody can take it)."""
    workers = registry.eligible(request.model, exclude)
    return balancer.pick(workers, request) if workers else None


class _TryElsewhere(Exception):
    """This worker failed before the first token; another may succeed."""


@dataclass
class DispatchStats:
    """Counters shown in cluster status and fed to exporters."""

    requests: int = 0
    retries: int = 0
    failed: int = 0
    in_flight: int = 0
    by_worker: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    """Streams that ended with ``Done``."""
    errors: int = 0
    """Streams that ended with an ``Error`` frame."""
    recent_ttft_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_WINDOW))
    """Time to first token of the latest requests, as the controller saw it (retries included)."""
    recent_tokens_per_second: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_WINDOW))
    """Generation speed of the latest completed requests, as their workers measured it."""
    migrations: int = 0
    """Started streams moved to another worker after their worker was lost."""
    migrations_failed: int = 0
    """Started streams whose worker was lost and that could not move (limit reached, no worker, client gone)."""

    def record_end(self, frame: StreamFrame) -> None:
        """Count a stream's last frame (Done or Error)."""
        if isinstance(frame, Done):
            self.completed += 1
            if frame.timings.tokens_per_second > 0:
                self.recent_tokens_per_second.append(frame.timings.tokens_per_second)
        elif isinstance(frame, Error):
            self.errors += 1


class Dispatcher:
    """Sends requests to workers and relays their frames."""

    def __init__(
        self,
        *,
        bus: Bus,
        registry: Registry,
        balancer: Balancer,
        config: ControllerSection,
        inbox: ResponseInbox,
        breakers: Breakers | None = None,
        events: EventSink | None = None,
    ) -> None:
        self.bus = bus
        self.inbox = inbox
        self.registry = registry
        self.balancer = balancer
        self.config = config
        self.breakers = breakers or Breakers()
        self.stats = DispatchStats()
        self.events: EventSink = events or discard
        """Where metrics events go (one :class:`RequestFinished` per request); ``discard`` when unmetered."""
        self.live: dict[str, RequestMeter] = {}
        """Meters of the requests in flight, by request id (for ``/api/cluster/requests``)."""

    def check_size(self, request: InferenceRequest) -> bytes:
        """Encode the request, refusing one the bus cannot carry (413, not a timeout)."""
        payload = encode(request)
        limit = self.bus.max_payload - SUBJECT_HEADROOM
        if len(payload) > limit:
            raise payload_too_large(len(payload), self.bus.max_payload)
        return payload

    def _pick(self, request: InferenceRequest, tried: set[str]) -> WorkerView | None:
        return pick_worker(self.registry, self.balancer, request, tried | self.breakers.open_ids())

    async def stream(
        self, request: InferenceRequest, *, disconnected: Callable[[], bool] | None = None
    ) -> AsyncGenerator[StreamFrame, None]:
        """Yield the frames of one request: Tokens, then Done or Error.

        Raises :class:`ApiError` (404/413/503/504) when no frame could be obtained at all. With an event
        sink, the request is metered and one :class:`RequestFinished` event is emitted when it ends.
        ``disconnected`` says whether the client has gone: such a stream is not migrated.
        """
        meter = RequestMeter(request, self.live) if self.events is not discard else None
        try:
            payload = self.check_size(request)
            if not self.registry.has_model(request.model):
                raise model_not_found(request.model)
        except ApiError as exc:
            if meter is not None:
                meter.model_known = exc.code != "model_not_found"
                meter.ended(exc)
                self._finished(request, meter)
            raise
        self.stats.requests += 1
        self.stats.in_flight += 1
        so_far = StreamSoFar(request)
        current = request
        try:
            while True:
                relay = await self._open(current, payload, so_far, meter)
                if isinstance(relay, Error):  # a continuation that no worker could start
                    yield self._unmoved(relay, meter)
                    return
                try:
                    async with contextlib.aclosing(relay):  # closed now, not by the GC, when our consumer leaves
                        async for frame in relay:
                            frame = so_far.relayed(frame)
                            if meter is not None:
                                meter.frame(frame)
                            if not isinstance(frame, Token):
                                self.stats.record_end(frame)
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
            if meter is not None:
                meter.ended(exc)
            raise
        finally:
            self.stats.in_flight -= 1
            if meter is not None:
                meter.migrations = so_far.moves
                self._finished(request, meter)

    def _unmoved(self, ending: Done | Error, meter: RequestMeter | None) -> Done | Error:
        """Count the last frame of a stream that lost its worker and did not move on."""
        if isinstance(ending, Error):
            self.stats.migrations_failed += 1
        if meter is not None:
            meter.frame(ending)
        self.stats.record_end(ending)
        return ending

    async def _open(
        self, request: InferenceRequest, payload: bytes, so_far: StreamSoFar, meter: RequestMeter | None
    ) -> AsyncGenerator[StreamFrame, None] | Error:
        """Start ``request`` (the original or a continuation) on a worker, retrying on others before its
        first frame; return the relay of its stream. When no worker could start it: a 503, or for a
        continuation the Error frame that ends the stream."""
        moving = so_far.loss is not None
        tried: set[str] = set(so_far.lost)
        reasons: list[str] = []
        for segment_attempt in range(1, self.config.max_attempts + 1):
            worker = self._pick(request, tried)
            if worker is None:
                break
            worker_id = worker.id
            tried.add(worker_id)
            so_far.attempts += 1
            attempt = so_far.attempts
            if segment_attempt > 1:
                self.stats.retries += 1
                if meter is not None:
                    self._retried(request, attempt, reasons)
            if meter is not None:
                meter.worker, meter.attempts = worker_id, attempt
            try:
                relay = await self._start(request, payload, worker_id, attempt)
            except _TryElsewhere as exc:
                reasons.append(f"{worker_id}: {exc}")
                log.info("request %s: %s failed before the first token (%s)", request.request_id, worker_id, exc)
                await asyncio.sleep(RETRY_BACKOFF_S * segment_attempt)
                continue
            self.stats.by_worker[worker_id] = self.stats.by_worker.get(worker_id, 0) + 1
            if moving:
                self._moved(so_far, worker_id)
            else:
                self.stats.recent_ttft_ms.append((time.monotonic() - so_far.started) * 1000)
            return relay
        if moving and so_far.loss is not None:
            why = "; ".join(reasons) if reasons else f"no other worker serving '{request.model}' is available"
            return unmovable(so_far.loss, f"no worker could continue it: {why}")
        self.stats.failed += 1
        if reasons:
            raise no_capacity(
                f"No worker could serve the request after {len(reasons)} attempt(s): " + "; ".join(reasons)
            )
        raise no_capacity(f"No worker serving '{request.model}' is available right now")

    def _moved(self, so_far: StreamSoFar, worker_id: str) -> None:
        self.stats.migrations += 1
        event = so_far.moved_to(worker_id)
        log.info("request %s continues on %s (%.2fs without a token)", event.request_id, worker_id, event.gap_s)
        if self.events is not discard:
            self.events(event)

    def _finished(self, request: InferenceRequest, meter: RequestMeter) -> None:
        try:
            self.events(meter.finished(request))
        except Exception:
            log.exception("could not emit the metrics event of %s", request.request_id)

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
        self, request: InferenceRequest, payload: bytes, worker_id: str, attempt: int
    ) -> AsyncGenerator[StreamFrame, None]:
        """Send to one worker and wait for its first token; return the relay of the whole stream."""
        key = f"{request.request_id}.{attempt}"
        reply, queue = self.inbox.open(key)
        self.registry.begin(worker_id)
        self.breakers.begin(worker_id)
        epoch = self.bus.epoch
        try:
            await self.bus.nc.publish(self.bus.subjects.inference(worker_id), payload, reply=reply)
            first = await self._first_frame(queue, worker_id, request)
        except BaseException as exc:
            if isinstance(exc, _TryElsewhere):
                self._blame(worker_id, epoch)
            await self._cancel(worker_id, request.request_id, f"controller gave up: {exc}")
            self._close(key, worker_id)
            raise
        return self._relay(key, queue, worker_id, request, first, epoch)

    def _blame(self, worker_id: str, epoch: int) -> None:
        """Count a failure against the worker's breaker, unless our own NATS connection dropped meanwhile:
        frames lost in a bus outage say nothing about the worker (and would open every breaker at once)."""
        if self.bus.epoch == epoch:
            self.breakers.record_failure(worker_id)
        else:
            self.breakers.forgive(worker_id)

    async def _first_frame(self, queue: asyncio.Queue[Msg], worker_id: str, request: InferenceRequest) -> StreamFrame:
        """Wait for Accepted, then for the first Token/Done/Error, within the timeouts.

        The first-token timeout measures silence: each Progress frame of a long prefill restarts it."""
        now = time.monotonic()
        first_token_by = now + self.config.first_token_timeout_s
        accepted_by = now + min(ACCEPT_TIMEOUT_S, self.config.first_token_timeout_s)
        accepted = False
        while True:
            limit = first_token_by if accepted else accepted_by
            msg = await self._next(queue, worker_id, limit, request)
            if msg is None:
                raise _TryElsewhere("no first token in time" if accepted else "did not accept the request in time")
            if msg.headers and msg.headers.get("Status") == "503":
                raise _TryElsewhere("no responders (worker gone)")
            frame = self._decode(msg)
            match frame:
                case Accepted():
                    accepted = True
                case Progress():
                    accepted = True
                    first_token_by = time.monotonic() + self.config.first_token_timeout_s
                case Error(retryable=True):
                    raise _TryElsewhere(f"{frame.code}: {frame.message}")
                case Token(seq=seq) | Done(seq=seq) if seq:  # lost frames, none sent on yet: start over elsewhere
                    raise _TryElsewhere(f"lost the first frame(s) of the stream (got #{seq})")
                case Token() | Done() | Error():
                    return frame
                case None:
                    continue

    async def _relay(
        self,
        key: str,
        queue: asyncio.Queue[Msg],
        worker_id: str,
        request: InferenceRequest,
        first: StreamFrame,
        epoch: int,
    ) -> AsyncGenerator[StreamFrame, None]:
        """Yield ``first`` and the rest of the stream; raise :class:`LostMidStream` if the worker is lost
        (the stream may then continue on another worker)."""
        finished = False
        try:
            frame: StreamFrame | None = first
            next_seq = 0
            while True:
                if frame is not None:
                    if isinstance(frame, Token | Done) and frame.seq not in (next_seq, None):  # NATS: at most once
                        message = f"lost frames from worker {worker_id} (expected #{next_seq}, got #{frame.seq})"
                        # not finished: the worker still generates, so the finally cancels it
                        raise LostMidStream(worker_id, "frames_lost", Error(code="frames_lost", message=message))
                    next_seq += 1
                    if not isinstance(frame, Token):
                        finished = True
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
                msg = await self._next_live(key, queue, worker_id, request)
                if not isinstance(msg, Msg):
                    self._blame(worker_id, epoch)
                    message = f"worker {worker_id} stopped responding mid-stream ({msg})"
                    raise LostMidStream(worker_id, msg, Error(code="worker_lost", message=message))
                decoded = self._decode(msg)
                frame = None if isinstance(decoded, Accepted | Progress) else decoded
        finally:
            self._close(key, worker_id)
            if not finished:  # the client went away, or the worker is lost (a frozen one may wake up)
                await self._cancel(worker_id, request.request_id, "controller gave up on the stream")

    async def _next_live(
        self, key: str, queue: asyncio.Queue[Msg], worker_id: str, request: InferenceRequest
    ) -> Msg | Literal["offline", "stalled"]:
        """Next message of a started stream; ``"offline"`` when the worker went offline in the registry,
        ``"stalled"`` when ``request_timeout_s`` passed or neither a frame nor the worker's liveness probe
        came for ``controller.stall_timeout_s`` (a frozen worker, or frames lost, for instance across a NATS
        reconnect, after which the worker may have finished or forgotten the request)."""
        until = time.monotonic() + self.config.request_timeout_s
        heard = time.monotonic()
        while True:
            msg = await self._next(queue, worker_id, min(until, heard + self.config.stall_timeout_s), request)
            if msg is not None:
                return msg
            if self.registry.is_offline(worker_id):
                return "offline"
            probed = self.inbox.probed_at(key)
            if probed is None or probed <= heard or time.monotonic() >= until:
                return "stalled"
            heard = probed

    async def _next(
        self, queue: asyncio.Queue[Msg], worker_id: str, until: float, request: InferenceRequest
    ) -> Msg | None:
        """Next message before ``until`` (monotonic); ``None`` on timeout or when the worker goes
        offline in the registry. Raises a 504 when the request deadline passes."""
        while True:
            if not queue.empty():
                return queue.get_nowait()
            if request.deadline is not None and time.time() > request.deadline:
                raise ApiError(504, "The request timed out", type="server_error", code="timeout")
            remaining = until - time.monotonic()
            if remaining <= 0 or self.registry.is_offline(worker_id):
                return None
            try:
                async with asyncio.timeout(min(POLL_S, remaining)):
                    return await queue.get()
            except TimeoutError:
                continue

    def _decode(self, msg: Msg) -> Accepted | Progress | StreamFrame | None:
        try:
            return decode_frame(msg.data)
        except ProtocolError as exc:
            self.bus.invalid_messages[msg.subject] += 1
            log.warning("dropped invalid frame on %s: %s", msg.subject, exc)
            return None

    async def _cancel(self, worker_id: str, request_id: str, reason: str) -> None:
        try:
            await self.bus.publish(self.bus.subjects.cancel(worker_id), Cancel(request_id=request_id, reason=reason))
        except Exception as exc:  # the bus may be down; the worker's probe will notice us gone
            log.debug("could not send cancel for %s: %s", request_id, exc)

    def _close(self, key: str, worker_id: str) -> None:
        self.inbox.discard(key)
        self.registry.end(worker_id)
