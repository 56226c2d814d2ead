"""The event feed from the controller to its metrics exporters.

``[metrics] exporters`` names the exporters; :func:`build_metrics_feed` builds each one with
``factory(**settings)`` from the plugins' registrations. The dispatcher and the registry call
:meth:`MetricsFeed.emit` — a non-blocking ``put_nowait`` on each exporter's bounded queue, so a request
never waits for an exporter. One background task per exporter drains its queue and calls
``exporter.export(event)`` once per event: ``async`` exporters on the event loop, plain ones on their own
thread (in batches, one thread hop per batch). When a queue is full the event is dropped for that exporter
and counted. Another task sends a :class:`ClusterSnapshot` every ``snapshot_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pluggy
from aiohttp import web

from mlxcluster.api import ClusterSnapshot, MetricsEvent, WorkerStatusChanged
from mlxcluster.bus import BusEvent
from mlxcluster.config import MetricsSection
from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.peers import PEERS, ControllerPeers
from mlxcluster.controller.routing.cache_index import prompt_cache_rates
from mlxcluster.controller.routing.registry import WorkerEvent, accelerator_fields, speculation_fields
from mlxcluster.plugins import ExporterEntry, collect_exporters

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 10_000
BATCH_SIZE = 256
CLOSE_TIMEOUT_S = 2.0


class ExporterError(LookupError):
    """``[metrics]`` names an exporter that is not registered, or one that cannot be built."""


class ExporterRunner:
    """One exporter, its bounded queue and the task that feeds it."""

    def __init__(self, name: str, exporter: Any, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.name = name
        self.exporter = exporter
        self.queue: asyncio.Queue[MetricsEvent] = asyncio.Queue(maxsize=queue_size)
        self.is_async = inspect.iscoroutinefunction(exporter.export)
        self.dropped = 0
        self.failed = 0
        self.exported = 0
        self._busy = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None

    def offer(self, event: MetricsEvent) -> bool:
        """Queue ``event`` unless the queue is full (then drop and count it)."""
        try:
            self.queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("exporter %s is too slow: %d event(s) dropped so far", self.name, self.dropped)
            return False

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being exported."""
        return self.queue.empty() and not self._busy

    async def start(self) -> None:
        if not self.is_async:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"exporter-{self.name}")
        await self._call_optional("start")
        self._task = asyncio.create_task(self._run(), name=f"exporter-{self.name}")

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Let the queue drain (up to ``timeout``), stop the task, call ``close()``, free the thread."""
        deadline = time.monotonic() + timeout
        while not self.idle and time.monotonic() < deadline and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        self._closing = True  # a plain exporter's thread stops after the event it is on
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._call_optional("close", timeout=max(0.1, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            self._busy = True
            try:
                while len(batch) < BATCH_SIZE and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                if self.is_async:
                    for event in batch:
                        try:
                            await self.exporter.export(event)
                        except Exception:
                            self._failed()
                    self.exported += len(batch)
                else:
                    await loop.run_in_executor(self._thread, self._export_batch, batch)
            finally:
                self._busy = False

    def _export_batch(self, batch: list[MetricsEvent]) -> None:
        """On the exporter's thread: one ``export`` call per event, each isolated."""
        for event in batch:
            if self._closing:
                return
            try:
                self.exporter.export(event)
            except Exception:
                self._failed()
        self.exported += len(batch)

    def _failed(self) -> None:
        self.failed += 1
        if self.failed == 1 or self.failed % 1000 == 0:
            log.exception("exporter %s failed (%d times)", self.name, self.failed)

    async def _call_optional(self, method: str, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Call ``exporter.start()``/``close()`` if it has one: plain ones on its thread, within ``timeout``."""
        function = getattr(self.exporter, method, None)
        if not callable(function):
            return
        try:
            async with asyncio.timeout(timeout):
                if inspect.iscoroutinefunction(function):
                    await function()
                else:
                    await asyncio.get_running_loop().run_in_executor(self._thread, function)
        except Exception as exc:
            log.warning("exporter %s: %s() failed: %s: %s", self.name, method, type(exc).__name__, exc)


class MetricsFeed:
    """Fans events out to the enabled exporters without ever blocking the caller."""

    def __init__(self, runners: Iterable[ExporterRunner] = (), snapshot_interval_s: float = 5.0) -> None:
        self.runners = list(runners)
        self.snapshot_interval_s = snapshot_interval_s
        self._snapshot_task: asyncio.Task[None] | None = None

    @property
    def exporters(self) -> dict[str, Any]:
        """Enabled exporter objects by name."""
        return {runner.name: runner.exporter for runner in self.runners}

    @property
    def dropped(self) -> int:
        """Events dropped so far, over all exporters."""
        return sum(runner.dropped for runner in self.runners)

    def emit(self, event: MetricsEvent) -> None:
        """Queue ``event`` for every exporter; never blocks, never raises."""
        for runner in self.runners:
            runner.offer(event)

    def on_worker_event(self, event: WorkerEvent) -> None:
        """A registry listener: worker status changes become :class:`WorkerStatusChanged` events."""
        self.emit(
            WorkerStatusChanged(
                time=time.time(), worker=event.worker_id, previous=event.previous, current=event.current
            )
        )

    def routes(self) -> list[Any]:
        """The HTTP routes the exporters contribute."""
        found: list[Any] = []
        for runner in self.runners:
            routes = getattr(runner.exporter, "routes", None)
            if callable(routes):
                found.extend(routes())
        return found

    async def start(self, snapshot: Callable[[], ClusterSnapshot] | None = None) -> None:
        """Start every exporter; with ``snapshot``, send one every ``snapshot_interval_s``."""
        for runner in self.runners:
            await runner.start()
        if snapshot is not None and self.runners:
            self._snapshot_task = asyncio.create_task(self._snapshots(snapshot), name="metrics-snapshots")

    async def drained(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event has been exported (``False`` after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not all(runner.idle for runner in self.runners):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self, snapshot: Callable[[], ClusterSnapshot] | None = None) -> None:
        """Stop snapshots, send a last one, drain the queues (bounded) and close the exporters."""
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshot_task
        if snapshot is not None and self.runners:
            self.snapshot_now(snapshot)
        await asyncio.gather(*(runner.close() for runner in self.runners))

    async def _snapshots(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        while True:
            self.snapshot_now(snapshot)
            await asyncio.sleep(self.snapshot_interval_s)

    def snapshot_now(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        """Send a snapshot now, between the periodic ones (a failure is logged)."""
        try:
            self.emit(snapshot())
        except Exception:
            log.exception("could not take a cluster snapshot")


def build_metrics_feed(
    pm: pluggy.PluginManager, section: MetricsSection, queue_size: int = DEFAULT_QUEUE_SIZE
) -> MetricsFeed:
    """A feed with the exporters ``[metrics] exporters`` names, each built with its settings.

    :raises ExporterError: an unknown name (the message lists the registered ones) or a factory that
        rejects its settings.
    """
    entries = collect_exporters(pm) if section.exporters else {}
    return metrics_feed_from_entries(entries, section, queue_size)


def metrics_feed_from_entries(
    entries: Mapping[str, ExporterEntry], section: MetricsSection, queue_size: int = DEFAULT_QUEUE_SIZE
) -> MetricsFeed:
    """Like :func:`build_metrics_feed`, from entries already collected with ``collect_exporters``."""
    runners: list[ExporterRunner] = []
    for name in dict.fromkeys(section.exporters):
        entry = entries.get(name)
        if entry is None:
            known = ", ".join(sorted(entries)) or "none"
            raise ExporterError(f"metrics.exporters: unknown exporter {name!r} (registered: {known})")
        settings = section.settings.get(name, {})
        try:
            exporter = entry.factory(**settings)
        except Exception as exc:
            raise ExporterError(
                f"metrics.settings.{name}: exporter {name!r} from plugin {entry.plugin} rejected its settings "
                f"{settings!r}: {type(exc).__name__}: {exc}"
            ) from None
        if not callable(getattr(exporter, "export", None)):
            raise ExporterError(f"metrics.exporters: {name!r} from plugin {entry.plugin} has no export() method")
        runners.append(ExporterRunner(name, exporter, queue_size))
    for name in section.settings:
        if name not in section.exporters:
            log.info("metrics.settings.%s is set but %r is not in metrics.exporters", name, name)
    return MetricsFeed(runners, section.snapshot_interval_s)


def cluster_snapshot(
    ctx: ControllerContext, feed: MetricsFeed, peers: ControllerPeers | None = None
) -> ClusterSnapshot:
    """The controller's state now, from the registry, the dispatcher and the bus (and ``peers``: the
    controllers' summed counters and latency histograms)."""
    registry = ctx.registry
    stats = registry.stats()
    eligible = registry.query(status=("online", "degraded"))
    speeds = {w.id: w.tokens_per_second for w in eligible}
    caches: dict[str, dict[str, float]] = {}
    for w in eligible:
        if w.prompt_cache is not None:
            fields: dict[str, float] = msgspec.structs.asdict(w.prompt_cache)
            caches[w.id] = {**fields, **prompt_cache_rates(fields)}  # type: ignore[arg-type]
    speculation = {w.id: speculation_fields(w.speculation) for w in eligible if w.speculation is not None}
    accelerators = {w.id: accelerator_fields(w.accelerator) for w in eligible if w.accelerator is not None}
    index = ctx.cache_index
    dispatch = ctx.dispatcher.stats
    return ClusterSnapshot(
        time=time.time(),
        inflight=dispatch.in_flight,
        queue_depth=stats.queued,
        workers={
            "online": stats.online,
            "degraded": stats.degraded,
            "draining": stats.draining,
            "offline": stats.offline,
        },
        worker_tokens_per_second=speeds,
        capacity=stats.capacity,
        requests_total=dispatch.requests,
        retries_total=dispatch.retries,
        migrations_total=dispatch.migrations,
        failed_total=dispatch.failed,
        invalid_messages_total=ctx.bus.invalid_messages_total,
        events_dropped_total=feed.dropped,
        worker_prompt_cache=caches,
        worker_speculation=speculation,
        cache_index=msgspec.structs.asdict(index.stats()) if index is not None else {},
        rate_limited_by_key={name: usage.rate_limited for name, usage in ctx.ops.keys.usage.items()},
        tier=peers.totals() if peers is not None else {},
        tier_latency=peers.latency() if peers is not None and peers.online() else {},
        bus=ctx.bus.counters(),
        worker_accelerator=accelerators,
    )


METRICS = web.AppKey("metrics", MetricsFeed)


async def run_metrics(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the exporters and snapshots, feed worker events; close them all on cleanup."""
    feed = app[METRICS]
    if not feed.runners:
        yield
        return
    ctx = app[CONTROLLER]

    peers = app.get(PEERS)

    def snapshot() -> ClusterSnapshot:
        return cluster_snapshot(ctx, feed, peers)

    def on_bus_event(_event: BusEvent) -> None:  # the connection's gauge follows a change at once
        feed.snapshot_now(snapshot)

    ctx.registry.add_listener(feed.on_worker_event)
    ctx.bus.events.add_listener(on_bus_event)
    await feed.start(snapshot)
    try:
        yield
    finally:
        ctx.bus.events.remove_listener(on_bus_event)
        ctx.registry.remove_listener(feed.on_worker_event)
        await feed.close(snapshot)
