"""The worker node on the bus: registration, heartbeats, inference requests, model commands, cancellation, drain.

The models it serves are its :class:`~mlxcluster.worker.model_host.ModelHost`'s: a request for a model of the
catalogue that is not loaded loads it first (``Progress`` frames keep the controller's first-token timer quiet
meanwhile), and ``worker.<id>.models`` takes load and unload commands.

Each request arrives on ``worker.<id>.inference`` with a NATS reply subject that the controller subscribed
*before* sending, so no frame is lost. The worker answers with ``Accepted``, then
``Token`` frames (an engine coalesces tokens that pile up while this loop publishes), then ``Done`` or
``Error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mlxcluster import __version__
from mlxcluster.bus import Bus, ReplyWriter
from mlxcluster.bus.image_store import ImageMissing, ImageStore, ImagesUnavailable
from mlxcluster.config import Config
from mlxcluster.protocol import (
    Accepted,
    Announce,
    Cancel,
    Capabilities,
    Deregister,
    EmbedRequest,
    EmbedResult,
    Error,
    GroupInfo,
    Hardware,
    InferenceRequest,
    ModelCommand,
    ModelCommandResult,
    Progress,
    PromptCacheStats,
    SpeculationCounts,
    Token,
    WorkerHeartbeat,
    WorkerRegistration,
    WorkerStatus,
    encode,
)
from mlxcluster.tracing import NoTracer, Span, Tracer
from mlxcluster.worker.accelerator import AcceleratorMonitor
from mlxcluster.worker.admission import Admission
from mlxcluster.worker.cache_events import CacheEventPublisher
from mlxcluster.worker.engine_base import Engine
from mlxcluster.worker.memory_budget import MemoryBudget
from mlxcluster.worker.model_host import Lease, LoadError, ModelHost
from mlxcluster.worker.placement import memory_budget_bytes
from mlxcluster.worker.serve_trace import describe_embedding, describe_request, embedded, traced_frames
from mlxcluster.worker.system import ProcessMonitor, hostname

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 5.0
RATE_WINDOW_S = 5.0
LOAD_PROGRESS_S = 1.0
"""How often a request waiting for its model's load tells the controller it is alive."""


