"""The bus against the real nats-server: typed pub/sub, request/reply, queue groups, bad input, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

import nats.errors
import pytest
from loopback import free_port, make_config
from nats.aio.msg import Msg

from mlxcluster.bus import (
    Bus,
    BusConnectionError,
    BusError,
    BusEvent,
    BusNoRespondersError,
    BusTimeoutError,
    ReplyWriter,
    Signal,
    StreamInbox,
    connect_options,
)
from mlxcluster.bus.streams import MAX_BATCH_BYTES
from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import (
    Accepted,
    Cancel,
    Done,
    Error,
    Frame,
    InferenceRequest,
    Token,
    WorkerHeartbeat,
    WorkerRegistration,
    decode_frames,
    encode,
)

WAIT_S = 5.0


@contextlib.asynccontextmanager
async def started_inbox(bus: Bus, controller_id: str) -> AsyncIterator[StreamInbox]:
    """A controller's stream inbox, subscribed, closed on the way out."""
    inbox = StreamInbox(bus, controller_id)
    await inbox.start()
    try:
        yield inbox
    finally:
        await inbox.close()


async def wait_until(predicate, timeout: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


async def test_publish_subscribe_typed_round_trip(bus: Bus) -> None:
    received: asyncio.Queue[tuple[WorkerHeartbeat, str]] = asyncio.Queue()

    async def on_heartbeat(message: WorkerHeartbeat, msg: Msg) -> None:
        await received.put((message, msg.subject))

    await bus.subscribe(bus.subjects.heartbeat, WorkerHeartbeat, on_heartbeat)
    await bus.nc.flush()
    sent = WorkerHeartbeat(worker_id="w1", status="draining", active=2, models_loaded=["m"])
    await bus.publish(bus.subjects.heartbeat, sent)
    message, subject = await asyncio.wait_for(received.get(), WAIT_S)
    assert message == sent
    assert isinstance(message, WorkerHeartbeat)
    assert subject == "mlxcluster.worker.heartbeat"


async def test_frames_decode_into_the_tagged_union(bus: Bus) -> None:
    frames: list[Frame] = []
    done = asyncio.Event()

    async def on_frame(frame: Frame, _msg: Msg) -> None:
        frames.append(frame)
        if isinstance(frame, Done | Error):
            done.set()

    subject = bus.subjects.response("c1", "req-1.1")
    await bus.subscribe(subject, Frame, on_frame)
    await bus.nc.flush()
    sent: list[Frame] = [Token(text="a", seq=0), Token(text="b", seq=1), Done(finish_reason="length")]
    for frame in sent:
        await bus.publish(subject, frame)
    await asyncio.wait_for(done.wait(), WAIT_S)
    assert frames == sent


async def test_subject_prefix_is_taken_from_config() -> None:
    config = make_config(nats={"subject_prefix": "prod.eu"})
    async with EmbeddedNatsServer(config.nats):
        bus = await Bus.connect(config.nats, name="prefix", attempts=3)
        try:
            assert bus.subjects.register == "prod.eu.worker.register"
        finally:
            await bus.close()


async def test_request_reply(bus: Bus) -> None:
    async def answer(request: InferenceRequest, msg: Msg) -> None:
        await msg.respond(encode(WorkerRegistration(worker_id=f"for-{request.request_id}")))

    subject = bus.subjects.inference("w1")
    await bus.subscribe(subject, InferenceRequest, answer)
    await bus.nc.flush()
    reply = await bus.request(subject, InferenceRequest(request_id="r1", model="m"), WorkerRegistration, timeout=WAIT_S)
    assert reply == WorkerRegistration(worker_id="for-r1")


async def test_request_timeout_raises_bus_error(bus: Bus) -> None:
    async def never_answer(_request: Cancel, _msg: Msg) -> None:
        return None

    subject = bus.subjects.cancel("w1")
    await bus.subscribe(subject, Cancel, never_answer)
    await bus.nc.flush()
    started = time.monotonic()
    with pytest.raises(BusTimeoutError, match="within") as caught:
        await bus.request(subject, Cancel(request_id="r"), Cancel, timeout=0.2)
    assert time.monotonic() - started < WAIT_S
    assert isinstance(caught.value, BusError)  # `except BusError` still catches it
    with pytest.raises(BusTimeoutError, match="within"):  # a probe nobody answers in time: the same type
        await bus.probe(subject, headers={"x": "1"}, timeout=0.2)


async def test_request_without_responders_raises_bus_error(bus: Bus) -> None:
    with pytest.raises(BusNoRespondersError, match="no responders") as caught:
        await bus.request(bus.subjects.inference("nobody"), Cancel(request_id="r"), Cancel, timeout=WAIT_S)
    assert isinstance(caught.value, BusError) and not isinstance(caught.value, BusTimeoutError)


async def test_request_with_invalid_reply_raises_bus_error(bus: Bus) -> None:
    async def answer_garbage(_request: Cancel, msg: Msg) -> None:
        await msg.respond(b"not json")

    subject = bus.subjects.cancel("w2")
    await bus.subscribe(subject, Cancel, answer_garbage)
    await bus.nc.flush()
    with pytest.raises(BusError, match="invalid Cancel") as caught:
        await bus.request(subject, Cancel(request_id="r"), Cancel, timeout=WAIT_S)
    assert bus.invalid_messages[subject] == 1
    assert type(caught.value) is BusError  # neither a timeout, nor no responders, nor the connection


async def test_queue_group_spreads_work(cluster_config: Config, bus: Bus) -> None:
    other = await Bus.connect(cluster_config.nats, name="second", attempts=3)
    try:
        counts: Counter[str] = Counter()

        def handler_for(name: str):  # type: ignore[no-untyped-def]
            async def handle(_message: Cancel, _msg: Msg) -> None:
                counts[name] += 1

            return handle

        subject = bus.subjects.inference("shared")
        await bus.subscribe(subject, Cancel, handler_for("a"), queue="workers")
        await other.subscribe(subject, Cancel, handler_for("b"), queue="workers")
        await bus.nc.flush()
        await other.nc.flush()
        for index in range(200):
            await bus.publish(subject, Cancel(request_id=str(index)))
        await bus.nc.flush()
        await wait_until(lambda: counts.total() >= 200)
        await asyncio.sleep(0.1)  # nothing is delivered twice
        assert counts.total() == 200
        assert counts["a"] > 0 and counts["b"] > 0
    finally:
        await other.close()


async def test_invalid_message_is_dropped_and_counted(bus: Bus) -> None:
    received: list[WorkerHeartbeat] = []

    async def on_heartbeat(message: WorkerHeartbeat, _msg: Msg) -> None:
        received.append(message)

    subject = bus.subjects.heartbeat
    await bus.subscribe(subject, WorkerHeartbeat, on_heartbeat)
    await bus.nc.flush()
    assert bus.invalid_messages_total == 0
    for garbage in (b"not json", b'{"worker_id": 5}', b"\xff\xfe", b'{"worker_id": "\xf0"}'):
        await bus.nc.publish(subject, garbage)
    await bus.publish(subject, WorkerHeartbeat(worker_id="after"))
    await wait_until(lambda: len(received) == 1)
    assert received == [WorkerHeartbeat(worker_id="after")]
    assert bus.invalid_messages_total == 4
    assert bus.invalid_messages[subject] == 4


async def test_handler_exception_does_not_kill_the_subscription(bus: Bus) -> None:
    received: list[str] = []

    async def flaky(message: Cancel, _msg: Msg) -> None:
        if message.request_id == "boom":
            raise RuntimeError("handler bug")
        received.append(message.request_id)

    subject = bus.subjects.cancel("w1")
    await bus.subscribe(subject, Cancel, flaky)
    await bus.nc.flush()
    for request_id in ("one", "boom", "two"):
        await bus.publish(subject, Cancel(request_id=request_id))
    await wait_until(lambda: len(received) == 2)
    assert received == ["one", "two"]
    assert bus.invalid_messages_total == 0


async def test_max_payload_is_the_configured_one(cluster_config: Config, bus: Bus) -> None:
    assert bus.max_payload == cluster_config.nats.max_payload == 8 * 1024 * 1024


async def test_max_payload_custom() -> None:
    config = make_config(nats={"max_payload": 64 * 1024})
    async with EmbeddedNatsServer(config.nats):
        bus = await Bus.connect(config.nats, name="payload", attempts=3)
        try:
            assert bus.max_payload == 64 * 1024
            with pytest.raises(nats.errors.MaxPayloadError):
                await bus.publish(bus.subjects.heartbeat, WorkerHeartbeat(worker_id="x" * (64 * 1024)))
        finally:
            await bus.close()


async def test_reconnect_after_server_killed_and_restarted() -> None:
    config = make_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    replacement: EmbeddedNatsServer | None = None
    bus: Bus | None = None
    try:
        bus = await Bus.connect(config.nats, name="survivor", attempts=3)
        events: list[BusEvent] = []
        bus.events.add_listener(events.append)
        assert bus.events.state == "connected" and bus.counters()["connected"] == 1
        received: asyncio.Queue[WorkerHeartbeat] = asyncio.Queue()

        async def on_heartbeat(message: WorkerHeartbeat, _msg: Msg) -> None:
            await received.put(message)

        await bus.subscribe(bus.subjects.heartbeat, WorkerHeartbeat, on_heartbeat)
        await bus.nc.flush()

        assert server.process is not None
        server.process.kill()  # SIGKILL: no goodbye to clients
        await server.process.wait()
        await server.stop()
        await wait_until(lambda: not bus.is_connected)
        await wait_until(lambda: any(e.state == "reconnecting" for e in events))  # tries while the server is gone
        assert events[0].state == "disconnected" and bus.counters()["connected"] == 0

        replacement = EmbeddedNatsServer(config.nats)
        await replacement.start()
        await wait_until(lambda: bus.is_connected, timeout=10)
        await wait_until(lambda: events[-1].state == "connected")  # pushed to listeners: nothing polls
        states = [e.state for e in events]
        assert states[0] == "disconnected" and set(states[1:-1]) == {"reconnecting"}, states
        attempts = [e.attempt for e in events if e.state == "reconnecting"]
        assert attempts == list(range(1, len(attempts) + 1))  # counted since the drop
        assert events[-1].reconnects == 1 and events[-1].server == f"127.0.0.1:{config.nats.embedded.port}"
        counters = bus.counters()
        assert (counters["connected"], counters["reconnects"], counters["disconnects"]) == (1, 1, 1)

        publisher = await Bus.connect(config.nats, name="publisher", attempts=3)
        try:
            await publisher.publish(publisher.subjects.heartbeat, WorkerHeartbeat(worker_id="after-restart"))
            await publisher.nc.flush()
            message = await asyncio.wait_for(received.get(), WAIT_S)
        finally:
            await publisher.close()
        assert message == WorkerHeartbeat(worker_id="after-restart")
        await bus.publish(bus.subjects.deregister, WorkerHeartbeat(worker_id="x"))
        counters = bus.counters()
        assert counters["in_msgs"] >= 1 and counters["in_bytes"] > 0
        assert counters["out_msgs"] == 1 and counters["out_bytes"] == len(encode(WorkerHeartbeat(worker_id="x")))
        await bus.close()
        assert events[-1].state == "closed" and bus.events.state == "closed"
        assert bus.counters()["disconnects"] == 1  # a deliberate close is no disconnection
    finally:
        if bus is not None:
            await bus.close(drain=False)
        await server.stop()
        if replacement is not None:
            await replacement.stop()


async def test_connect_to_dead_port_gives_up() -> None:
    config = make_config()  # nobody listens on its port
    started = time.monotonic()
    with pytest.raises(
        BusConnectionError, match=f"cannot connect to NATS at nats://127.0.0.1:{config.nats.embedded.port}"
    ):
        await asyncio.wait_for(Bus.connect(config.nats, name="nobody", attempts=2), 10)
    assert time.monotonic() - started < 5


async def test_close_is_idempotent(cluster_config: Config, nats_server: EmbeddedNatsServer) -> None:
    bus = await Bus.connect(cluster_config.nats, name="twice", attempts=3)
    await bus.close()
    await bus.close()
    assert not bus.is_connected
    with pytest.raises(BusConnectionError):  # a closed connection is a connection error, told apart by type
        await bus.request(bus.subjects.cancel("w"), Cancel(request_id="r"), Cancel, timeout=1)


def test_connect_options_from_config() -> None:
    port = free_port()
    config = make_config(
        nats={"url": f"nats://a:{port}, nats://b:{port}", "user": "u", "password": "p", "connect_timeout_ms": 500}
    )
    options = connect_options(config.nats, name="n")
    assert options["servers"] == [f"nats://a:{port}", f"nats://b:{port}"]
    assert options["user"] == "u" and options["password"] == "p"
    assert options["connect_timeout"] == 0.5
    assert options["max_reconnect_attempts"] == -1
    assert "token" not in options and "tls" not in options


# --- request streams: the worker's numbered writer, the controller's inbox -------------------


async def test_reply_writer_numbers_frames_and_the_inbox_checks_them(bus: Bus) -> None:
    async with started_inbox(bus, "c-numbers") as inbox:
        stream = inbox.open("req-1.1", "w1")
        await bus.flush()
        writer = ReplyWriter(bus, stream.reply)
        sent = [Accepted(worker_id="w1"), Token(text="a"), Token(text="b", count=2), Done(finish_reason="stop")]
        for frame in sent:
            await writer.send(frame)
        received = [await stream.receive(time.monotonic() + WAIT_S) for _ in sent]
        assert [type(f) for f in received] == [Accepted, Token, Token, Done]
        assert [f.seq for f in received if isinstance(f, Token | Done)] == [0, 1, 2]  # Done: the next Token's #
        assert [stream.out_of_order(f) for f in received if isinstance(f, Token | Done)] == [None, None, None]
        assert await stream.receive(time.monotonic() + 0.05) is Signal.SILENT

        lossy = inbox.open("req-2.1", "w1")
        await bus.flush()
        await bus.publish(lossy.reply, Token(text="a", seq=0))
        await bus.publish(lossy.reply, Token(text="c", seq=2))  # #1 never arrived
        first, second = [await lossy.receive(time.monotonic() + WAIT_S) for _ in range(2)]
        assert isinstance(first, Token) and isinstance(second, Token)
        assert lossy.out_of_order(first) is None and lossy.out_of_order(second) == 2
        assert inbox.open_count == 2


async def test_frames_of_one_loop_turn_travel_as_one_message_and_none_waits_for_the_next(bus: Bus) -> None:
    """What a request produces without the worker's loop turning (Accepted, Token, Done of a short answer) is
    one NATS message; a frame that does not end the stream goes out as soon as the loop turns."""
    payloads: list[bytes] = []

    async def keep(msg: Msg) -> None:
        payloads.append(msg.data)

    raw = await bus.nc.subscribe("batch.>", cb=keep)
    try:
        async with started_inbox(bus, "c-batch") as inbox:
            writer = ReplyWriter(bus, "batch.short")
            for frame in (Accepted(worker_id="w1"), Token(text="a"), Done()):
                await writer.send(frame)
            await bus.flush()
            await wait_until(lambda: len(payloads) == 1)
            assert [type(f) for f in decode_frames(payloads[0])] == [Accepted, Token, Done]

            slow = ReplyWriter(bus, "batch.slow")
            await slow.send(Token(text="first"))  # the engine then waits for its next token: the loop turns
            await asyncio.sleep(0.01)
            await bus.flush()
            await wait_until(lambda: len(payloads) == 2)
            assert decode_frames(payloads[1]) == [Token(text="first", seq=0)]

            big = ReplyWriter(bus, "batch.big")
            text = "x" * (MAX_BATCH_BYTES // 3)
            for _ in range(4):
                await big.send(Token(text=text))
            await big.send(Done())
            await bus.flush()
            await wait_until(lambda: len(payloads) >= 4)
            sizes = [len(p) for p in payloads[2:]]
            assert all(size <= MAX_BATCH_BYTES for size in sizes) and len(sizes) == 2, sizes
            frames = [f for p in payloads[2:] for f in decode_frames(p)]
            assert [(type(f), getattr(f, "seq", None)) for f in frames] == [(Token, i) for i in range(4)] + [(Done, 4)]

            stream = inbox.open("req-1.1", "w1")
            await bus.flush()
            both = ReplyWriter(bus, stream.reply)
            await both.send(Token(text="b"))
            await both.cancelled()  # a cancel ends the stream: what was held goes with it, in order
            got = [await stream.receive(time.monotonic() + WAIT_S) for _ in range(2)]
            assert got == [Token(text="b", seq=0), Done(finish_reason="cancelled")]
            assert not stream.pending and stream.take() is None
    finally:
        await raw.unsubscribe()


async def test_a_message_that_is_not_frames_is_dropped_and_counted(bus: Bus) -> None:
    async with started_inbox(bus, "c-garbage") as inbox:
        stream = inbox.open("req-1.1", "w1")
        await bus.flush()
        before = bus.invalid_messages_total
        await bus.publish_encoded(stream.reply, b"[" + encode(Token(text="a")) + b", 7]")
        await bus.publish(stream.reply, Token(text="a"))
        assert await stream.receive(time.monotonic() + WAIT_S) is Signal.INVALID
        assert await stream.receive(time.monotonic() + WAIT_S) == Token(text="a")
        assert bus.invalid_messages_total == before + 1


async def test_interrupt_wakes_only_the_streams_of_that_worker(bus: Bus) -> None:
    async with started_inbox(bus, "c-interrupt") as inbox:
        waiting, other = inbox.open("a.1", "w-gone"), inbox.open("b.1", "w-stays")
        woken = asyncio.create_task(waiting.receive(time.monotonic() + 60))
        inbox.interrupt("w-gone")
        assert await asyncio.wait_for(woken, WAIT_S) is Signal.INTERRUPTED
        assert not other.pending


async def test_probes_are_answered_by_the_inbox_while_a_stream_is_open(bus: Bus) -> None:
    async with started_inbox(bus, "c-probes") as inbox:
        stream = inbox.open("req-1.1", "w1")
        await bus.flush()
        writer = ReplyWriter(bus, stream.reply)
        assert stream.probed_at is None
        assert not await writer.consumer_gone()
        assert stream.probed_at is not None  # the worker still works on it: the stall clock restarts
        inbox.discard("req-1.1")
        assert await writer.consumer_gone()  # nobody waits for it any more: answered "gone"
    assert await ReplyWriter(bus, bus.subjects.response("c-probes", "req-1.1")).consumer_gone()  # no responders


async def test_slow_consumer_drops_are_counted(bus: Bus) -> None:
    release = asyncio.Event()

    async def stuck(_msg: Msg) -> None:
        await release.wait()

    await bus.nc.subscribe("slow.subject", cb=stuck, pending_msgs_limit=1)  # holds one message, one more waits
    await bus.flush()
    for _ in range(5):
        await bus.nc.publish("slow.subject", b"x")
    await bus.flush()
    await wait_until(lambda: bus.counters()["slow_consumer_drops"] >= 1)
    release.set()
    assert bus.counters()["slow_consumer_drops"] <= 5 and bus.events.state == "connected"
    assert bus.events.last_error is None  # a slow consumer is counted, not taken for a connection error
