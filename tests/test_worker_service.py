"""The worker service on the real nats-server with the echo engine: registration, heartbeats, the stream
of frames, concurrency and queueing, cancellation, deadlines, drain and bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from cluster_harness import (
    TEST_HARDWARE,
    FrameStream,
    RunningWorker,
    barrier,
    chat_request,
    check_stream,
    request_frames,
    start_worker,
    wait_until,
    with_sections,
    words,
)
from nats.aio.msg import Msg

from mlxcluster import __version__
from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.errors import NodeFailed
from mlxcluster.protocol import (
    GONE_HEADER,
    PROBE_HEADER,
    Accepted,
    Announce,
    Cancel,
    Deregister,
    Done,
    Error,
    InferenceRequest,
    Token,
    Usage,
    WorkerHeartbeat,
    WorkerRegistration,
    encode,
)
from mlxcluster.worker.echo import EchoEngine
from mlxcluster.worker.engine_base import EngineFrame
from mlxcluster.worker.worker_role import serve_worker


class Collected:
    """Typed messages seen on one subject."""

    def __init__(self) -> None:
        self.items: list = []

    async def handler(self, message: object, _msg: Msg) -> None:
        self.items.append(message)


async def collect(bus: Bus, subject: str, message_type: type) -> Collected:
    seen = Collected()
    await bus.subscribe(subject, message_type, seen.handler)
    await barrier(bus)
    return seen


@pytest.fixture
async def worker(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[RunningWorker]:
    """One echo worker ``w1`` with no token delay."""
    running = await start_worker(cluster_config, "w1")
    yield running
    await running.stop()


class CountingEcho(EchoEngine):
    """Echo engine that records how many generations run at the same time."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.running = 0
        self.peak = 0

    async def generate(self, request: InferenceRequest) -> AsyncIterator[EngineFrame]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            async for frame in super().generate(request):
                yield frame
        finally:
            self.running -= 1


# --- registration and heartbeats --------------------------------------------------------------


async def test_registration_describes_the_worker(cluster_config: Config, bus: Bus) -> None:
    registrations = await collect(bus, bus.subjects.register, WorkerRegistration)
    config = with_sections(cluster_config, worker={"max_concurrent": 3, "max_queue": 7})
    running = await start_worker(config, "w-reg", models=["m-a", "m-b"])
    try:
        found = await wait_until(lambda: [r for r in registrations.items if r.worker_id == "w-reg"])
        registration: WorkerRegistration = found[0]
        assert registration.hardware == TEST_HARDWARE
        caps = registration.capabilities
        assert caps.models == ["m-a", "m-b"]
        assert caps.engine == "echo"
        assert (caps.max_concurrent, caps.max_queue) == (3, 7)
        assert caps.version == __version__
        assert caps.available_memory_gb > 0
        assert registration.hostname
        assert abs(registration.started_at - time.time()) < 60
    finally:
        await running.stop()


async def test_announce_makes_the_worker_register_again(worker: RunningWorker, bus: Bus) -> None:
    registrations = await collect(bus, bus.subjects.register, WorkerRegistration)
    await bus.publish(bus.subjects.announce, Announce(controller_id="c-test"))
    found = await wait_until(lambda: [r for r in registrations.items if r.worker_id == "w1"], timeout=5)
    assert found[0].capabilities.models == ["echo"]


async def test_heartbeats_report_load_and_totals(cluster_config: Config, bus: Bus) -> None:
    heartbeats = await collect(bus, bus.subjects.heartbeat, WorkerHeartbeat)
    config = with_sections(cluster_config, worker={"max_concurrent": 1, "max_queue": 4})
    running = await start_worker(config, "w-hb", token_delay_ms=40)
    try:
        first: WorkerHeartbeat = await wait_until(lambda: [h for h in heartbeats.items if h.worker_id == "w-hb"])
        assert first[0].status == "online"
        assert first[0].active == first[0].queued == first[0].requests_total == 0
        assert first[0].models_loaded == ["echo"]
        assert first[0].rss_bytes > 0

        # One runs, two wait: the heartbeats must show it (and "degraded" once half the queue is used).
        streams = [await FrameStream.open(bus, "w-hb", chat_request(words(10), request_id=f"r{i}")) for i in range(3)]
        busy = await wait_until(
            lambda: [h for h in heartbeats.items if h.worker_id == "w-hb" and h.active == 1 and h.queued == 2]
        )
        assert busy[-1].status == "degraded"
        for stream in streams:
            check_stream(await stream.rest(), words(10))
            await stream.close()

        def after_traffic() -> list[WorkerHeartbeat]:
            return [
                h
                for h in heartbeats.items
                if h.worker_id == "w-hb" and h.requests_total == 3 and h.active == 0 and h.queued == 0
            ]

        done: list[WorkerHeartbeat] = await wait_until(after_traffic)
        assert done[-1].tokens_total == 30
        assert done[-1].tokens_per_second > 0
        assert done[-1].status == "online"
        assert done[-1].errors_total == 0
    finally:
        await running.stop()


