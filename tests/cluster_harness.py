"""In-process cluster parts for tests: echo workers, the controller app on a real port, fake workers.

Everything talks over the real nats-server started by the ``nats_server`` fixture; nothing here mocks
NATS. A :class:`Cluster` remembers what it started and stops it all (controller first) on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import openai
from aiohttp import web
from loopback import free_port
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.controller.app import create_app
from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.plugins import get_plugin_manager
from mlxcluster.protocol import (
    PROBE_HEADER,
    Accepted,
    Capabilities,
    ChatMessage,
    Done,
    Error,
    Frame,
    Hardware,
    InferenceRequest,
    ProtocolError,
    Token,
    WorkerHeartbeat,
    WorkerRegistration,
    decode_frames,
    encode,
)
from mlxcluster.tracing import Tracer
from mlxcluster.worker.accelerator import AcceleratorMonitor
from mlxcluster.worker.echo import EchoEngine
from mlxcluster.worker.service import PROBE_INTERVAL_S, WorkerService

WAIT_S = 10.0
TEST_HARDWARE = Hardware(chip="Test CPU 9000", cpu_cores=4, memory_gb=16.0, accelerator="cpu")


async def wait_until(
    predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition", interval: float = 0.02
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def barrier(bus: Bus) -> None:
    """Return once the server has processed every SUB this connection sent so far.

    One ``flush()`` is not enough with nats-py 2.16: its PING is written straight to the socket while
    SUB commands wait in the pending buffer for the flusher task, so the PONG can come back before the
    server saw the SUB. The second PING goes out after that buffer was flushed.
    """
    await bus.nc.flush()
    await bus.nc.flush()


def with_sections(config: Config, **sections: dict[str, Any]) -> Config:
    """``config`` with fields of some sections replaced: ``with_sections(c, worker={"max_queue": 1})``."""
    changes = {name: msgspec.structs.replace(getattr(config, name), **values) for name, values in sections.items()}
    return msgspec.structs.replace(config, **changes)


def chat_request(text: str, *, model: str = "echo", request_id: str | None = None, **fields: Any) -> InferenceRequest:
    """A wire chat request whose echo answer is ``text``."""
    return InferenceRequest(
        request_id=request_id or f"req-{time.monotonic_ns()}",
        model=model,
        messages=[ChatMessage(role="user", content=text)],
        **fields,
    )


def words(count: int, stem: str = "w") -> str:
    """``"w0 w1 ... w<count-1>"``: an echo prompt of ``count`` tokens."""
    return " ".join(f"{stem}{i}" for i in range(count))


# --- talking to a worker directly -------------------------------------------------------------


class FrameStream:
    """The frames of one request sent straight to a worker's inference subject (no controller)."""

    def __init__(self, bus: Bus, sub: Subscription, request: InferenceRequest) -> None:
        self.bus = bus
        self.sub = sub
        self.request = request
        self.frames: list[Frame] = []
        self._unread: list[Frame] = []  # frames that came batched in one message, not yet returned

    @classmethod
    async def open(cls, bus: Bus, worker_id: str, request: InferenceRequest) -> FrameStream:
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox)
        await bus.nc.publish(bus.subjects.inference(worker_id), encode(request), reply=inbox)
        return cls(bus, sub, request)

    async def next(self, timeout: float = WAIT_S) -> Frame | None:
        """The next frame, or ``None`` if none comes within ``timeout`` (liveness probes are answered)."""
        deadline = time.monotonic() + timeout
        while not self._unread:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                msg: Msg = await self.sub.next_msg(timeout=remaining)
            except TimeoutError:
                return None
            if msg.headers and msg.headers.get(PROBE_HEADER):
                await msg.respond(b"")
                continue
            try:
                self._unread = decode_frames(msg.data)
            except ProtocolError as exc:
                raise AssertionError(f"undecodable frame {msg.data!r} headers={msg.headers!r}") from exc
        frame = self._unread.pop(0)
        self.frames.append(frame)
        return frame

    async def rest(self, timeout: float = WAIT_S) -> list[Frame]:
        """Read until Done or Error; fail if the stream stalls for ``timeout`` seconds."""
        while not self.frames or not isinstance(self.frames[-1], Done | Error):
            if await self.next(timeout) is None:
                raise AssertionError(f"stream stalled after {self.frames!r}")
        return self.frames

    async def close(self) -> None:
        await self.sub.unsubscribe()


async def request_frames(bus: Bus, worker_id: str, request: InferenceRequest, timeout: float = WAIT_S) -> list[Frame]:
    """Send ``request`` to ``worker_id`` and return all its frames up to Done/Error."""
    stream = await FrameStream.open(bus, worker_id, request)
    try:
        return await stream.rest(timeout)
    finally:
        await stream.close()


