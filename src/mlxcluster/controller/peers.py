"""Controllers that share one NATS know each other: a small heartbeat on ``cluster.controller``.

Several controllers can serve the same cluster: each builds its own registry from the workers' broadcasts
and admission stays at the workers, so nothing else needs agreeing on. The heartbeat only lets each one
show the others (``/api/cluster/status`` → ``controllers``, and ``tier``: their request counts summed) and
notice one gone; the processes of one controller tier (``controller.processes``) are such peers too. A
controller not heard from for ``discovery.offline_timeout_ms`` is listed ``offline``; after ten timeouts it
is forgotten. One that stops says so in its last heartbeat and is forgotten at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from nats.aio.msg import Msg

from mlxcluster import __version__
from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.metering.latency_tally import merge_latency
from mlxcluster.protocol import ControllerHeartbeat, LatencyCounts

log = logging.getLogger(__name__)

FORGET_AFTER_TIMEOUTS = 10


class ControllerPeers:
    """Every controller heard on the bus (this one included, from its own heartbeats)."""

    def __init__(self, own_id: str, offline_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.own_id = own_id
        self.offline_timeout_s = offline_timeout_s
        self._clock = clock
        self._peers: dict[str, tuple[ControllerHeartbeat, float]] = {}

    def on_heartbeat(self, heartbeat: ControllerHeartbeat) -> None:
        known = heartbeat.controller_id in self._peers
        if heartbeat.stopping:
            if self._peers.pop(heartbeat.controller_id, None) is not None:
                log.info("controller %s stopped", heartbeat.controller_id)
            return
        self._peers[heartbeat.controller_id] = (heartbeat, self._clock())
        if not known and heartbeat.controller_id != self.own_id:
            log.info("controller %s (%s) serves this cluster too", heartbeat.controller_id, heartbeat.address)

    def sweep(self) -> None:
        """Forget controllers silent for ten offline timeouts."""
        horizon = self._clock() - FORGET_AFTER_TIMEOUTS * self.offline_timeout_s
        for controller_id in [cid for cid, (_, seen) in self._peers.items() if seen < horizon]:
            del self._peers[controller_id]

    def online(self) -> list[str]:
        """Ids of the controllers heard from within the offline timeout."""
        now = self._clock()
        return sorted(cid for cid, (_, seen) in self._peers.items() if now - seen <= self.offline_timeout_s)

    def totals(self) -> dict[str, int]:
        """The tier's figures, summed over the online controllers' last heartbeats (this one's included): as
        fresh as a heartbeat interval."""
        now = self._clock()
        online = [hb for hb, seen in self._peers.values() if now - seen <= self.offline_timeout_s]
        return {
            "controllers_online": len(online),
            "in_flight": sum(hb.in_flight for hb in online),
            "requests_total": sum(hb.requests_total for hb in online),
            "completed": sum(hb.completed for hb in online),
            "failed": sum(hb.failed for hb in online),
            "errors": sum(hb.errors for hb in online),
            "retries": sum(hb.retries for hb in online),
            "prompt_tokens": sum(hb.prompt_tokens for hb in online),
            "completion_tokens": sum(hb.completion_tokens for hb in online),
        }

    def latency(self) -> dict[str, LatencyCounts]:
        """The online controllers' latency histograms summed (their last heartbeats', this one's included)."""
        now = self._clock()
        return merge_latency(hb.latency for hb, seen in self._peers.values() if now - seen <= self.offline_timeout_s)

    def listing(self) -> list[dict[str, Any]]:
        """Every known controller for the status route, this one first."""
        now = self._clock()
        rows = []
        for controller_id, (hb, seen) in self._peers.items():
            rows.append(
                {
                    "id": controller_id,
                    "self": controller_id == self.own_id,
                    "status": "online" if now - seen <= self.offline_timeout_s else "offline",
                    "seen_ago_s": round(now - seen, 2),
                    "address": hb.address,
                    "hostname": hb.hostname,
                    "version": hb.version,
                    "state": hb.state,
                    "started_at": hb.started_at,
                    "in_flight": hb.in_flight,
                    "requests_total": hb.requests_total,
                }
            )
        return sorted(rows, key=lambda row: (not row["self"], row["id"]))


PEERS = web.AppKey("controller_peers", ControllerPeers)
CONTROLLER_HEADER = "X-Mlxcluster-Controller"
"""Every response names the controller (process) that answered it: behind one port shared by several, the
only way to tell them apart."""


async def name_the_controller(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: set :data:`CONTROLLER_HEADER`."""
    response.headers[CONTROLLER_HEADER] = request.app[CONTROLLER].controller_id


def controller_heartbeat(ctx: ControllerContext, *, stopping: bool = False) -> ControllerHeartbeat:
    config, stats = ctx.config.controller, ctx.dispatcher.stats
    return ControllerHeartbeat(
        controller_id=ctx.controller_id,
        started_at=ctx.started_at,
        sent_at=time.time(),
        address=f"{config.bind}:{config.port}",
        hostname=socket.gethostname(),
        version=__version__,
        state=ctx.lifecycle.state,
        in_flight=stats.in_flight,
        requests_total=stats.requests,
        stopping=stopping,
        completed=stats.completed,
        failed=stats.failed,
        errors=stats.errors,
        retries=stats.retries,
        prompt_tokens=ctx.ops.latency.prompt_tokens,
        completion_tokens=ctx.ops.latency.completion_tokens,
        latency=ctx.ops.latency.counts(),
    )


async def run_controller_heartbeats(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: hear the other controllers and heartbeat to them; say goodbye on the way out."""
    ctx, peers = app[CONTROLLER], app[PEERS]
    bus = ctx.bus
    subject = bus.subjects.controller_heartbeat
    interval_s = ctx.config.discovery.heartbeat_interval_ms / 1000

    async def on_heartbeat(heartbeat: ControllerHeartbeat, _msg: Msg) -> None:
        peers.on_heartbeat(heartbeat)

    async def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # the bus may be down; the next beat tries again
                await bus.publish(subject, controller_heartbeat(ctx))
            peers.sweep()
            await asyncio.sleep(interval_s)

    subscription = await bus.subscribe(subject, ControllerHeartbeat, on_heartbeat)
    with contextlib.suppress(Exception):
        await bus.flush()
    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        with contextlib.suppress(Exception):
            await bus.publish(subject, controller_heartbeat(ctx, stopping=True))