# --- the stream of frames ---------------------------------------------------------------------


async def test_frames_are_accepted_tokens_done(worker: RunningWorker, bus: Bus) -> None:
    frames = await request_frames(bus, "w1", chat_request("the quick brown fox"))
    done = check_stream(frames, "the quick brown fox")
    assert frames[0] == Accepted(worker_id="w1", queued=False)
    assert done.finish_reason == "stop"
    assert done.usage.prompt_tokens == 4
    assert done.usage.completion_tokens == 4
    assert done.usage.total_tokens == 8
    assert done.timings.total_ms >= 0


async def test_max_tokens_and_stop(worker: RunningWorker, bus: Bus) -> None:
    frames = await request_frames(bus, "w1", chat_request("a b c d e f", max_tokens=3))
    done = check_stream(frames, "a b c")
    assert done.finish_reason == "length"
    frames = await request_frames(bus, "w1", chat_request("one two three four", stop=[" thr"]))
    assert check_stream(frames, "one two").finish_reason == "stop"


async def test_unknown_model_is_a_retryable_error(worker: RunningWorker, bus: Bus) -> None:
    frames = await request_frames(bus, "w1", chat_request("hi", model="nope"))
    assert len(frames) == 1
    assert isinstance(frames[0], Error)
    assert frames[0].code == "model_not_found" and frames[0].retryable


async def test_eight_concurrent_streams_are_complete_and_in_order(cluster_config: Config, bus: Bus) -> None:
    config = with_sections(cluster_config, worker={"max_concurrent": 8, "max_queue": 8})
    engine = CountingEcho(token_delay_ms=5)
    running = await start_worker(config, "w8", engine=engine)
    try:
        texts = [words(20, stem=f"s{i}x") for i in range(8)]
        results = await asyncio.gather(
            *(request_frames(bus, "w8", chat_request(text, request_id=f"c{i}")) for i, text in enumerate(texts))
        )
        for text, frames in zip(texts, results, strict=True):
            done = check_stream(frames, text)
            assert done.usage.completion_tokens == 20
        assert engine.peak > 1, "the eight requests never overlapped"
        assert running.service.requests_total == 8
        await wait_until(lambda: not running.service.in_flight)
    finally:
        await running.stop()


async def test_concurrency_bound_and_queue_refusal(cluster_config: Config, bus: Bus) -> None:
    config = with_sections(cluster_config, worker={"max_concurrent": 1, "max_queue": 1})
    engine = CountingEcho(token_delay_ms=30)
    running = await start_worker(config, "w-q", engine=engine)
    try:
        streams = [await FrameStream.open(bus, "w-q", chat_request(words(8), request_id=f"q{i}")) for i in range(3)]
        first, second, third = [await s.rest() for s in streams]
        check_stream(first, words(8))
        check_stream(second, words(8))
        assert second[0] == Accepted(worker_id="w-q", queued=True)
        assert isinstance(third[-1], Error), third
        assert third[-1].code == "overloaded" and third[-1].retryable
        assert not any(isinstance(f, Token) for f in third)
        assert engine.peak == 1
        assert running.service.admission.active == 0 and running.service.admission.queued == 0
        assert running.service.errors_total == 1
        for stream in streams:
            await stream.close()
    finally:
        await running.stop()


