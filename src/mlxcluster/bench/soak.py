"""``mlxcluster bench soak --minutes N``: steady load at half capacity; RSS growth and latency over time.

A controller and two echo workers (per-token delay, so requests take ~0.1 s) run as subprocesses; a
closed loop of clients fills half of the cluster's slots for N minutes. Each window records p50/p99,
errors and the RSS of every process. Growth is the last window's RSS over the first's (the first
window is the warm-up).

With ``cache_full`` the worker is one real mlx worker on the demo model whose prompt cache is kept full:
every request brings a distinct long system prompt, the cache holds only a few of them
(``CACHE_FULL_BYTES``), and it is filled before the first window, so each request stores one entry and
evicts another. The cache's bytes and evictions come from the worker's heartbeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil

from mlxcluster.bench.cluster import chat_body, run_load
from mlxcluster.bench.engine import cluster_blas_env
from mlxcluster.bench.nats import bench_config
from mlxcluster.bench.procs import BenchCluster
from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.tables import table

WORKERS = 2
MAX_CONCURRENT = 8
TOKEN_DELAY_MS = 5
PROMPT = " ".join(f"word{i}" for i in range(20))  # 20 tokens × 5 ms ≈ 0.1 s per request
CACHE_FULL_BYTES = 48 << 20
"""Prompt-cache bound of the cache-full soak: two or three of its prompts' KV caches (f32 demo model)."""
CACHE_FULL_PROMPT_TOKENS = 400
CACHE_FULL_SLOTS = 2


class SoakWindow(msgspec.Struct):
    minute: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    rss_mb: dict[str, float]


class SoakResult(msgspec.Struct):
    machine: str
    minutes: float
    clients: int
    capacity_slots: int
    windows: list[SoakWindow]
    rss_growth_percent: dict[str, float]
    errors: int
    p99_first_ms: float
    p99_last_ms: float
    mode: str = "echo"
    """``echo``, or ``cache-full`` (one mlx worker, its prompt cache full of distinct long prompts)."""
    cache_limit_bytes: int = 0
    cache_max_bytes: int = 0
    cache_evictions: int = 0

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


async def run_soak(*, minutes: float, window_s: float, cache_full: bool = False, model_path: str = "") -> SoakResult:
    from mlxcluster.bench.cache_bound import CacheWatch

    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    if cache_full:
        workers, slots, clients = 1, CACHE_FULL_SLOTS, CACHE_FULL_SLOTS
        env = {
            "MLXCLUSTER_WORKER_MODEL": model_path,
            "MLXCLUSTER_WORKER_MAX_CONCURRENT": str(slots),
            "MLXCLUSTER_WORKER_PROMPT_CACHE_BYTES": str(CACHE_FULL_BYTES),
            "MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS": "500",
        }
        body: dict[str, object] | Callable[[int], dict[str, object]] = _distinct_long_prompts(model_path)
    else:
        workers, slots = WORKERS, MAX_CONCURRENT
        clients = workers * slots // 2
        env = {
            "MLXCLUSTER_WORKER_ENGINE": "echo",
            "MLXCLUSTER_WORKER_ECHO_TOKEN_DELAY_MS": str(TOKEN_DELAY_MS),
            "MLXCLUSTER_WORKER_MAX_CONCURRENT": str(slots),
        }
        body = chat_body(PROMPT, max_tokens=64)
    cluster = BenchCluster(nats_url=server.url, env=env)
    windows: list[SoakWindow] = []
    try:
        cluster.start_controller()
        for index in range(workers):
            cluster.start_worker(f"soak-w{index + 1}", cluster_blas_env() if cache_full else None)
        await cluster.wait_for_workers(workers)
        names = ["controller"] + [f"worker{i + 1}" for i in range(workers)]
        processes = {name: psutil.Process(p.pid) for name, p in zip(names, cluster.processes, strict=True)}
        processes["nats-server"] = psutil.Process(server.pid)
        async with CacheWatch(config.nats) as watch:
            if cache_full:  # fill the cache before the first window: every later request evicts
                await run_load(cluster.base_url, concurrency=clients, requests=4, time_limit_s=300, body=body)
            started = time.monotonic()
            end_at = started + minutes * 60
            while time.monotonic() < end_at:
                span = min(window_s, end_at - time.monotonic())
                if span < 1:
                    break
                load = await run_load(
                    cluster.base_url, concurrency=clients, requests=int(span * 2000), time_limit_s=span, body=body
                )
                windows.append(
                    SoakWindow(
                        minute=round((time.monotonic() - started) / 60, 2),
                        requests=len(load.latencies_ms),
                        errors=load.errors,
                        p50_ms=round(percentile(load.latencies_ms, 50), 1),
                        p99_ms=round(percentile(load.latencies_ms, 99), 1),
                        rss_mb={name: round(p.memory_info().rss / 2**20, 1) for name, p in processes.items()},
                    )
                )
            await watch.settle(timeout=5)
    finally:
        cluster.stop()
        await server.stop()
    first, last = windows[0], windows[-1]
    growth = {name: round((last.rss_mb[name] / first.rss_mb[name] - 1) * 100, 2) for name in first.rss_mb}
    stats = next(iter(watch.latest.values()), None)
    return SoakResult(
        machine=machine_line(),
        minutes=minutes,
        clients=clients,
        capacity_slots=workers * slots,
        windows=windows,
        rss_growth_percent=growth,
        errors=sum(w.errors for w in windows),
        p99_first_ms=first.p99_ms,
        p99_last_ms=last.p99_ms,
        mode="cache-full" if cache_full else "echo",
        cache_limit_bytes=stats.limit_bytes if stats else 0,
        cache_max_bytes=max(watch.max_bytes.values(), default=0),
        cache_evictions=stats.evictions if stats else 0,
    )


