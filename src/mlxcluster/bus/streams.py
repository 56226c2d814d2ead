"""Request streams on the bus, both ends: the worker's numbered writer, the controller's inbox.

Frames are numbered here and nowhere else. The worker's :class:`ReplyWriter` gives each ``Token`` the next
``seq`` and a ``Done`` the ``seq`` a next Token would have had (not the ``cancelled`` one that ends a stream the
worker stopped); the controller's :class:`ReplyStream` checks
them (:meth:`ReplyStream.out_of_order`): NATS delivers at most once, so a gap means frames were lost.

The controller's inbox is one wildcard subscription demultiplexed into per-request streams: one ``SUB`` at
start-up instead of a SUB/UNSUB pair per request (the same trick as NATS's own request muxing). A stream is
opened *before* its request is sent, so no frame can be missed. A worker's liveness probe
(:meth:`ReplyWriter.consumer_gone`) for a request nobody waits for any more is answered ``gone``, so the
worker stops generating; if the controller itself is gone the probe gets "no responders" instead.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mlxcluster.bus.client import Bus
from mlxcluster.bus.errors import BusError
from mlxcluster.protocol import (
    GONE_HEADER,
    PROBE_HEADER,
    Accepted,
    Done,
    Error,
    Progress,
    ProtocolError,
    Token,
    decode_frames,
    encode,
    encode_frames,
)

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0

WorkerFrame = Accepted | Progress | Token | Done | Error
"""What a worker sends on a reply subject."""


class Signal(enum.Enum):
    """What :meth:`ReplyStream.receive` returns instead of a frame."""

    SILENT = "silent"
    """Nothing came before the time given."""
    INTERRUPTED = "interrupted"
    """The wait was interrupted (:meth:`StreamInbox.interrupt`: the registry saw the worker go offline)."""
    NO_RESPONDERS = "no_responders"
    """Nobody listened on the worker's subject (NATS's 503 status message): the worker is gone."""
    INVALID = "invalid"
    """A message that is not a frame (dropped and counted on the bus)."""


MAX_BATCH_BYTES = 64 * 1024
"""Frames held past this many bytes are sent at once (well under any NATS ``max_payload``)."""


class ReplyWriter:
    """The worker's end of one request's stream: numbers frames and publishes them on the reply subject.

    What a request produces within one turn of the worker's event loop travels as one message
    (:func:`~mlxcluster.protocol.encode_frames`): a frame that ends the stream (Done, Error) is sent at once
    with everything held before it; any other frame is held only until the loop turns (a ``call_soon``
    flush), so nothing waits on the engine's next token. A short answer (Accepted, Token, Done) is one
    NATS message instead of three, for the worker, the server and the controller alike.
    """

    __slots__ = ("bus", "reply", "next_seq", "_held", "_held_bytes", "_flush_due", "_flushes")

    def __init__(self, bus: Bus, reply: str) -> None:
        self.bus = bus
        self.reply = reply
        self.next_seq = 0
        """The ``seq`` of the next Token (the number of Token frames sent so far)."""
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._flush_due = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def send(self, frame: WorkerFrame) -> None:
        """Number ``frame`` (Token, Done) and publish it (now if it ends the stream, else when the loop turns)."""
        if isinstance(frame, Token):
            frame.seq = self.next_seq
            self.next_seq += 1
        elif isinstance(frame, Done):
            frame.seq = self.next_seq
        await self._write(encode(frame), ends=isinstance(frame, Done | Error))

    async def cancelled(self) -> None:
        """End the stream with ``Done(finish_reason="cancelled")``, unnumbered: the worker stopped it (a cancel,
        a drain that ran out), so the controller moves it on whatever reached it."""
        await self._write(encode(Done(finish_reason="cancelled")), ends=True)

    async def flush(self) -> None:
        """Publish the frames held, as one message."""
        if self._held:
            held, self._held, self._held_bytes = self._held, [], 0
            # nats-py queues the bytes before it can suspend, so flushes go out in the order they were taken
            await self.bus.publish_encoded(self.reply, encode_frames(held))

    async def _write(self, data: bytes, *, ends: bool) -> None:
        if self._held and self._held_bytes + len(data) > MAX_BATCH_BYTES:
            await self.flush()
        self._held.append(data)
        self._held_bytes += len(data)
        if ends or self._held_bytes >= MAX_BATCH_BYTES:
            await self.flush()
        elif not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_due = False
        if self._held:
            task = asyncio.create_task(self._flush_quietly())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # the bus is down: the controller sees the gap (seq) or the silence
            log.debug("could not send frames on %s: %s", self.reply, exc)

    async def consumer_gone(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        """Ask the reply subject whether anyone still waits for this stream (``False`` when unsure)."""
        try:
            answer = await self.bus.probe(self.reply, headers={PROBE_HEADER: "1"}, timeout=timeout)
        except BusError:
            return False  # unsure: keep going; the request's deadline still bounds it
        return answer is None or bool(answer.get(GONE_HEADER))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ReplyStream:
    """The controller's end of one request's stream: the frames of one worker, in arrival order."""

    __slots__ = ("key", "reply", "worker_id", "probed_at", "expected", "_items", "_waiter", "_bus")

    def __init__(self, bus: Bus, key: str, reply: str, worker_id: str) -> None:
        self.key = key
        self.reply = reply
        """The reply subject to send with the request."""
        self.worker_id = worker_id
        self.probed_at: float | None = None
        """When the worker last probed this stream (``time.monotonic()``): it still works on it."""
        self.expected = 0
        """The ``seq`` the next Token should have."""
        self._items: deque[WorkerFrame | Signal] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._bus = bus

    @property
    def pending(self) -> bool:
        """Something is queued: :meth:`receive` returns at once."""
        return bool(self._items)

    def deliver(self, msg: Msg) -> None:
        """Queue the frames of a message that came for this stream (a message that is not frames is dropped,
        counted on the bus, and queued as :attr:`Signal.INVALID`)."""
        if msg.headers and msg.headers.get("Status") == "503":
            self._push(Signal.NO_RESPONDERS)
            return
        try:
            self._items.extend(decode_frames(msg.data))
        except ProtocolError as exc:
            self._bus.invalid_messages[msg.subject] += 1
            log.warning("dropped invalid frame on %s: %s", msg.subject, exc)
            self._push(Signal.INVALID)
            return
        if self._waiter is not None:
            _wake(self._waiter)

    def interrupt(self) -> None:
        """Make the current (or next) wait return :attr:`Signal.INTERRUPTED` once the queued frames are read."""
        self._push(Signal.INTERRUPTED)

    def _push(self, item: WorkerFrame | Signal) -> None:
        self._items.append(item)
        if self._waiter is not None:
            _wake(self._waiter)

    def take(self) -> WorkerFrame | Signal | None:
        """The next queued frame (or :class:`Signal`) without waiting; ``None`` when nothing is queued."""
        return self._items.popleft() if self._items else None

    async def receive(self, until: float) -> WorkerFrame | Signal:
        """The next frame, waiting until ``until`` (``time.monotonic()``) at most."""
        items = self._items
        if not items:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return Signal.SILENT
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(remaining, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not items:
                return Signal.SILENT
        return items.popleft()

    def out_of_order(self, frame: WorkerFrame) -> int | None:
        """Check ``frame``'s number: the ``seq`` it came with when frames were lost before it, else ``None``
        (a Token in order moves the expected number on; a Done without ``seq`` is not checked)."""
        if isinstance(frame, Token):
            if frame.seq != self.expected:
                return frame.seq
            self.expected += 1
        elif isinstance(frame, Done) and frame.seq not in (self.expected, None):
            return frame.seq
        return None


class StreamInbox:
    """Routes stream frames for this controller's requests to their :class:`ReplyStream`."""

    def __init__(self, bus: Bus, controller_id: str) -> None:
        self.bus = bus
        self.controller_id = controller_id
        self._prefix = bus.subjects.response(controller_id, "")
        self._streams: dict[str, ReplyStream] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.bus.subscribe_raw(
            self.bus.subjects.responses(self.controller_id), self._on_message, unbounded=True
        )

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("inbox unsubscribe: %s", exc)
            self._sub = None

    def open(self, request_key: str, worker_id: str) -> ReplyStream:
        """Open the stream of ``request_key`` (sent to ``worker_id``); send its ``reply`` with the request."""
        stream = ReplyStream(self.bus, request_key, self._prefix + request_key, worker_id)
        self._streams[request_key] = stream
        return stream

    def discard(self, request_key: str) -> None:
        self._streams.pop(request_key, None)

    def interrupt(self, worker_id: str) -> None:
        """Wake every stream waiting on ``worker_id`` (it went offline)."""
        for stream in list(self._streams.values()):
            if stream.worker_id == worker_id:
                stream.interrupt()

    @property
    def open_count(self) -> int:
        return len(self._streams)

    async def _on_message(self, msg: Msg) -> None:
        key = msg.subject[len(self._prefix) :]
        stream = self._streams.get(key)
        if msg.headers and msg.headers.get(PROBE_HEADER):
            if stream is not None:
                stream.probed_at = time.monotonic()
            if msg.reply:
                headers = None if stream is not None else {GONE_HEADER: "1"}
                await self.bus.publish_encoded(msg.reply, b"", headers=headers)
            return
        if stream is not None:
            stream.deliver(msg)
