"""The controller's state follows its NATS connection: ``ready`` ⇄ ``degraded``.

While the connection is down nothing can be dispatched, so ``/ready`` answers 503 and ``/health`` says
``degraded``; the state comes back to ``ready`` once nats-py has reconnected.
"""

from __future__ import annotations

import asyncio
import logging

from mlxcluster.bus import Bus
from mlxcluster.controller.lifecycle import Lifecycle

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2


def follow_bus(lifecycle: Lifecycle, bus: Bus) -> None:
    """One check: move between ``ready`` and ``degraded`` as the connection says."""
    connected = bus.is_connected
    if lifecycle.state == "ready" and not connected:
        lifecycle.to("degraded", error="NATS unreachable")
        log.warning("NATS unreachable: controller degraded until it reconnects")
    elif lifecycle.state == "degraded" and connected:
        lifecycle.to("ready")
        log.info("NATS reachable again: controller ready")


async def watch_bus(lifecycle: Lifecycle, bus: Bus, interval_s: float = WATCH_INTERVAL_S) -> None:
    """Run :func:`follow_bus` every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            follow_bus(lifecycle, bus)
        except Exception:
            log.exception("NATS state check failed")