class TokenRate:
    """Generated tokens per second over a sliding window."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.window_s = window_s
        self.clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0

    def add(self, count: int) -> None:
        self._events.append((self.clock(), count))
        self._sum += count

    def per_second(self) -> float:
        horizon = self.clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._sum -= self._events.popleft()[1]
        return self._sum / self.window_s


def _add_counts(a: SpeculationCounts | None, b: SpeculationCounts) -> SpeculationCounts:
    if a is None:
        return b
    return SpeculationCounts(
        **{field: getattr(a, field) + getattr(b, field) for field in SpeculationCounts.__struct_fields__}
    )


class WorkerService:
    """Serves a :class:`ModelHost`'s models on the bus under one worker id.

    :param engine: an engine started elsewhere, served as this worker's only, fixed model(s) (a worker group's
        face, tests); otherwise ``host`` is required.
    """

    def __init__(
        self,
        *,
        config: Config,
        bus: Bus,
        worker_id: str,
        hardware: Hardware,
        host: ModelHost | None = None,
        engine: Engine | None = None,
        group: GroupInfo | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
        accelerator: AcceleratorMonitor | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.tracer: Tracer = tracer or NoTracer()
        """Spans of each request, joined to the controller's trace (a no-op tracer with ``[tracing]`` off)."""
        self.probe_interval_s = probe_interval_s  # how often long-running requests are probed for a listener
        self.group = group
        self.bus = bus
        self.images = ImageStore(bus)
        """Where the controller parks images too large for their request's message."""
        if host is None:
            if engine is None:
                raise ValueError("a worker service needs a model host or an engine")
            worker = config.worker
            budget = MemoryBudget(memory_budget_bytes(worker.memory_budget_bytes, worker.memory_budget_gb))
            host = ModelHost.fixed(engine, budget, config.models_dir)
        self.host = host
        self.engine_name = engine.info().name if engine is not None else config.worker.engine
        self.worker_id = worker_id
        self.hardware = hardware
        self.status: WorkerStatus = "online"
        self.admission = Admission(config.worker.max_concurrent, config.worker.max_queue)
        self.rate = TokenRate()
        self.requests_total = 0
        self.tokens_total = 0
        self._speculation_seen: dict[Engine, SpeculationCounts] = {}
        self._speculation_retired: SpeculationCounts | None = None
        self.errors_total = 0
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self._replies: dict[str, tuple[ReplyWriter, float]] = {}  # request id → (its stream, started, monotonic)
        self.started_at = time.time()
        self._monitor = ProcessMonitor()
        self.accelerator = (
            accelerator
            if accelerator is not None
            else AcceleratorMonitor.for_this_machine(mlx=self.engine_name != "echo")
        )
        """MLX memory and GPU load for heartbeats (the GPU sampled on its own task)."""
        self._accelerator_task: asyncio.Task[None] | None = None
        self._subscriptions: list[Subscription] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self.cache_events: dict[int, CacheEventPublisher] = {}
        """Publishers of the loaded engines' prompt-cache digests, by engine (engines with a prompt cache only)."""
        self._cache_sequence = itertools.count(1)  # one seq for all of this worker's cache events
        self._started = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._embedding: dict[str, asyncio.Task[None]] = {}
        """Embedding requests being served, by request id (a drain waits for them as for inference requests; a
        ``Cancel`` naming one cancels it)."""
        self.host.on_change = self._models_changed
        self.host.add_engine_listener(self._engine_changed)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, register and start heartbeating."""
        subjects = self.bus.subjects
        self._subscriptions = [
            await self.bus.subscribe(subjects.inference(self.worker_id), InferenceRequest, self._on_request),
            await self.bus.subscribe(subjects.cancel(self.worker_id), Cancel, self._on_cancel),
            await self.bus.subscribe(subjects.announce, Announce, self._on_announce),
            await self.bus.subscribe(subjects.models(self.worker_id), ModelCommand, self._on_model_command),
            await self.bus.subscribe(subjects.embed(self.worker_id), EmbedRequest, self._on_embed),
        ]
        await self.bus.flush()
        await self.register()
        self._started = True
        for name, engine in self.host.engines().items():
            await self._follow_cache(name, engine)
        self.host.start()
        self._accelerator_task = asyncio.create_task(self.accelerator.run())
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        self._probe_task = asyncio.create_task(self._probe_loop())
        log.info(
            "worker %s serving %s (catalogue: %s) with the %s engine",
            self.worker_id,
            self.models,
            self.host.catalogue.names(),
            self.engine_name,
        )

    async def drain(self, timeout: float, reason: str = "shutdown") -> None:
        """Refuse new work, let in-flight requests finish up to ``timeout``, deregister with ``reason``."""
        self.status = "draining"
        await self.publish_heartbeat()
        pending = [*self.in_flight.values(), *self._embedding.values()]
        if pending:
            log.info("draining: waiting up to %.0fs for %d request(s)", timeout, len(pending))
            _, still_running = await asyncio.wait(pending, timeout=timeout)
            for task in still_running:
                task.cancel()
            if still_running:
                await asyncio.wait(still_running, timeout=5)
        for loop_task in (self._heartbeat_task, self._probe_task, self._accelerator_task, *self._tasks):
            if loop_task is not None:
                loop_task.cancel()
        await self.stop_cache_events()
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.bus.publish(self.bus.subjects.deregister, Deregister(worker_id=self.worker_id, reason=reason))
            await self.bus.flush(timeout=2)

    async def stop_cache_events(self) -> None:
        """Stop publishing prompt-cache events."""
        for publisher in list(self.cache_events.values()):
            await publisher.stop()
        self.cache_events.clear()

    @property
    def models(self) -> list[str]:
        """The models loaded now."""
        return self.host.loaded()

    # --- models ---------------------------------------------------------------------------------

    def _models_changed(self) -> None:
        """A model started or finished loading or unloading: tell the controllers now, not at the next beat."""
        if self._started and self.status != "draining":
            self._spawn(self.publish_heartbeat())

    def _engine_changed(self, name: str, engine: Engine | None) -> None:
        if self._started:
            self._spawn(self._follow_cache(name, engine))

    async def _follow_cache(self, name: str, engine: Engine | None) -> None:
        """Publish a model's prompt-cache events while it is loaded; once it is gone, say its cache is empty."""
        if engine is None:
            for key, publisher in list(self.cache_events.items()):
                if name in publisher.models:
                    del self.cache_events[key]
                    await publisher.stop()
                    await publisher.cleared()
            return
        if engine.prompt_cache_stats() is None or id(engine) in self.cache_events:
            return
        publisher = CacheEventPublisher(
            bus=self.bus,
            engine=engine,
            worker_id=self.worker_id,
            instance=self.started_at,
            models=engine.info().models,
            sequence=self._cache_sequence,
        )
        self.cache_events[id(engine)] = publisher
        await publisher.start()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_model_command(self, command: ModelCommand, msg: Msg) -> None:
        """``worker.<id>.models``: load or unload, answered when done."""
        if not msg.reply:
            self.bus.invalid_messages[msg.subject] += 1
            return
        self._spawn(self._run_model_command(command, msg.reply))

    async def _run_model_command(self, command: ModelCommand, reply: str) -> None:
        try:
            if command.action == "load":
                state, warning = await self.host.load(
                    command.model, keep_alive_s=command.keep_alive, pin=command.pin, force=command.force
                )
                result = ModelCommandResult(ok=True, message="loaded", warning=warning, state=state)
            else:
                last = await self.host.unload(command.model)
                message = "unloaded" if last is not None else "not loaded"
                result = ModelCommandResult(ok=True, message=message, state=last)
        except LoadError as exc:
            result = ModelCommandResult(ok=False, message=str(exc))
        result.memory = self.host.budget.parts()
        with contextlib.suppress(Exception):
            await self.bus.publish(reply, result)

    def registration(self) -> WorkerRegistration:
        sample = self._monitor.sample()
        return WorkerRegistration(
            worker_id=self.worker_id,
            hostname=hostname(),
            hardware=self.hardware,
            capabilities=Capabilities(
                max_concurrent=self.admission.max_concurrent,
                max_queue=self.admission.max_queue,
                models=self.models,
                available_memory_gb=sample.available_memory_gb,
                engine=self.engine_name,
                version=__version__,
                catalogue=self.host.catalogue.models(),
            ),
            started_at=self.started_at,
            group=self.group,
        )

    async def register(self) -> None:
        await self.bus.publish(self.bus.subjects.register, self.registration())

    def heartbeat(self) -> WorkerHeartbeat:
        sample = self._monitor.sample()
        status = self.status
        if status == "online" and self.admission.queued >= max(1, self.admission.max_queue // 2):
            status = "degraded"
        return WorkerHeartbeat(
            worker_id=self.worker_id,
            status=status,
            active=self.admission.active + len(self._embedding),
            queued=self.admission.queued,
            tokens_per_second=round(self.rate.per_second(), 2),
            cpu_percent=sample.cpu_percent,
            rss_bytes=sample.rss_bytes,
            available_memory_gb=sample.available_memory_gb,
            models_loaded=self.models,
            requests_total=self.requests_total,
            tokens_total=self.tokens_total,
            errors_total=self.errors_total,
            sent_at=time.time(),
            prompt_cache=self._prompt_cache_stats(),
            models=self.host.states(),
            catalogue=self.host.catalogue.models(),
            memory=self.host.budget.parts(),
            speculation=self._speculation_counts(),
            accelerator=self.accelerator.sample(),
        )

    def _speculation_counts(self) -> SpeculationCounts | None:
        """Speculative decoding since the worker started: the loaded engines' counts and those of engines gone."""
        engines = set(self.host.engines().values())
        for gone in [engine for engine in self._speculation_seen if engine not in engines]:
            self._speculation_retired = _add_counts(self._speculation_retired, self._speculation_seen.pop(gone))
        for engine in engines:
            counts = engine.speculation_stats()
            if counts is not None:
                self._speculation_seen[engine] = counts
        if not self._speculation_seen and self._speculation_retired is None:
            return None
        total = self._speculation_retired
        for counts in self._speculation_seen.values():
            total = _add_counts(total, counts)
        return total

    def _prompt_cache_stats(self) -> PromptCacheStats | None:
        """The loaded engines' prompt caches together (None: no engine has one)."""
        found = [s for s in (e.prompt_cache_stats() for e in set(self.host.engines().values())) if s is not None]
        if not found:
            return None
        if len(found) == 1:
            return found[0]
        total = PromptCacheStats()
        for stats in found:
            for field in PromptCacheStats.__struct_fields__:
                setattr(total, field, getattr(total, field) + getattr(stats, field))
        return total

    async def publish_heartbeat(self) -> None:
        with contextlib.suppress(Exception):
            await self.bus.publish(self.bus.subjects.heartbeat, self.heartbeat())

    async def _heartbeat_loop(self) -> None:
        interval = self.config.discovery.heartbeat_interval_ms / 1000
        while True:
            await self.publish_heartbeat()
            await asyncio.sleep(interval)

    # --- handlers -------------------------------------------------------------------------------

    async def _on_announce(self, announce: Announce, _msg: Msg) -> None:
        log.info("controller %s announced itself; registering again", announce.controller_id)
        await self.register()
        await self.publish_heartbeat()
        for publisher in list(self.cache_events.values()):  # a new controller's cache index starts empty
            await publisher.snapshot()

    async def _on_cancel(self, cancel: Cancel, _msg: Msg) -> None:
        task = self.in_flight.get(cancel.request_id) or self._embedding.get(cancel.request_id)
        if task is not None:
            log.debug("cancelling %s: %s", cancel.request_id, cancel.reason)
            task.cancel()

    async def _on_request(self, request: InferenceRequest, msg: Msg) -> None:
        if not msg.reply:
            self.bus.invalid_messages[msg.subject] += 1
            log.warning("dropped request %s without a reply subject", request.request_id)
            return
        stream = ReplyWriter(self.bus, msg.reply)
        if self.status == "draining":
            await stream.send(Error(code="draining", message="worker is draining", retryable=True))
            return
        if request.request_id in self.in_flight:
            return  # a duplicate delivery of a request we already serve
        self.requests_total += 1
        span = self.tracer.start("worker.request", headers=msg.headers, kind="server")
        task = asyncio.create_task(self._serve(request, stream, span))
        self.in_flight[request.request_id] = task
        self._replies[request.request_id] = (stream, time.monotonic())
        task.add_done_callback(lambda _t: self._forget(request.request_id, span))

    def _forget(self, request_id: str, span: Span) -> None:
        self.in_flight.pop(request_id, None)
        self._replies.pop(request_id, None)
        span.end()  # _serve ends it; not when the task was cancelled before its first step (ending twice: nothing)

    # --- serving one request --------------------------------------------------------------------

    async def _fetch_images(self, request: InferenceRequest, stream: ReplyWriter) -> bool:
        """Read the request's images parked in the object store back into it; False (an Error sent) when
        that fails."""
        try:
            await self.images.fetch(request)
        except ImageMissing as exc:
            await stream.send(Error(code="invalid_request", message=str(exc), param="messages"))
            return False
        except ImagesUnavailable as exc:
            await stream.send(Error(code="images_unavailable", message=str(exc), retryable=True))
            return False
        return True

    async def _serve(self, request: InferenceRequest, stream: ReplyWriter, span: Span) -> None:
        """Load the model if needed, admit, generate and stream one request; every path ends with Done or Error
        (numbered by ``stream``). ``span`` ends with it."""
        received_ns = 0
        if span.recording:
            received_ns = time.time_ns()
            describe_request(span, request, self.worker_id)
        send = stream.send
        if request.model not in self.host.catalogue:
            span.fail("model_not_found")
            span.end()
            await send(
                Error(code="model_not_found", message=f"model {request.model!r} is not served here", retryable=True)
            )
            return
        loaded = request.model in self.host.engines()
        await send(Accepted(worker_id=self.worker_id, queued=not loaded or self.admission.would_queue()))
        timeout = None if request.deadline is None else max(0.0, request.deadline - time.time())
        emitted = 0
        lease: Lease | None = None
        try:
            async with asyncio.timeout(timeout):
                if not await self._fetch_images(request, stream):
                    span.fail("images_unavailable")
                    return
                lease = await self._acquire(request, send)
                if lease is None:
                    span.fail("model_load_failed")
                    return
                if not await self.admission.acquire(continued=request.continuation is not None):
                    self.errors_total += 1
                    span.fail("overloaded")
                    await send(Error(code="overloaded", message="worker queue is full", retryable=True))
                    return
                try:
                    generated = lease.engine.generate(request)
                    if span.recording:
                        generated = traced_frames(generated, span, received_ns)
                    # aclosing: a cancel landing in publish() must close the engine's stream at once
                    async with contextlib.aclosing(generated) as frames:
                        async for frame in frames:
                            if isinstance(frame, Token):
                                emitted += frame.count
                                self.tokens_total += frame.count
                                self.rate.add(frame.count)
                            elif isinstance(frame, Error):
                                self.errors_total += 1
                            await send(frame)
                finally:
                    self.admission.release()
        except TimeoutError:
            self.errors_total += 1
            span.fail("deadline_exceeded")
            await send(Error(code="deadline_exceeded", message="request deadline passed on the worker"))
        except asyncio.CancelledError:
            span.event("cancelled")
            with contextlib.suppress(Exception):
                await stream.cancelled()
            raise
        except Exception as exc:
            self.errors_total += 1
            span.fail("engine_error")
            log.exception("engine failed on %s", request.request_id)
            await send(Error(code="engine_error", message=str(exc) or type(exc).__name__, retryable=emitted == 0))
        finally:
            span.end()
            if lease is not None:
                lease.release()

    async def _acquire(self, request: InferenceRequest, send: Any) -> Lease | None:
        """The request's model, loaded (a Progress frame every :data:`LOAD_PROGRESS_S` while it loads); ``None``
        once an Error has been sent (the load failed)."""
        if self.host.state(request.model) is not None and request.model in self.host.engines():
            return await self.host.acquire(request.model, request.keep_alive)  # loaded: no wait, no loop turn
        acquiring = asyncio.ensure_future(self.host.acquire(request.model, request.keep_alive))
        try:
            while True:
                done, _ = await asyncio.wait([acquiring], timeout=LOAD_PROGRESS_S)
                if done:
                    return acquiring.result()
                await send(Progress())
        except LoadError as exc:
            self.errors_total += 1
            await send(Error(code="model_load_failed", message=str(exc)))
            return None
        finally:
            if not acquiring.done():
                acquiring.cancel()
                # a lease granted just as we were cancelled must not keep the model in flight for ever
                acquiring.add_done_callback(_release_late)

    # --- embeddings -----------------------------------------------------------------------------

    @property
    def max_embedding(self) -> int:
        """Embedding requests served at once at most (all embedding models together): ``max_concurrent +
        max_queue``, as many as chat requests may run and wait; past it a request gets a retryable ``overloaded``.
        Each engine bounds the tokens queued for its batch thread besides."""
        return self.admission.max_concurrent + self.admission.max_queue

    async def _on_embed(self, request: EmbedRequest, msg: Msg) -> None:
        """``worker.<id>.embed``: an embedding request, answered with one :class:`EmbedResult`."""
        if not msg.reply:
            self.bus.invalid_messages[msg.subject] += 1
            return
        if request.request_id in self._embedding:
            return  # a duplicate delivery of a request we already serve
        span = self.tracer.start("worker.embed", headers=msg.headers, kind="server")
        if span.recording:
            describe_embedding(span, request, self.worker_id)
        if len(self._embedding) >= self.max_embedding:
            self.requests_total += 1
            message = f"worker serves {len(self._embedding)} embedding requests already"
            span.fail("overloaded")
            span.end()
            await self._reply_embed(
                EmbedResult(error=Error(code="overloaded", message=message, retryable=True)), msg.reply
            )
            return
        task = asyncio.ensure_future(self._answer_embed(request, msg.reply, span))
        self._embedding[request.request_id] = task
        task.add_done_callback(lambda _t: self._embedding.pop(request.request_id, None))

    async def _answer_embed(self, request: EmbedRequest, reply: str, span: Span) -> None:
        self.requests_total += 1
        try:
            result = await self._embed(request)
        except asyncio.CancelledError:  # the controller gave up (no answer wanted), or a drain ran out
            span.fail("cancelled")
            span.end()
            with contextlib.suppress(Exception):
                stopped = Error(
                    code="shutting_down", message="embedding request cancelled on the worker", retryable=True
                )
                await self._reply_embed(EmbedResult(error=stopped), reply)
            raise
        if span.recording:
            embedded(span, result)
        span.end()
        await self._reply_embed(result, reply)

    async def _reply_embed(self, result: EmbedResult, reply: str) -> None:
        result.worker_id = self.worker_id
        if result.error is not None:
            self.errors_total += 1
        payload = encode(result)
        if len(payload) > self.bus.max_payload:
            self.errors_total += 1
            message = f"the vectors ({len(payload)} bytes) exceed the NATS max_payload of {self.bus.max_payload} bytes"
            payload = encode(
                EmbedResult(worker_id=self.worker_id, error=Error(code="payload_too_large", message=message))
            )
        with contextlib.suppress(Exception):
            await self.bus.publish_encoded(reply, payload)

    async def _embed(self, request: EmbedRequest) -> EmbedResult:
        """The model's vectors for ``request`` (loading the model first if needed), or the error."""
        if self.status == "draining":
            return EmbedResult(error=Error(code="draining", message="worker is draining", retryable=True))
        if request.model not in self.host.catalogue:
            message = f"model {request.model!r} is not served here"
            return EmbedResult(error=Error(code="model_not_found", message=message, retryable=True))
        timeout = None if request.deadline is None else max(0.0, request.deadline - time.time())
        lease: Lease | None = None
        try:
            async with asyncio.timeout(timeout):
                lease = await self.host.acquire(request.model, request.keep_alive)
                result = await lease.engine.embed(request)
        except LoadError as exc:
            return EmbedResult(error=Error(code="model_load_failed", message=str(exc)))
        except TimeoutError:
            return EmbedResult(error=Error(code="deadline_exceeded", message="request deadline passed on the worker"))
        except Exception as exc:
            log.exception("embedding failed on %s", request.request_id)
            return EmbedResult(error=Error(code="engine_error", message=str(exc) or type(exc).__name__, retryable=True))
        finally:
            if lease is not None:
                lease.release()
        self.tokens_total += result.prompt_tokens
        return result

    async def _probe_loop(self) -> None:
        """Every few seconds, ask whether anyone still waits for each long-running request; cancel if not.

        The controller answers a probe on its inbox, or says ``gone`` for a request it abandoned; if the
        controller itself is gone, NATS answers "no responders". One loop serves all requests.
        """
        while True:
            await asyncio.sleep(self.probe_interval_s)
            horizon = time.monotonic() - self.probe_interval_s
            old = [(rid, stream) for rid, (stream, started) in self._replies.items() if started < horizon]
            results = await asyncio.gather(*(stream.consumer_gone() for _, stream in old))
            for (request_id, stream), gone in zip(old, results, strict=True):
                task = self.in_flight.get(request_id)
                if gone and task is not None:
                    log.info("nobody waits for %s any more; cancelling", stream.reply)
                    task.cancel()


def _release_late(acquiring: asyncio.Future[Lease]) -> None:
    if not acquiring.cancelled() and acquiring.exception() is None:
        acquiring.result().release()
