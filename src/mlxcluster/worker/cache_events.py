"""A worker's prompt-cache events on the bus: digests stored and dropped, coalesced, plus snapshots.

The engine's cache listener may be called from the engine's own thread; each call is moved onto the
event loop with ``call_soon_threadsafe``. A change after a quiet spell is published at once (the engine
stores a finished request's cache just before its Done frame, so the controllers learn where the
conversation is cached before its client can send the next turn); further changes within
``flush_interval_s`` are coalesced into one :class:`~mlxcluster.protocol.CacheEvent` delta per served model
(a digest stored then dropped within the window is never sent). A full snapshot (``reset``) goes out
when the worker starts, when a controller announces itself (a restarted controller's index starts empty) and every
``snapshot_interval_s`` (healing events lost on the bus). A snapshot larger than one message is sent as
a reset followed by deltas, each at most ``max_digests`` digests so it fits NATS's ``max_payload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterator

from mlxcluster.bus import Bus
from mlxcluster.protocol import CacheEvent
from mlxcluster.worker.engine_base import Engine

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.15
SNAPSHOT_INTERVAL_S = 30.0
DIGEST_BYTES = 21
"""Bytes one digest takes at most in a JSON event (19 digits and a comma, with margin)."""
MAX_DIGESTS = 20_000
ENVELOPE_BYTES = 1024


def digests_per_message(max_payload: int) -> int:
    """The most digests one event may carry under ``max_payload``."""
    return max(1, min(MAX_DIGESTS, (max_payload - ENVELOPE_BYTES) // DIGEST_BYTES))


class CacheEventPublisher:
    """Publishes one engine's prompt-cache changes for ``worker_id``; ``instance`` is its start time."""

    def __init__(
        self,
        *,
        bus: Bus,
        engine: Engine,
        worker_id: str,
        instance: float,
        models: list[str],
        flush_interval_s: float = FLUSH_INTERVAL_S,
        snapshot_interval_s: float = SNAPSHOT_INTERVAL_S,
        sequence: Iterator[int] | None = None,
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.worker_id = worker_id
        self.instance = instance
        self.models = models
        self.flush_interval_s = flush_interval_s
        self.snapshot_interval_s = snapshot_interval_s
        self.max_digests = digests_per_message(bus.max_payload)
        self.seq = 0
        self._sequence = sequence if sequence is not None else itertools.count(1)
        """Where ``seq`` numbers come from: shared by the publishers of one worker's engines (one model each)."""
        self.published = 0
        self._last_flush = float("-inf")
        self._stored: dict[int, None] = {}  # insertion-ordered: a conversation's digests stay in chain order
        self._removed: dict[int, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush: asyncio.TimerHandle | None = None
        self._snapshots: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one snapshot or delta on the wire at a time, in seq order

    async def start(self) -> None:
        """Listen to the engine, publish the first snapshot, start the periodic ones."""
        self._loop = asyncio.get_running_loop()
        self.engine.set_cache_listener(self._on_change)
        await self.snapshot()
        self._snapshots = asyncio.create_task(self._snapshot_loop())

    async def stop(self) -> None:
        """Stop listening and publishing."""
        self.engine.set_cache_listener(None)
        if self._flush is not None:
            self._flush.cancel()
        for task in (self._snapshots, *self._tasks):
            if task is not None:
                task.cancel()

    # --- changes ---------------------------------------------------------------------------------

    def _on_change(self, stored: list[int], removed: list[int]) -> None:
        """The engine's listener: any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._add, list(stored), list(removed))

    def _add(self, stored: list[int], removed: list[int]) -> None:
        for digest in removed:
            if self._stored.pop(digest, 0) is None:  # stored and dropped within the window: nobody knew
                continue
            self._removed[digest] = None
        for digest in stored:
            self._removed.pop(digest, None)
            self._stored[digest] = None
        if (self._stored or self._removed) and self._flush is None and self._loop is not None:
            delay = max(0.0, self._last_flush + self.flush_interval_s - self._loop.time())
            self._flush = self._loop.call_later(delay, self._spawn_flush)

    def _spawn_flush(self) -> None:
        self._flush = None
        if self._loop is not None:
            self._last_flush = self._loop.time()
        task = asyncio.ensure_future(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Publish the coalesced changes now."""
        async with self._lock:
            stored, removed = list(self._stored), list(self._removed)
            self._stored.clear()
            self._removed.clear()
            if stored or removed:
                await self._publish(stored, removed, reset=False)

    async def snapshot(self) -> None:
        """Publish everything the cache holds (a reset), replacing what controllers know of this worker."""
        async with self._lock:
            self._stored.clear()
            self._removed.clear()
            await self._publish(self.engine.cache_digests(), [], reset=True)

    async def cleared(self) -> None:
        """Publish an empty snapshot: the engine is gone (its model unloaded), and its cache with it."""
        async with self._lock:
            self._stored.clear()
            self._removed.clear()
            await self._publish([], [], reset=True)

    async def _publish(self, stored: list[int], removed: list[int], *, reset: bool) -> None:
        size = self.max_digests
        chunks: list[tuple[list[int], list[int]]] = [
            (stored[i : i + size], []) for i in range(0, len(stored), size)
        ] + [([], removed[i : i + size]) for i in range(0, len(removed), size)]
        for i, (part_stored, part_removed) in enumerate(chunks or [([], [])]):
            for model in self.models:
                self.seq = next(self._sequence)
                event = CacheEvent(
                    worker_id=self.worker_id,
                    model=model,
                    instance=self.instance,
                    seq=self.seq,
                    reset=reset and i == 0,
                    stored=part_stored,
                    removed=part_removed,
                )
                try:
                    await self.bus.publish(self.bus.subjects.cache, event)
                    self.published += 1
                except Exception as exc:  # the bus may be down: the next snapshot heals the controllers
                    log.debug("could not publish a cache event: %s", exc)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval_s)
            try:
                await self.snapshot()
            except Exception:
                log.exception("cache snapshot failed")
