"""The controller's response inbox: one wildcard subscription, demultiplexed into per-request queues.

One ``SUB`` at start-up instead of a SUB/UNSUB pair per request (the same trick as NATS's own request
muxing). A request's queue is opened *before* the request is sent, so no frame can be missed. A
worker's liveness probe for a request nobody waits for any more is answered ``gone``, so the worker
stops generating; if the controller itself is gone the probe gets "no responders" instead.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mlxcluster.bus import Bus
from mlxcluster.protocol import GONE_HEADER, PROBE_HEADER

log = logging.getLogger(__name__)


class ResponseInbox:
    """Routes stream frames for this controller's requests to their waiting queues."""

    def __init__(self, bus: Bus, controller_id: str) -> None:
        self.bus = bus
        self.controller_id = controller_id
        self._prefix = bus.subjects.response(controller_id, "")
        self._queues: dict[str, asyncio.Queue[Msg]] = {}
        self._probed: dict[str, float] = {}  # request key → when its worker last probed (monotonic)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(
            self.bus.subjects.responses(self.controller_id), cb=self._on_message, pending_bytes_limit=-1
        )

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("inbox unsubscribe: %s", exc)
            self._sub = None

    def open(self, request_key: str) -> tuple[str, asyncio.Queue[Msg]]:
        """Register a queue for ``request_key``; return the reply subject to send with the request."""
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._queues[request_key] = queue
        return self._prefix + request_key, queue

    def discard(self, request_key: str) -> None:
        self._queues.pop(request_key, None)
        self._probed.pop(request_key, None)

    def probed_at(self, request_key: str) -> float | None:
        """When the worker last probed ``request_key`` (``time.monotonic()``): it still works on it."""
        return self._probed.get(request_key)

    @property
    def open_count(self) -> int:
        return len(self._queues)

    async def _on_message(self, msg: Msg) -> None:
        key = msg.subject[len(self._prefix) :]
        queue = self._queues.get(key)
        if msg.headers and msg.headers.get(PROBE_HEADER):
            if queue is not None:
                self._probed[key] = time.monotonic()
            if msg.reply:
                headers = None if queue is not None else {GONE_HEADER: "1"}
                await self.bus.nc.publish(msg.reply, b"", headers=headers)
            return
        if queue is not None:
            queue.put_nowait(msg)