async def test_cancel_stops_generation(cluster_config: Config, bus: Bus) -> None:
    running = await start_worker(cluster_config, "w-c", token_delay_ms=40)
    try:
        stream = await FrameStream.open(bus, "w-c", chat_request(words(100), request_id="to-cancel"))
        assert isinstance(await stream.next(), Accepted)
        assert isinstance(await stream.next(), Token)
        assert isinstance(await stream.next(), Token)
        await bus.publish(bus.subjects.cancel("w-c"), Cancel(request_id="to-cancel", reason="test"))
        frames = await stream.rest(timeout=5)
        tokens_after_cancel = len(frames) - 3 - 1
        assert tokens_after_cancel <= 2, frames  # within a token of the worker seeing the Cancel (40 ms each)
        assert frames[-1] == Done(finish_reason="cancelled")
        # Nothing follows the Done.
        assert await stream.next(timeout=0.3) is None
        await wait_until(lambda: not running.service.in_flight, timeout=2)
        assert running.service.admission.active == 0
        await stream.close()
        # The worker still serves.
        check_stream(await request_frames(bus, "w-c", chat_request("still here")), "still here")
    finally:
        await running.stop()


async def test_cancel_of_a_queued_request_frees_its_place(cluster_config: Config, bus: Bus) -> None:
    config = with_sections(cluster_config, worker={"max_concurrent": 1, "max_queue": 1})
    running = await start_worker(config, "w-cq", token_delay_ms=30)
    try:
        running_stream = await FrameStream.open(bus, "w-cq", chat_request(words(10), request_id="a"))
        queued_stream = await FrameStream.open(bus, "w-cq", chat_request(words(10), request_id="b"))
        assert await queued_stream.next() == Accepted(worker_id="w-cq", queued=True)
        await bus.publish(bus.subjects.cancel("w-cq"), Cancel(request_id="b"))
        assert (await queued_stream.rest())[-1] == Done(finish_reason="cancelled")
        assert running.service.admission.queued == 0
        # The freed place takes a new request instead of refusing it.
        check_stream(await request_frames(bus, "w-cq", chat_request("next one", request_id="c")), "next one")
        check_stream(await running_stream.rest(), words(10))
        assert running.service.admission.active == 0
        await running_stream.close()
        await queued_stream.close()
    finally:
        await running.stop()


async def test_deadline_in_the_past(worker: RunningWorker, bus: Bus) -> None:
    frames = await request_frames(bus, "w1", chat_request("too late", deadline=time.time() - 1))
    assert isinstance(frames[-1], Error), frames
    assert frames[-1].code == "deadline_exceeded"
    assert not any(isinstance(f, Token) for f in frames)


async def test_deadline_during_generation(cluster_config: Config, bus: Bus) -> None:
    running = await start_worker(cluster_config, "w-dl", token_delay_ms=30)
    try:
        started = time.monotonic()
        frames = await request_frames(bus, "w-dl", chat_request(words(200), deadline=time.time() + 0.3))
        assert time.monotonic() - started < 3
        assert isinstance(frames[-1], Error) and frames[-1].code == "deadline_exceeded", frames[-3:]
        assert any(isinstance(f, Token) for f in frames)
    finally:
        await running.stop()


async def test_drain_finishes_in_flight_refuses_new_and_deregisters(cluster_config: Config, bus: Bus) -> None:
    deregistrations = await collect(bus, bus.subjects.deregister, Deregister)
    heartbeats = await collect(bus, bus.subjects.heartbeat, WorkerHeartbeat)
    running = await start_worker(cluster_config, "w-d", token_delay_ms=20)
    try:
        in_flight = [await FrameStream.open(bus, "w-d", chat_request(words(15), request_id=f"d{i}")) for i in range(2)]
        for stream in in_flight:
            assert isinstance(await stream.next(), Accepted)
        drain = asyncio.create_task(running.service.drain(timeout=10))
        await wait_until(lambda: running.service.status == "draining")
        refused = await request_frames(bus, "w-d", chat_request("late", request_id="late"))
        assert len(refused) == 1 and isinstance(refused[0], Error)
        assert refused[0].code == "draining" and refused[0].retryable
        for stream in in_flight:
            check_stream(await stream.rest(), words(15))
            await stream.close()
        await asyncio.wait_for(drain, 10)
        running.stopped = True
        found = await wait_until(lambda: [d for d in deregistrations.items if d.worker_id == "w-d"])
        assert found[0].reason
        assert any(h.worker_id == "w-d" and h.status == "draining" for h in heartbeats.items)
        assert not running.service.in_flight
    finally:
        await running.stop()
        await running.bus.close()


