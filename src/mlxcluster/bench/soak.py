"""``mlxcluster bench soak --minutes N``: steady load at half capacity; RSS growth and latency over time.

A controller and two echo workers (per-token delay, so requests take ~0.1 s) run as subprocesses; a
closed loop of clients fills half of the cluster's slots for N minutes. Each window records p50/p99,
errors and the RSS of every process. Growth is the last window's RSS over the first's (the first
window is the warm-up).
"""

from __future__ import annotations

import time

import msgspec
import psutil

from mlxcluster.bench.cluster import chat_body, run_load
from mlxcluster.bench.nats import bench_config
from mlxcluster.bench.procs import BenchCluster
from mlxcluster.bench.stats import machine_line, percentile, table
from mlxcluster.embedded import EmbeddedNatsServer

WORKERS = 2
MAX_CONCURRENT = 8
TOKEN_DELAY_MS = 5
PROMPT = " ".join(f"word{i}" for i in range(20))  # 20 tokens × 5 ms ≈ 0.1 s per request


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

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


async def run_soak(*, minutes: float, window_s: float) -> SoakResult:
    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    clients = WORKERS * MAX_CONCURRENT // 2
    cluster = BenchCluster(
        nats_url=server.url,
        env={
            "MLXCLUSTER_WORKER_ENGINE": "echo",
            "MLXCLUSTER_WORKER_ECHO_TOKEN_DELAY_MS": str(TOKEN_DELAY_MS),
            "MLXCLUSTER_WORKER_MAX_CONCURRENT": str(MAX_CONCURRENT),
        },
    )
    windows: list[SoakWindow] = []
    try:
        cluster.start_controller()
        for index in range(WORKERS):
            cluster.start_worker(f"soak-w{index + 1}")
        await cluster.wait_for_workers(WORKERS)
        names = ["controller"] + [f"worker{i + 1}" for i in range(WORKERS)]
        processes = {name: psutil.Process(p.pid) for name, p in zip(names, cluster.processes, strict=True)}
        processes["nats-server"] = psutil.Process(server.pid)
        started = time.monotonic()
        end_at = started + minutes * 60
        body = chat_body(PROMPT, max_tokens=64)
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
    finally:
        cluster.stop()
        await server.stop()
    first, last = windows[0], windows[-1]
    growth = {name: round((last.rss_mb[name] / first.rss_mb[name] - 1) * 100, 2) for name in first.rss_mb}
    return SoakResult(
        machine=machine_line(),
        minutes=minutes,
        clients=clients,
        capacity_slots=WORKERS * MAX_CONCURRENT,
        windows=windows,
        rss_growth_percent=growth,
        errors=sum(w.errors for w in windows),
        p99_first_ms=first.p99_ms,
        p99_last_ms=last.p99_ms,
    )


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
        f"bench soak — {result.minutes:g} min, {result.clients} clients on {result.capacity_slots} echo slots "
        f"(half capacity) — {result.machine}\n"
        + table(["minute", "requests", "errors", "p50 ms", "p99 ms", *[f"{n} MB" for n in names]], rows)
        + f"\n\nRSS growth first → last window (target < 5%): {growth}"
        + f"\np99 first → last window: {result.p99_first_ms:.0f} → {result.p99_last_ms:.0f} ms; "
        f"errors: {result.errors}"
    )