def _distinct_long_prompts(model_path: str) -> Callable[[int], dict[str, object]]:
    """Request bodies each with its own ~400-token system prompt (never a cache hit past the template)."""
    from mlxcluster.bench.conversation import system_prompt
    from mlxcluster.bench.versus import token_counter

    count = token_counter(model_path)
    base = system_prompt(0, CACHE_FULL_PROMPT_TOKENS, count).split(" ", 2)[2]
    name = Path(model_path).name

    def body(index: int) -> dict[str, object]:
        system = f"Session {index + 1} (soak). {base}"  # distinct from the first words on
        return {
            "model": name,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}],
        }

    return body


def format_table(result: SoakResult) -> str:
    names = list(result.windows[0].rss_mb) if result.windows else []
    rows = [
        [
            f"{w.minute:.1f}",
            str(w.requests),
            str(w.errors),
            f"{w.p50_ms:.0f}",
            f"{w.p99_ms:.0f}",
            *[f"{w.rss_mb[n]:.0f}" for n in names],
        ]
        for w in result.windows
    ]
    growth = ", ".join(f"{name} {pct:+.1f}%" for name, pct in result.rss_growth_percent.items())
    return (
        _title(result)
        + table(["minute", "requests", "errors", "p50 ms", "p99 ms", *[f"{n} MB" for n in names]], rows)
        + f"\n\nRSS growth first → last window (target < 5%): {growth}"
        + f"\np99 first → last window: {result.p99_first_ms:.0f} → {result.p99_last_ms:.0f} ms; "
        f"errors: {result.errors}"
        + (
            f"\nprompt cache: largest seen {result.cache_max_bytes / 2**20:.1f} MiB of "
            f"{result.cache_limit_bytes / 2**20:.0f} MiB, {result.cache_evictions} evictions"
            if result.mode == "cache-full"
            else ""
        )
    )


def _title(result: SoakResult) -> str:
    if result.mode == "cache-full":
        what = (
            f"{result.clients} clients on {result.capacity_slots} slots of one mlx worker, prompt cache full "
            f"(distinct ~{CACHE_FULL_PROMPT_TOKENS}-token prompts)"
        )
    else:
        what = f"{result.clients} clients on {result.capacity_slots} echo slots (half capacity)"
    return f"bench soak — {result.minutes:g} min, {what} — {result.machine}\n"