async def test_request_without_reply_subject_is_dropped_and_counted(worker: RunningWorker, bus: Bus) -> None:
    subject = bus.subjects.inference("w1")
    await bus.nc.publish(subject, encode(chat_request("nobody listens")))
    await wait_until(lambda: worker.bus.invalid_messages[subject] == 1)
    assert worker.service.requests_total == 0
    check_stream(await request_frames(bus, "w1", chat_request("ok")), "ok")


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xfe not json", b"{}", b'{"request_id": 5, "model": "echo"}', b'{"request_id":"x","model":"\xff"}'],
)
async def test_garbage_on_the_inference_subject_is_counted(worker: RunningWorker, bus: Bus, garbage: bytes) -> None:
    subject = bus.subjects.inference("w1")
    inbox = bus.nc.new_inbox()
    await bus.nc.publish(subject, garbage, reply=inbox)
    await wait_until(lambda: worker.bus.invalid_messages_total == 1)
    assert worker.service.requests_total == 0
    check_stream(await request_frames(bus, "w1", chat_request("still serving")), "still serving")


async def test_garbage_cancel_and_announce_are_counted(worker: RunningWorker, bus: Bus) -> None:
    await bus.nc.publish(bus.subjects.cancel("w1"), b"nope")
    await bus.nc.publish(bus.subjects.announce, b"[1, 2]")
    await wait_until(lambda: worker.bus.invalid_messages_total == 2)
    check_stream(await request_frames(bus, "w1", chat_request("fine")), "fine")


@pytest.mark.parametrize("how", ["unsubscribed", "answered-gone"])
async def test_generation_stops_when_nobody_waits_for_the_stream(cluster_config: Config, bus: Bus, how: str) -> None:
    """The worker probes the reply subject; no responders (controller gone) or a "gone" answer cancels."""
    running = await start_worker(cluster_config, "w-p", token_delay_ms=20, probe_interval_s=0.2)
    try:
        inbox = bus.nc.new_inbox()
        probes = 0

        async def on_frame(msg: Msg) -> None:
            nonlocal probes
            if msg.headers and msg.headers.get(PROBE_HEADER):
                probes += 1
                await bus.nc.publish(msg.reply, b"", headers={GONE_HEADER: "1"})

        sub = await bus.nc.subscribe(inbox, cb=on_frame)
        await bus.nc.publish(bus.subjects.inference("w-p"), encode(chat_request(words(500))), reply=inbox)
        await wait_until(lambda: running.service.tokens_total > 0)
        if how == "unsubscribed":
            await sub.unsubscribe()
        await wait_until(lambda: not running.service.in_flight, timeout=3, what="generation to stop")
        assert running.service.tokens_total < 500
        if how == "answered-gone":
            assert probes >= 1
            await sub.unsubscribe()
    finally:
        await running.stop()


async def test_a_listening_consumer_keeps_the_stream_alive(cluster_config: Config, bus: Bus) -> None:
    running = await start_worker(cluster_config, "w-p2", token_delay_ms=5, probe_interval_s=0.1)
    try:
        frames = await request_frames(bus, "w-p2", chat_request(words(80)))  # answers probes with b""
        check_stream(frames, words(80))
    finally:
        await running.stop()


# --- coalesced tokens ------------------------------------------------------------------------


async def test_coalesced_tokens_pass_through_and_are_counted(cluster_config: Config, bus: Bus) -> None:
    """Engines merge tokens that piled up into one frame with ``count``; the worker relays and counts them."""

    class Bursty(EchoEngine):
        async def generate(self, request: InferenceRequest) -> AsyncIterator[EngineFrame]:
            yield Token(text="a b c", count=3, seq=0)
            yield Token(text=" d", count=1, seq=1)
            yield Done(usage=Usage(prompt_tokens=1, completion_tokens=4, total_tokens=5))

    running = await start_worker(cluster_config, "w-burst", engine=Bursty())
    try:
        frames = await request_frames(bus, "w-burst", chat_request("x"))
        done = check_stream(frames, "a b c d")
        assert [f.count for f in frames if isinstance(f, Token)] == [3, 1]
        assert done.usage.completion_tokens == 4
        assert running.service.tokens_total == 4
        assert running.service.rate.per_second() > 0
    finally:
        await running.stop()


