"""The controller's state follows its NATS connection: ``ready`` ⇄ ``degraded``.

While the connection is down nothing can be dispatched, so ``/ready`` answers 503 and ``/health`` says
``degraded``; the state comes back to ``ready`` once nats-py has reconnected. The bus tells its listeners of
every change (:class:`~mlxcluster.bus.telemetry.ConnectionEvents`); nothing polls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mlxcluster.bus import Bus, BusEvent
from mlxcluster.controller.lifecycle import Lifecycle

log = logging.getLogger(__name__)


def follow_bus(lifecycle: Lifecycle, connected: bool) -> None:
    """Move between ``ready`` and ``degraded`` as the connection says (other states are left alone)."""
    if lifecycle.state == "ready" and not connected:
        lifecycle.to("degraded", error="NATS unreachable")
        log.warning("NATS unreachable: controller degraded until it reconnects")
    elif lifecycle.state == "degraded" and connected:
        lifecycle.to("ready")
        log.info("NATS reachable again: controller ready")


def watch_bus(lifecycle: Lifecycle, bus: Bus) -> Callable[[], None]:
    """Follow the bus's connection events from now on (and its state now); return the function that stops it."""

    def on_event(event: BusEvent) -> None:
        follow_bus(lifecycle, event.state == "connected")

    bus.events.add_listener(on_event)
    follow_bus(lifecycle, bus.is_connected)
    return lambda: bus.events.remove_listener(on_event)
