"""The prompt cache's byte bound under load (``bench multiturn`` part e), read from worker heartbeats.

:class:`CacheWatch` subscribes to ``worker.heartbeat`` on NATS and keeps, per worker, the latest
:class:`~mlxcluster.protocol.PromptCacheStats` and the largest ``bytes`` ever reported. (The controller
of this branch does not put the stats in ``/api/cluster/workers`` yet; the heartbeat is the source
either way.) Heartbeats are samples: a peak between two of them is not seen, so the part runs with a
short heartbeat interval and also states the entries and evictions the worker counted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import TracebackType

import aiohttp
import msgspec

from mlxcluster.bench.conversation import build_conversations
from mlxcluster.bench.versus import chat_turn, mlxcluster_server, token_counter
from mlxcluster.bus import Bus
from mlxcluster.config import NatsSection, from_dict
from mlxcluster.protocol import PromptCacheStats, WorkerHeartbeat
from mlxcluster.subjects import Subjects


class CacheBoundResult(msgspec.Struct):
    """Part e: distinct long prompts into one worker whose cache holds only a few of them."""

    limit_bytes: int
    max_bytes_seen: int
    heartbeats: int
    requests: int
    prompt_tokens_each: int
    entries: int
    evictions: int
    hits: int
    within_bound: bool


class CacheWatch:
    """Heartbeat listener: latest and peak prompt-cache stats per worker."""

    def __init__(self, nats: NatsSection, subjects: Subjects | None = None) -> None:
        self.nats = nats
        self.subjects = subjects or Subjects()
        self.latest: dict[str, PromptCacheStats] = {}
        self.max_bytes: dict[str, int] = {}
        self.over_limit: dict[str, int] = {}
        self.count = 0
        self._bus: Bus | None = None

    async def __aenter__(self) -> CacheWatch:
        self._bus = await Bus.connect(self.nats, name="bench-cache-watch", attempts=5)
        await self._bus.subscribe(self.subjects.heartbeat, WorkerHeartbeat, self._on_heartbeat)
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._bus is not None:
            await self._bus.close()

    async def _on_heartbeat(self, beat: WorkerHeartbeat, _msg: object) -> None:
        self.count += 1
        stats = beat.prompt_cache
        if stats is None:
            return
        self.latest[beat.worker_id] = stats
        self.max_bytes[beat.worker_id] = max(self.max_bytes.get(beat.worker_id, 0), stats.bytes)
        if stats.limit_bytes and stats.bytes > stats.limit_bytes:
            self.over_limit[beat.worker_id] = self.over_limit.get(beat.worker_id, 0) + 1

    def hits(self) -> dict[str, int]:
        return {worker: stats.hits for worker, stats in self.latest.items()}

    async def settle(self, beats: int = 2, timeout: float = 30.0) -> None:
        """Until ``beats`` more heartbeats per known worker arrived (their stats are current)."""
        target = self.count + beats * max(1, len(self.latest))
        deadline = time.monotonic() + timeout
        while self.count < target and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


async def run_cache_bound(
    model_path: str, *, requests: int, prompt_tokens: int, limit_bytes: int, concurrency: int = 2
) -> CacheBoundResult:
    """``requests`` distinct prompts of ``prompt_tokens`` tokens, ``concurrency`` at a time, into one worker
    with ``worker.prompt_cache_bytes = limit_bytes`` and heartbeats every 250 ms."""
    count = token_counter(model_path)
    env = {
        "MLXCLUSTER_WORKER_PROMPT_CACHE_BYTES": str(limit_bytes),
        "MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS": "250",
    }
    async with mlxcluster_server(model_path, max_concurrent=concurrency, env=env) as cluster:
        nats = from_dict({"nats": {"url": cluster.nats_url}}).nats
        async with CacheWatch(nats) as watch:
            name = Path(model_path).name
            conversations = build_conversations(requests, prompt_tokens, count, first=1000)
            gate = asyncio.Semaphore(concurrency)

            async def one(session: aiohttp.ClientSession, index: int) -> None:
                async with gate:
                    await chat_turn(session, cluster.base_url, name, conversations[index].request_messages(), 4)

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
                await asyncio.gather(*(one(session, i) for i in range(requests)))
            await watch.settle()
    stats = next(iter(watch.latest.values()), PromptCacheStats())
    peak = max(watch.max_bytes.values(), default=0)
    return CacheBoundResult(
        limit_bytes=limit_bytes,
        max_bytes_seen=peak,
        heartbeats=watch.count,
        requests=requests,
        prompt_tokens_each=prompt_tokens,
        entries=stats.entries,
        evictions=stats.evictions,
        hits=stats.hits,
        within_bound=peak <= limit_bytes and not watch.over_limit,
    )
