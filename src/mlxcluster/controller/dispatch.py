"""Dispatch: pick a worker → subscribe its reply stream → send → relay frames, with failover.

Before the first token a failure (no responders, no ``Accepted`` in time, a retryable error, the
first-token timeout, the worker going offline) is retried on another worker — never the same one
twice — up to ``controller.max_attempts``. After the first token a failure ends the stream with an
``Error`` frame; it is never silently truncated. A stream closed early (client gone) sends ``Cancel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from nats.aio.msg import Msg

from mlxcluster.bus import Bus
from mlxcluster.config import ControllerSection
from mlxcluster.controller.balancer_api import Balancer, WorkerView
from mlxcluster.controller.breaker import Breakers
from mlxcluster.controller.errors import ApiError, model_not_found, no_capacity, payload_too_large
from mlxcluster.controller.inbox import ResponseInbox
from mlxcluster.protocol import (
    Accepted,
    Cancel,
    Done,
    Error,
    InferenceRequest,
    ProtocolError,
    Token,
    decode_frame,
    encode,
)

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 3.0
POLL_S = 1.0
RETRY_BACKOFF_S = 0.05
SUBJECT_HEADROOM = 1024  # bytes of max_payload left for the subject and headers

StreamFrame = Token | Done | Error


class Registry(Protocol):
    """The registry calls dispatch makes."""

    def eligible(self, model: str, exclude: set[str] | frozenset[str] = ...) -> list[WorkerView]: ...
    def has_model(self, model: str) -> bool: ...
    def is_offline(self, worker_id: str) -> bool: ...
    def begin(self, worker_id: str) -> None: ...
    def end(self, worker_id: str) -> None: ...


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
    ) -> None:
        self.bus = bus
        self.inbox = inbox
        self.registry = registry
        self.balancer = balancer
        self.config = config
        self.breakers = breakers or Breakers()
        self.stats = DispatchStats()

    def check_size(self, request: InferenceRequest) -> bytes:
        """Encode the request, refusing one the bus cannot carry (413, not a timeout)."""
        payload = encode(request)
        limit = self.bus.max_payload - SUBJECT_HEADROOM
        if len(payload) > limit:
            raise payload_too_large(len(payload), self.bus.max_payload)
        return payload

    def _pick(self, request: InferenceRequest, tried: set[str]) -> WorkerView | None:
        workers = self.registry.eligible(request.model, exclude=tried | self.breakers.open_ids())
        if not workers:
            return None
        return self.balancer.pick(workers, request)

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamFrame]:
        """Yield the frames of one request: Tokens, then Done or Error.

        Raises :class:`ApiError` (404/413/503/504) when no frame could be obtained at all.
        """
        payload = self.check_size(request)
        if not self.registry.has_model(request.model):
            raise model_not_found(request.model)
        self.stats.requests += 1
        self.stats.in_flight += 1
        tried: set[str] = set()
        reasons: list[str] = []
        try:
            for attempt in range(1, self.config.max_attempts + 1):
                worker = self._pick(request, tried)
                if worker is None:
                    break
                worker_id = worker.id
                tried.add(worker_id)
                if attempt > 1:
                    self.stats.retries += 1
                try:
                    relay = await self._start(request, payload, worker_id, attempt)
                except _TryElsewhere as exc:
                    reasons.append(f"{worker_id}: {exc}")
                    log.info("request %s: %s failed before the first token (%s)", request.request_id, worker_id, exc)
                    await asyncio.sleep(RETRY_BACKOFF_S * attempt)
                    continue
                self.stats.by_worker[worker_id] = self.stats.by_worker.get(worker_id, 0) + 1
                async with contextlib.aclosing(relay):  # closed now, not by the GC, when our consumer leaves
                    async for frame in relay:
                        yield frame
                return
            self.stats.failed += 1
            if reasons:
                raise no_capacity(
                    f"No worker could serve the request after {len(reasons)} attempt(s): " + "; ".join(reasons)
                )
            raise no_capacity(f"No worker serving '{request.model}' is available right now")
        finally:
            self.stats.in_flight -= 1

    async def _start(
        self, request: InferenceRequest, payload: bytes, worker_id: str, attempt: int
    ) -> AsyncIterator[StreamFrame]:
        """Send to one worker and wait for its first token; return the relay of the whole stream."""
        key = f"{request.request_id}.{attempt}"
        reply, queue = self.inbox.open(key)
        self.registry.begin(worker_id)
        self.breakers.begin(worker_id)
        try:
            await self.bus.nc.publish(self.bus.subjects.inference(worker_id), payload, reply=reply)
            first = await self._first_frame(queue, worker_id, request)
        except BaseException as exc:
            if isinstance(exc, _TryElsewhere):
                self.breakers.record_failure(worker_id)
            await self._cancel(worker_id, request.request_id, f"controller gave up: {exc}")
            self._close(key, worker_id)
            raise
        return self._relay(key, queue, worker_id, request, first)

    async def _first_frame(self, queue: asyncio.Queue[Msg], worker_id: str, request: InferenceRequest) -> StreamFrame:
        """Wait for Accepted, then for the first Token/Done/Error, within the timeouts."""
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
                case Error(retryable=True):
                    raise _TryElsewhere(f"{frame.code}: {frame.message}")
                case Token() | Done() | Error():
                    return frame
                case None:
                    continue

    async def _relay(
        self, key: str, queue: asyncio.Queue[Msg], worker_id: str, request: InferenceRequest, first: StreamFrame
    ) -> AsyncIterator[StreamFrame]:
        """Yield ``first`` and the rest of the stream; end with an Error frame if the worker is lost."""
        finished = False
        try:
            frame: StreamFrame | None = first
            while True:
                if frame is not None:
                    if not isinstance(frame, Token):
                        finished = True
                        if isinstance(frame, Done):
                            self.breakers.record_success(worker_id)
                        yield frame
                        return
                    yield frame
                deadline = time.monotonic() + self.config.request_timeout_s
                msg = await self._next(queue, worker_id, deadline, request)
                if msg is None:
                    finished = True
                    self.breakers.record_failure(worker_id)
                    yield Error(code="worker_lost", message=f"worker {worker_id} stopped responding mid-stream")
                    return
                decoded = self._decode(msg)
                frame = None if isinstance(decoded, Accepted) else decoded
        finally:
            self._close(key, worker_id)
            if not finished:
                await self._cancel(worker_id, request.request_id, "client went away")

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

    def _decode(self, msg: Msg) -> Accepted | StreamFrame | None:
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