async def test_engine_error_is_reported_and_counted(cluster_config: Config, bus: Bus) -> None:
    class Broken(EchoEngine):
        async def generate(self, request: InferenceRequest) -> AsyncIterator[EngineFrame]:
            yield Token(text="half")
            raise RuntimeError("kaput")

    running = await start_worker(cluster_config, "w-broken", engine=Broken())
    try:
        frames = await request_frames(bus, "w-broken", chat_request("x"))
        assert isinstance(frames[-1], Error)
        assert frames[-1].code == "engine_error" and "kaput" in frames[-1].message
        assert not frames[-1].retryable  # a token was already sent
        assert running.service.errors_total == 1
        assert running.service.admission.active == 0
    finally:
        await running.stop()


# --- the worker role's lifetime ---------------------------------------------------------------


async def test_serve_worker_registers_serves_and_deregisters_on_stop(cluster_config: Config, bus: Bus) -> None:
    registrations = await collect(bus, bus.subjects.register, WorkerRegistration)
    deregistrations = await collect(bus, bus.subjects.deregister, Deregister)
    config = with_sections(
        cluster_config, worker={"engine": "echo", "id": "w-node", "model": "m1", "echo_token_delay_ms": 10}
    )
    worker_bus = await Bus.connect(config.nats, name="test-serve-worker", attempts=5)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_worker(config, worker_bus, stop))
    try:
        found = await wait_until(lambda: [r for r in registrations.items if r.worker_id == "w-node"])
        registration: WorkerRegistration = found[0]
        assert registration.capabilities.models == ["m1"]
        assert registration.capabilities.engine == "echo"
        assert registration.hardware.cpu_cores >= 1 and registration.hardware.memory_gb > 0
        assert registration.hardware.chip
        check_stream(await request_frames(bus, "w-node", chat_request("a b c", model="m1")), "a b c")
        stream = await FrameStream.open(bus, "w-node", chat_request(words(20), model="m1"))
        assert isinstance(await stream.next(), Accepted)
        stop.set()  # as on SIGTERM: the request in flight still completes
        check_stream(await stream.rest(), words(20))
        await stream.close()
        await asyncio.wait_for(task, 10)
        await wait_until(lambda: [d for d in deregistrations.items if d.worker_id == "w-node"])
    finally:
        if not task.done():
            task.cancel()
        await worker_bus.close()


async def test_a_failed_engine_deregisters_the_worker_with_the_reason(cluster_config: Config, bus: Bus) -> None:
    """The engine's generation thread died: the worker leaves the cluster saying why and the node fails (its
    process exits non-zero, so a supervisor or service manager restarts it)."""

    class DyingEcho(EchoEngine):
        def set_failure_listener(self, listener):  # type: ignore[no-untyped-def]
            self.listener = listener

        async def generate(self, request: InferenceRequest) -> AsyncIterator[EngineFrame]:
            if request.prompt == "die":
                self.listener("the generation thread died: RuntimeError('boom')")
                yield Error(code="shutting_down", message="mlx engine stopped", retryable=True)
                return
            async for frame in super().generate(request):
                yield frame

    registrations = await collect(bus, bus.subjects.register, WorkerRegistration)
    deregistrations = await collect(bus, bus.subjects.deregister, Deregister)
    config = with_sections(cluster_config, worker={"engine": "echo", "id": "w-dies", "model": "m1"})
    worker_bus = await Bus.connect(config.nats, name="test-dying-worker", attempts=5)
    task = asyncio.create_task(serve_worker(config, worker_bus, asyncio.Event(), engine=DyingEcho(models=["m1"])))
    try:
        await wait_until(lambda: [r for r in registrations.items if r.worker_id == "w-dies"])
        check_stream(await request_frames(bus, "w-dies", chat_request("still fine", model="m1")), "still fine")
        request = InferenceRequest(request_id="die", model="m1", prompt="die")
        frames = await request_frames(bus, "w-dies", request)
        assert isinstance(frames[-1], Error) and frames[-1].retryable
        with pytest.raises(NodeFailed, match="boom"):
            await asyncio.wait_for(task, 10)
        gone = await wait_until(lambda: [d for d in deregistrations.items if d.worker_id == "w-dies"])
        assert "engine failed" in gone[0].reason and "boom" in gone[0].reason
    finally:
        if not task.done():
            task.cancel()
        await worker_bus.close()
