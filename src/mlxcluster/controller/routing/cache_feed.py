"""Feeding the cache index: ``worker.cache`` events in, workers that go away out.

A ``cleanup_ctx`` of the controller app, placed before the announce so that the snapshots workers send
in answer to it are not missed. Events that decode but make no sense (no model, digests out of range,
too many) are dropped and counted in ``bus.invalid_messages`` like undecodable ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from nats.aio.msg import Msg

from mlxcluster.controller.http.context import CONTROLLER
from mlxcluster.controller.routing.registry import WorkerEvent
from mlxcluster.protocol import CacheEvent

log = logging.getLogger(__name__)


async def follow_cache_events(app: web.Application) -> AsyncIterator[None]:
    """Subscribe the index to cache events and the registry's departures; undo on cleanup."""
    ctx = app[CONTROLLER]
    index, bus, registry = ctx.cache_index, ctx.bus, ctx.registry
    if index is None:
        yield
        return

    async def on_event(event: CacheEvent, msg: Msg) -> None:
        if not index.apply(event):
            bus.invalid_messages[msg.subject] += 1
            log.warning("dropped an invalid cache event from %s", event.worker_id)

    def on_worker(event: WorkerEvent) -> None:
        if event.current in (None, "offline"):  # gone, silent or deregistered: its cache is unknown now
            index.drop_worker(event.worker_id)

    registry.add_listener(on_worker)
    subscription = await bus.subscribe(bus.subjects.cache, CacheEvent, on_event)
    try:
        yield
    finally:
        registry.remove_listener(on_worker)
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
