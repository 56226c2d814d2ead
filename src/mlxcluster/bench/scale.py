"""``mlxcluster bench scale``: one controller facing 100 / 500 / 1,000 simulated workers.

A separate simulator process registers N echo workers and publishes their heartbeats at the configured
interval (many workers per process: they are only messages). The controller runs in this process, so
its CPU time, the lag between a heartbeat's ``sent_at`` and its processing, and the time to pick a
worker (registry eligibility + balancer) are measured directly.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import msgspec
import psutil
from aiohttp import web

from mlxcluster.bench.nats import bench_config, free_port
from mlxcluster.bench.stats import machine_line, percentile, table
from mlxcluster.config import Config, from_dict
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import ChatMessage, InferenceRequest, WorkerHeartbeat

SIMULATOR = r"""
import asyncio, sys, time
import nats
from mlxcluster.protocol import Capabilities, WorkerHeartbeat, WorkerRegistration, encode
from mlxcluster.subjects import Subjects

async def main(url, count, interval_s, seconds):
    nc = await nats.connect(url)
    subjects = Subjects()
    ids = [f"sim-{i:05d}" for i in range(count)]
    for worker_id in ids:
        await nc.publish(subjects.register, encode(WorkerRegistration(worker_id=worker_id,
            capabilities=Capabilities(max_concurrent=8, models=["echo"], engine="echo"))))
    stop_at = time.monotonic() + seconds
    tick = 0
    while time.monotonic() < stop_at:
        started = time.monotonic()
        for i, worker_id in enumerate(ids):
            await nc.publish(subjects.heartbeat, encode(WorkerHeartbeat(worker_id=worker_id, active=(i + tick) % 8,
                tokens_per_second=10.0 + i % 7, models_loaded=["echo"], sent_at=time.time())))
            if i % 200 == 199:
                await asyncio.sleep(0)  # spread a large fleet's heartbeats a little, as real ones are
        tick += 1
        await nc.flush()
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    await nc.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
"""


class ScaleRow(msgspec.Struct):
    workers: int
    workers_online: int
    heartbeats_per_s: float
    controller_cpu_percent: float
    pick_p50_us: float
    pick_p99_us: float
    heartbeat_lag_p50_ms: float
    heartbeat_lag_p99_ms: float


class ScaleBenchResult(msgspec.Struct):
    machine: str
    heartbeat_interval_ms: int
    window_s: float
    rows: list[ScaleRow]

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def _config(nats: Config, interval_ms: int) -> Config:
    return from_dict(
        {
            "nats": {"url": nats.nats.url, "embedded": {"port": nats.nats.embedded.port, "http_port": 0}},
            "controller": {"port": free_port()},
            "discovery": {"heartbeat_interval_ms": interval_ms, "offline_timeout_ms": interval_ms * 3},
        }
    )


async def _one_fleet(server_url: str, config: Config, count: int, window_s: float) -> ScaleRow:
    from mlxcluster.bus import Bus
    from mlxcluster.controller.app import create_app
    from mlxcluster.controller.context import CONTROLLER
    from mlxcluster.plugins import get_plugin_manager

    bus = await Bus.connect(config.nats, name="bench-scale", attempts=5)
    app = create_app(config, bus, get_plugin_manager(config.plugins))
    ctx = app[CONTROLLER]
    lags: list[float] = []
    heartbeats = 0
    original = ctx.registry.on_heartbeat

    def measured(message: WorkerHeartbeat) -> bool:  # the lag from the worker's clock to processing
        nonlocal heartbeats
        heartbeats += 1
        lags.append((time.time() - message.sent_at) * 1000)
        return original(message)

    ctx.registry.on_heartbeat = measured  # type: ignore[method-assign]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    interval_s = config.discovery.heartbeat_interval_ms / 1000
    simulator = subprocess.Popen(
        [sys.executable, "-c", SIMULATOR, server_url, str(count), str(interval_s), str(window_s + 10)],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while ctx.registry.stats().online < count and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(interval_s * 2)  # settle: every worker has heartbeated
        lags.clear()
        heartbeats = 0
        process = psutil.Process()
        cpu_before = process.cpu_times()
        started = time.monotonic()
        picks = await _pick_latencies(ctx, window_s)
        elapsed = time.monotonic() - started
        cpu_after = process.cpu_times()
        cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        online = ctx.registry.stats().online
    finally:
        simulator.terminate()
        simulator.wait(timeout=10)
        await runner.cleanup()
        await bus.close()
    return ScaleRow(
        workers=count,
        workers_online=online,
        heartbeats_per_s=round(heartbeats / elapsed, 1),
        controller_cpu_percent=round(cpu_s / elapsed * 100, 1),
        pick_p50_us=round(percentile(picks, 50), 1),
        pick_p99_us=round(percentile(picks, 99), 1),
        heartbeat_lag_p50_ms=round(percentile(lags, 50), 2),
        heartbeat_lag_p99_ms=round(percentile(lags, 99), 2),
    )


async def _pick_latencies(ctx, window_s: float) -> list[float]:  # type: ignore[no-untyped-def]
    """Time the dispatcher's pick (eligibility + balancer) 20 times a second while heartbeats flow.

    The CPU figure includes these picks: 20 picks/s is a light request load next to the heartbeats."""
    request = InferenceRequest(request_id="pick", model="echo", messages=[ChatMessage(role="user", content="x")])
    samples: list[float] = []
    stop_at = time.monotonic() + window_s
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        ctx.dispatcher._pick(request, set())
        samples.append((time.perf_counter() - started) * 1e6)
        await asyncio.sleep(0.05)
    return samples


async def run_scale_bench(*, fleets: tuple[int, ...], window_s: float, interval_ms: int) -> ScaleBenchResult:
    nats_config = bench_config()
    server = EmbeddedNatsServer(nats_config.nats)
    await server.start()
    rows = []
    try:
        for count in fleets:
            rows.append(await _one_fleet(server.url, _config(nats_config, interval_ms), count, window_s))
    finally:
        await server.stop()
    return ScaleBenchResult(machine=machine_line(), heartbeat_interval_ms=interval_ms, window_s=window_s, rows=rows)


def format_table(result: ScaleBenchResult) -> str:
    rows = [
        [
            str(r.workers),
            str(r.workers_online),
            f"{r.heartbeats_per_s:,.0f}",
            f"{r.controller_cpu_percent:.1f}",
            f"{r.pick_p50_us:.0f}",
            f"{r.pick_p99_us:.0f}",
            f"{r.heartbeat_lag_p50_ms:.2f}",
            f"{r.heartbeat_lag_p99_ms:.2f}",
        ]
        for r in result.rows
    ]
    return (
        f"bench scale — simulated echo workers, heartbeat every {result.heartbeat_interval_ms} ms, "
        f"{result.window_s:.0f} s windows — {result.machine}\n"
        + table(
            [
                "workers",
                "online",
                "heartbeats/s",
                "controller CPU %",
                "pick p50 µs",
                "pick p99 µs",
                "hb lag p50 ms",
                "hb lag p99 ms",
            ],
            rows,
        )
    )