def check_stream(frames: list[Frame], expected_text: str) -> Done:
    """Assert Accepted, Tokens in seq order making ``expected_text``, then Done; return the Done."""
    assert isinstance(frames[0], Accepted), frames
    assert isinstance(frames[-1], Done), frames
    tokens = frames[1:-1]
    assert all(isinstance(t, Token) for t in tokens), frames
    seqs = [t.seq for t in tokens]  # type: ignore[union-attr]
    assert seqs == list(range(len(tokens))), seqs  # numbered by the worker's stream writer
    assert frames[-1].seq == len(tokens)  # type: ignore[union-attr]
    assert "".join(t.text for t in tokens) == expected_text  # type: ignore[union-attr]
    done = frames[-1]
    assert done.usage.completion_tokens == sum(t.count for t in tokens)  # type: ignore[union-attr]
    return done


# --- nodes ------------------------------------------------------------------------------------


@dataclass
class RunningWorker:
    """An echo :class:`WorkerService` on its own NATS connection."""

    service: WorkerService
    bus: Bus
    engine: EchoEngine
    stopped: bool = False

    @property
    def id(self) -> str:
        return self.service.worker_id

    async def stop(self, *, drain: bool = True) -> None:
        """Drain (deregister) and close the connection; ``drain=False`` vanishes without a word."""
        if self.stopped:
            return
        self.stopped = True
        if drain:
            await self.service.drain(timeout=2)
        else:
            for task in list(self.service.in_flight.values()):
                task.cancel()
            for name in ("_heartbeat_task", "_probe_task"):
                task = getattr(self.service, name, None)
                if task is not None:
                    task.cancel()
            await self.service.stop_cache_events()
        await self.bus.close(drain=drain)


async def start_worker(
    config: Config,
    worker_id: str,
    *,
    models: list[str] | None = None,
    token_delay_ms: float = 0.0,
    engine: EchoEngine | None = None,
    probe_interval_s: float = PROBE_INTERVAL_S,
    accelerator: AcceleratorMonitor | None = None,
    tracer: Tracer | None = None,
) -> RunningWorker:
    """Start an echo worker (``config.worker`` gives max_concurrent/max_queue; ``accelerator``: what its heartbeats
    say of MLX and the GPU, by default this machine's)."""
    bus = await Bus.connect(config.nats, name=f"test-worker-{worker_id}", attempts=5)
    engine = engine or EchoEngine(models=models or ["echo"], token_delay_ms=token_delay_ms)
    service = WorkerService(
        config=config,
        bus=bus,
        engine=engine,
        worker_id=worker_id,
        hardware=TEST_HARDWARE,
        probe_interval_s=probe_interval_s,
        accelerator=accelerator,
        tracer=tracer,
    )
    await service.start()
    await barrier(bus)  # tests send requests at once, without waiting for the registration to be seen
    return RunningWorker(service=service, bus=bus, engine=engine)


@dataclass
class RunningController:
    """The controller app from ``create_app`` served by aiohttp on a free loopback port."""

    app: web.Application
    runner: web.AppRunner
    bus: Bus
    port: int
    owns_bus: bool = True
    _sessions: list[aiohttp.ClientSession] = field(default_factory=list)
    _clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ctx(self) -> ControllerContext:
        return self.app[CONTROLLER]

    def client(self, api_key: str = "x", **options: Any) -> openai.AsyncOpenAI:
        """The official openai client pointed at this controller (no retries: a failure is a failure)."""
        client = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=options.pop("timeout", 30.0), **options
        )
        self._clients.append(client)
        return client

    def session(self) -> aiohttp.ClientSession:
        """A raw HTTP session (closed with the controller)."""
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._sessions.append(session)
        return session

    def served(self) -> Counter[str]:
        """Requests per worker (the last one of each request), in flight and finished, as the request monitor
        (``/api/cluster/requests``) lists them."""
        ctx = self.ctx
        workers = [m.worker for m in ctx.dispatcher.live.values()] + [r.worker for r in ctx.ops.requests.finished]
        return Counter(w for w in workers if w is not None)

    async def workers(self, status: str | None = None) -> list[dict[str, Any]]:
        query = f"?status={status}" if status else ""
        async with aiohttp.ClientSession() as session, session.get(f"{self.url}/api/cluster/workers{query}") as resp:
            return (await resp.json())["workers"]

    async def wait_online(self, *worker_ids: str, timeout: float = WAIT_S) -> None:
        """Wait until every named worker is online in the registry (as the cluster API shows it)."""

        async def all_online() -> bool:
            online = {w["id"] for w in await self.workers("online")}
            return set(worker_ids) <= online

        await wait_until(all_online, timeout, f"workers {worker_ids} online")

    async def stop(self) -> None:
        for client in self._clients:
            await client.close()
        for session in self._sessions:
            await session.close()
        await self.runner.cleanup()
        if self.owns_bus:
            await self.bus.close()


async def start_controller(
    config: Config, bus: Bus | None = None, *, tracer: Tracer | None = None
) -> RunningController:
    """Build the app with the factory and serve it like ``serve_controller`` does."""
    owns_bus = bus is None
    if bus is None:
        bus = await Bus.connect(config.nats, name="test-controller", attempts=5)
    app = create_app(config, bus, get_plugin_manager(config.plugins), tracer=tracer)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return RunningController(app=app, runner=runner, bus=bus, port=port, owns_bus=owns_bus)


