"""Worker settings shared by every controller of the cluster, over NATS.

An operator drains (or re-prioritises, re-tags, forgets) a worker through one controller; that controller
applies it and publishes a :class:`WorkerSettingsChanged` with the worker's whole settings on
``cluster.worker_settings``. Every other controller applies it too, so the worker gets no new work from any
of them. When a controller starts it announces itself, and each running controller answers by publishing
all the settings it holds: a new or restarted controller learns them within a round trip. Last writer wins.

With shared state (``controller.shared_state``), the settings live in the JetStream bucket ``P_settings``
instead, one entry per worker (the same message, at ``worker.<token(id)>``): the controller that takes a
change writes it, every controller follows the bucket through a KV watch, and a controller that starts,
even after every other stopped, reads them all from it. A malformed entry is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from nats.aio.msg import Msg

from mlxcluster.bus.jetstream import Entry
from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.routing.worker_admin import WorkerSettings
from mlxcluster.controller.shared.records import token
from mlxcluster.controller.shared.state import SharedState
from mlxcluster.protocol import Announce, ProtocolError, WorkerSettingsChanged, decode, encode

SETTINGS_PREFIX = "worker."

log = logging.getLogger(__name__)


def settings_message(ctx: ControllerContext, worker_id: str, *, forget: bool = False) -> WorkerSettingsChanged:
    """The message that tells the other controllers ``worker_id``'s settings now."""
    settings = ctx.registry.settings_of(worker_id) or WorkerSettings(drained=False)
    return WorkerSettingsChanged(
        controller_id=ctx.controller_id,
        worker_id=worker_id,
        drained=bool(settings.drained),
        priority=settings.priority,
        tags=list(settings.tags) if settings.tags is not None else None,
        forget=forget,
    )


async def publish_settings(ctx: ControllerContext, worker_id: str, *, forget: bool = False) -> None:
    """Tell the other controllers: the shared bucket, or a bus message without shared state (a failure only
    logs: the settings hold here, peers learn them later)."""
    message = settings_message(ctx, worker_id, forget=forget)
    try:
        if ctx.shared is not None:
            await ctx.shared.settings.put(SETTINGS_PREFIX + token(worker_id), encode(message))
        else:
            await ctx.bus.publish(ctx.bus.subjects.worker_settings, message)
    except Exception as exc:
        log.warning("could not share the settings of worker %s with other controllers: %s", worker_id, exc)


def apply_settings(ctx: ControllerContext, message: WorkerSettingsChanged) -> None:
    """Apply another controller's settings for one worker."""
    registry = ctx.registry
    if message.forget:
        try:
            if not registry.forget(message.worker_id):
                registry.drop_settings(message.worker_id)
        except ValueError:  # offline there, not here: keep the worker, drop the settings
            registry.configure(message.worker_id, WorkerSettings(drained=False))
            registry.drop_settings(message.worker_id)
        return
    change = WorkerSettings(
        drained=message.drained,
        priority=message.priority,
        tags=tuple(message.tags) if message.tags is not None else None,
    )
    registry.configure(message.worker_id, change, remember=True)


async def share_worker_settings(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: apply peers' settings and answer their announces; placed before ``join_cluster`` so the
    answers to this controller's own announce are not missed."""
    ctx = app[CONTROLLER]
    bus = ctx.bus
    if ctx.shared is not None:
        async with follow_settings_bucket(ctx, ctx.shared):
            yield
        return

    async def on_settings(message: WorkerSettingsChanged, _msg: Msg) -> None:
        if message.controller_id != ctx.controller_id:
            apply_settings(ctx, message)

    async def on_announce(message: Announce, _msg: Msg) -> None:
        if message.controller_id == ctx.controller_id:
            return
        for worker_id in ctx.registry.all_settings():
            await publish_settings(ctx, worker_id)

    subscriptions = [
        await bus.subscribe(bus.subjects.worker_settings, WorkerSettingsChanged, on_settings),
        await bus.subscribe(bus.subjects.announce, Announce, on_announce),
    ]
    try:
        yield
    finally:
        for sub in subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


@contextlib.asynccontextmanager
async def follow_settings_bucket(ctx: ControllerContext, shared: SharedState) -> AsyncIterator[None]:
    """Apply every entry of the settings bucket, then every change, until the block ends."""

    def on_entry(entry: Entry) -> None:
        if entry.value is None or not entry.key.startswith(SETTINGS_PREFIX):
            return
        try:
            message: WorkerSettingsChanged = decode(entry.value, WorkerSettingsChanged)
        except ProtocolError as exc:
            shared.settings_invalid += 1
            log.warning("dropped a malformed worker-settings entry %s: %s", entry.key, exc)
            return
        apply_settings(ctx, message)

    ready = asyncio.Event()
    watch = asyncio.create_task(shared.settings.watch(on_entry, ready), name="settings-watch")
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), 5.0)
        yield
    finally:
        watch.cancel()
        with contextlib.suppress(BaseException):
            await watch
