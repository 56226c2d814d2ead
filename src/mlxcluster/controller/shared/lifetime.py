"""The shared state's lifetime in the controller app (a ``cleanup_ctx``): opened at start, closed at stop.

With ``controller.shared_state`` on, the controller needs JetStream: without it the start is refused with
one line (:class:`~mlxcluster.bus.jetstream.JetStreamUnavailable`, turned into the node's ``CANNOT_START``
exit). It then opens (creating when missing) the buckets and the stream, writes its config keys into the keys
bucket, and starts following the bucket into the ring (in force before the first request is served),
publishing usage and folding it; rate limits go to the cluster-wide leases (``limits.py``). A clean stop sends
the usage still queued and gives back the limit leases this controller did not use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from mlxcluster.controller.http.context import CONTROLLER
from mlxcluster.controller.shared.state import open_shared_state

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0


async def run_shared_state(app: web.Application) -> AsyncIterator[None]:
    """The controller's shared state from start to stop (nothing when ``controller.shared_state`` is off)."""
    ctx = app[CONTROLLER]
    if not ctx.config.controller.shared_state:
        yield
        return
    shared = await open_shared_state(ctx.bus, ctx.ops.keys, ctx.controller_id)
    ring = ctx.ops.keys
    await shared.keys.seed([key for key in ring.keys() if key.name in ring.config_names()])
    tasks = [
        asyncio.create_task(shared.keys.follow(), name="keys-watch"),
        asyncio.create_task(shared.usage.run_sender(), name="usage-sender"),
        asyncio.create_task(shared.usage.run_folder(), name="usage-folder"),
        asyncio.create_task(shared.limits.run(), name="limits-renewal"),
    ]
    try:
        await asyncio.wait_for(shared.keys.ready.wait(), READY_TIMEOUT_S)
    except TimeoutError:
        log.warning("the keys bucket was not read within %.0fs; keys will follow as they arrive", READY_TIMEOUT_S)
    ctx.shared = shared
    ctx.ops.usage = shared.usage.record
    ctx.ops.limiter.cluster = shared.limits
    log.info("shared state in JetStream (R%d): %s", shared.replicas, ", ".join(shared.names.values()))
    try:
        yield
    finally:
        ctx.ops.usage = None
        ctx.ops.limiter.cluster = None
        await shared.usage.flush()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(shared.limits.close(), CLOSE_TIMEOUT_S)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