# --- fake workers: a registration and heartbeats with misbehaving inference handlers ----------

FakeHandler = Callable[["FakeWorker", InferenceRequest, Msg], Awaitable[None]]


class FakeWorker:
    """A worker that registers and heartbeats like a real one but answers requests as ``handler`` says.

    ``handler=None`` means nobody subscribes to the inference subject (NATS answers "no responders").
    """

    def __init__(self, bus: Bus, worker_id: str, handler: FakeHandler | None, *, models: list[str] | None = None):
        self.bus = bus
        self.id = worker_id
        self.handler = handler
        self.models = models or ["echo"]
        self.received: list[InferenceRequest] = []
        self.cancels: list[str] = []
        self.heartbeating = True
        self._subs: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, interval_s: float = 0.2) -> FakeWorker:
        subjects = self.bus.subjects
        if self.handler is not None:
            self._subs.append(await self.bus.subscribe(subjects.inference(self.id), InferenceRequest, self._on_request))
        self._subs.append(await self.bus.nc.subscribe(subjects.cancel(self.id), cb=self._on_cancel))
        self._subs.append(await self.bus.nc.subscribe(subjects.announce, cb=self._on_announce))
        await barrier(self.bus)
        await self.register()
        self._task = asyncio.create_task(self._heartbeats(interval_s))
        return self

    async def register(self) -> None:
        registration = WorkerRegistration(
            worker_id=self.id,
            hardware=TEST_HARDWARE,
            capabilities=Capabilities(max_concurrent=8, max_queue=8, models=self.models, engine="fake"),
        )
        await self.bus.publish(self.bus.subjects.register, registration)

    async def _on_announce(self, _msg: Msg) -> None:
        if self.heartbeating:
            await self.register()

    async def _heartbeats(self, interval_s: float) -> None:
        while True:
            if self.heartbeating:
                await self.bus.publish(
                    self.bus.subjects.heartbeat, WorkerHeartbeat(worker_id=self.id, models_loaded=self.models)
                )
            await asyncio.sleep(interval_s)

    async def _on_request(self, request: InferenceRequest, msg: Msg) -> None:
        self.received.append(request)
        assert self.handler is not None
        task = asyncio.create_task(self.handler(self, request, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_cancel(self, msg: Msg) -> None:
        self.cancels.append(msg.data.decode())

    async def send(self, msg: Msg, frame: Frame) -> None:
        await self.bus.publish(msg.reply, frame)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass


async def ignore(_fake: FakeWorker, _request: InferenceRequest, _msg: Msg) -> None:
    """A fake handler that never answers."""


# --- a whole cluster --------------------------------------------------------------------------


class Cluster:
    """Starts workers, fakes and a controller on one config; stops them all on exit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers: dict[str, RunningWorker] = {}
        self.fakes: list[FakeWorker] = []
        self.controller: RunningController | None = None
        self._fake_bus: Bus | None = None

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start_controller(
        self, config: Config | None = None, *, tracer: Tracer | None = None
    ) -> RunningController:
        self.controller = await start_controller(config or self.config, tracer=tracer)
        return self.controller

    async def start_worker(self, worker_id: str, *, config: Config | None = None, **options: Any) -> RunningWorker:
        worker = await start_worker(config or self.config, worker_id, **options)
        self.workers[worker_id] = worker
        return worker

    async def start_fake(self, worker_id: str, handler: FakeHandler | None, **options: Any) -> FakeWorker:
        if self._fake_bus is None:
            self._fake_bus = await Bus.connect(self.config.nats, name="test-fakes", attempts=5)
        fake = await FakeWorker(self._fake_bus, worker_id, handler, **options).start()
        self.fakes.append(fake)
        return fake

    async def close(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
        for fake in self.fakes:
            await fake.stop()
        for worker in self.workers.values():
            await worker.stop()
        if self._fake_bus is not None:
            await self._fake_bus.close(drain=False)


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The ``data:`` payloads of an SSE response, ``[DONE]`` included."""
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line[len("data: ") :]


@contextlib.asynccontextmanager
async def single_worker_cluster(config: Config, worker_id: str = "w1", **worker_options: Any) -> AsyncIterator[Cluster]:
    """A controller and one echo worker, online: the set-up most API tests start from."""
    async with Cluster(config) as running:
        await running.start_worker(worker_id, **worker_options)
        controller = await running.start_controller()
        await controller.wait_online(worker_id)
        yield running


def demo_model_or_skip() -> Any:
    """The demo model's directory (made on first use), or skip the test when it cannot be prepared."""
    import os
    from pathlib import Path

    import pytest

    from mlxcluster.models.demo import DemoModelError, ensure_demo_model
    from mlxcluster.models.registry import default_models_dir

    models_dir = Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir())
    try:
        return ensure_demo_model(models_dir)
    except DemoModelError as exc:
        pytest.skip(f"demo model cannot be prepared: {exc}")
