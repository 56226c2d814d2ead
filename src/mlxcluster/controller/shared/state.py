"""Opening the shared state at a controller's start, and closing it at its stop (an aiohttp ``cleanup_ctx``).

With ``controller.shared_state`` on, the controller needs JetStream: without it the start is refused with
one line (:class:`~mlxcluster.bus.jetstream.JetStreamUnavailable`, turned into the node's ``CANNOT_START``
exit). It then opens (creating when missing) the keys bucket, the usage stream and the usage totals bucket,
writes its config keys into the keys bucket, and starts following the bucket into the ring (in force before
the first request is served), publishing usage and folding it. A clean stop sends the usage still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from mlxcluster.bus import Bus
from mlxcluster.bus.jetstream import open_jetstream
from mlxcluster.controller.metering.keys import KeyRing
from mlxcluster.controller.shared.keystore import KeyStore
from mlxcluster.controller.shared.records import bucket_prefix
from mlxcluster.controller.shared.usage import UsageLedger

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0


@dataclass
class SharedState:
    """The keys bucket and the usage ledger of a controller whose state is shared."""

    keys: KeyStore
    usage: UsageLedger
    replicas: int
    names: dict[str, str] = field(default_factory=dict)
    """Bucket and stream names, for the status route and the logs."""

    @property
    def invalid_records(self) -> int:
        """Malformed entries dropped (keys and usage)."""
        return self.keys.invalid_records + self.usage.invalid_records

    def status(self) -> dict[str, object]:
        return {
            "replicas": self.replicas,
            **self.names,
            "invalid_records": self.invalid_records,
            "usage_unsent": self.usage.unsent,
        }


async def open_shared_state(bus: Bus, ring: KeyRing, controller_id: str) -> SharedState:
    """Check JetStream and open (create) the buckets and the stream; raises ``JetStreamUnavailable``."""
    jetstream = await open_jetstream(bus)
    prefix = bucket_prefix(bus.subjects.prefix)
    names = {"keys_bucket": f"{prefix}_keys", "usage_stream": f"{prefix}_USAGE", "usage_bucket": f"{prefix}_usage"}
    keys = await jetstream.bucket(names["keys_bucket"], history=8, description="mlxcluster API keys (digests only)")
    stream = await jetstream.stream(
        names["usage_stream"], [bus.subjects.usage_all], description="mlxcluster usage, one per request"
    )
    totals = await jetstream.bucket(names["usage_bucket"], description="mlxcluster usage per key and day")
    return SharedState(
        keys=KeyStore(keys, ring),
        usage=UsageLedger(stream, totals, bus.subjects, controller_id),
        replicas=jetstream.replicas,
        names=names,
    )


async def run_shared_state(app: web.Application) -> AsyncIterator[None]:
    """The controller's shared state from start to stop (nothing when ``controller.shared_state`` is off)."""
    from mlxcluster.controller.http.context import CONTROLLER  # the context module imports this one

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
    ]
    try:
        await asyncio.wait_for(shared.keys.ready.wait(), READY_TIMEOUT_S)
    except TimeoutError:
        log.warning("the keys bucket was not read within %.0fs; keys will follow as they arrive", READY_TIMEOUT_S)
    ctx.shared = shared
    ctx.ops.usage = shared.usage.record
    log.info("shared state in JetStream (R%d): %s", shared.replicas, ", ".join(shared.names.values()))
    try:
        yield
    finally:
        ctx.ops.usage = None
        await shared.usage.flush()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
