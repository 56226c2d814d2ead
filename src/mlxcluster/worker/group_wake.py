"""An idle worker group's other ranks doze off the ring; rank 0 wakes them over NATS when work comes.

The ranks other than 0 wait for rank 0's next operations inside an ``mx.distributed`` collective, and the
ring backend waits by polling its sockets: an idle follower burned most of a core (92% of one, in the
kernel, measured on Linux), all day on a group no one uses, and on a machine shared by its members took
the cores rank 0 needs. So after half a second without work (its idle tick,
:data:`~mlxcluster.worker.group_engine.TICK_S`) rank 0 broadcasts a
:class:`~mlxcluster.worker.group_ops.DozeOp`: the followers leave the ring and block on a
:class:`WakeSignal` (no CPU) until a :class:`~mlxcluster.protocol.GroupWake` naming that doze arrives on
``group.<name>.wake``. Rank 0 publishes it (:class:`WakeSender`) before its next broadcast, and again every
:data:`RESEND_S` until that broadcast completes, so a lost message costs a resend, not a stalled group. A
dozing group's members still hear each other's hellos, so a member that dies while the group dozes breaks it
as before (:meth:`~mlxcluster.worker.rendezvous.Rendezvous.watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque

from mlxcluster.bus import Bus
from mlxcluster.protocol import GroupWake

log = logging.getLogger(__name__)

RESEND_S = 0.25
"""Rank 0 publishes the wake again this often until the followers are back on the ring."""
REMEMBERED = 8
"""Wakes a follower remembers (one may arrive before the follower starts waiting for it)."""


class WakeSignal:
    """A follower's side: the wakes heard (by doze id) and a wait for one (thread-safe)."""

    def __init__(self) -> None:
        self._heard: deque[str] = deque(maxlen=REMEMBERED)
        self._changed = threading.Condition()

    def heard(self, doze: str) -> None:
        """A wake for ``doze`` arrived (any thread)."""
        with self._changed:
            if doze not in self._heard:
                self._heard.append(doze)
            self._changed.notify_all()

    def wait(self, doze: str, timeout_s: float) -> bool:
        """Block until the wake for ``doze`` arrived (True) or ``timeout_s`` passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: doze in self._heard, timeout_s)

    async def listen(self, bus: Bus, group: str) -> None:
        """Hear the group's wakes until cancelled."""

        async def on_wake(wake: GroupWake, _msg: object) -> None:
            if wake.group == group:
                self.heard(wake.doze)

        subscription = await bus.subscribe(bus.subjects.group_wake(group), GroupWake, on_wake)
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()


class WakeSender:
    """Rank 0's side: publishes the wake of a doze from the generation thread, until told the ranks are back."""

    def __init__(self, bus: Bus, group: str, loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.group = group
        self._loop = loop
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.sent = 0
        """Wakes published (resends included)."""

    def start(self, doze: str) -> None:
        """Wake the followers from ``doze`` (any thread): publish now and every :data:`RESEND_S` until :meth:`stop`."""
        self._loop.call_soon_threadsafe(self._start, doze)

    def stop(self, doze: str) -> None:
        """The followers are back on the ring (any thread)."""
        self._loop.call_soon_threadsafe(self._stop, doze)

    def _start(self, doze: str) -> None:
        if doze not in self._tasks:
            self._tasks[doze] = asyncio.ensure_future(self._publish(doze))

    def _stop(self, doze: str) -> None:
        task = self._tasks.pop(doze, None)
        if task is not None:
            task.cancel()

    async def _publish(self, doze: str) -> None:
        subject = self.bus.subjects.group_wake(self.group)
        while True:
            try:
                await self.bus.publish(subject, GroupWake(group=self.group, doze=doze))
                self.sent += 1
            except Exception:  # the bus is down: the watchdog ends a broadcast no one joins
                log.debug("publishing a group wake failed", exc_info=True)
            await asyncio.sleep(RESEND_S)
