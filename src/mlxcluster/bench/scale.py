"""``mlxcluster bench scale``: one controller facing 100 / 500 / 1,000 simulated workers.

A separate simulator process registers N echo workers and publishes their heartbeats at the configured
interval (many workers per process: they are only messages). Each simulated worker also announces a
prompt cache (a reset :class:`~mlxcluster.protocol.CacheEvent`): its own conversation, plus a system
prompt that every worker holds. The controller runs in this process, so its CPU time, the lag between a
heartbeat's ``sent_at`` and its processing, and the time to pick a worker (registry eligibility + cache
index lookup + balancer) are measured directly:

- ``pick``: the default ``cache_aware`` balancer, for the next turn of one worker's conversation;
- ``shared``: the same balancer, for a prompt whose prefix every worker holds (the widest lookup);
- ``least_loaded``: that balancer on the same registry, for comparison.
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
from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.config import Config, from_dict
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import ChatMessage, InferenceRequest, WorkerHeartbeat
from mlxcluster.tables import table
from mlxcluster.tracing import NoSpan

SIMULATOR = r"""
import asyncio, sys, time
import nats
from mlxcluster.bench.scale import conversation, shared_conversation
from mlxcluster.prefix_digest import canonical_text, prefix_digests
from mlxcluster.protocol import CacheEvent, Capabilities, WorkerHeartbeat, WorkerRegistration, encode
from mlxcluster.subjects import Subjects

async def main(url, count, interval_s, seconds):
    nc = await nats.connect(url)
    subjects = Subjects()
    ids = [f"sim-{i:05d}" for i in range(count)]
    shared = prefix_digests(canonical_text(shared_conversation(), None))
    for i, worker_id in enumerate(ids):
        await nc.publish(subjects.register, encode(WorkerRegistration(worker_id=worker_id,
            capabilities=Capabilities(max_concurrent=8, models=["echo"], engine="echo"))))
        own = prefix_digests(canonical_text(conversation(i)[:2], None, reply=conversation(i)[2].content))
        await nc.publish(subjects.cache, encode(CacheEvent(worker_id=worker_id, model="echo", instance=1.0, seq=1,
            reset=True, stored=own + shared)))
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


SHARED_SYSTEM = "You are the assistant every team here shares; follow the house rules. " * 30


def conversation(number: int) -> list[ChatMessage]:
    """Worker ``number``'s conversation, up to its next user turn (an agent with its own long system prompt)."""
    return [
        ChatMessage(role="system", content=f"Agent {number}: you help with project {number}. " * 20),
        ChatMessage(role="user", content=f"first question of conversation {number} " * 6),
        ChatMessage(role="assistant", content=f"first answer of conversation {number} " * 6),
        ChatMessage(role="user", content="and the next step?"),
    ]


def shared_conversation() -> list[ChatMessage]:
    """A prompt whose whole prefix (the shared system prompt) every simulated worker holds."""
    return [ChatMessage(role="system", content=SHARED_SYSTEM), ChatMessage(role="user", content="hello")]


class ScaleRow(msgspec.Struct):
    workers: int
    workers_online: int
    heartbeats_per_s: float
    controller_cpu_percent: float
    pick_p50_us: float
    """``cache_aware`` (the default) picking for a conversation one worker holds, first after a pause."""
    pick_p99_us: float
    heartbeat_lag_p50_ms: float
    heartbeat_lag_p99_ms: float
    warm_pick_p50_us: float = 0.0
    """The same, back to back."""
    shared_pick_p50_us: float = 0.0
    """``cache_aware`` for a prefix every worker holds (first after a pause; ``warm_``: back to back)."""
    warm_shared_pick_p50_us: float = 0.0
    least_loaded_pick_p50_us: float = 0.0
    warm_least_loaded_pick_p50_us: float = 0.0
    cache_index_entries: int = 0
    cache_hits: float = 0.0
    """Share of ``pick`` samples that went to the conversation's holder."""


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
    from mlxcluster.controller.http.context import CONTROLLER
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
        index = ctx.cache_index
        while time.monotonic() < deadline and (
            ctx.registry.stats().online < count or (index is not None and index.stats().workers < count)
        ):
            await asyncio.sleep(0.2)
        await asyncio.sleep(interval_s * 2)  # settle: every worker has heartbeated
        lags.clear()
        heartbeats = 0
        process = psutil.Process()
        cpu_before = process.cpu_times()
        started = time.monotonic()
        picks, hits = await _pick_latencies(ctx, window_s, count)
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
        pick_p50_us=round(percentile(picks["turn"][0], 50), 1),
        pick_p99_us=round(percentile(picks["turn"][0], 99), 1),
        warm_pick_p50_us=round(percentile(picks["turn"][1], 50), 1),
        heartbeat_lag_p50_ms=round(percentile(lags, 50), 2),
        heartbeat_lag_p99_ms=round(percentile(lags, 99), 2),
        shared_pick_p50_us=round(percentile(picks["shared"][0], 50), 1),
        warm_shared_pick_p50_us=round(percentile(picks["shared"][1], 50), 1),
        least_loaded_pick_p50_us=round(percentile(picks["least_loaded"][0], 50), 1),
        warm_least_loaded_pick_p50_us=round(percentile(picks["least_loaded"][1], 50), 1),
        cache_index_entries=len(index) if index is not None else 0,
        cache_hits=round(hits, 3),
    )


PickSamples = dict[str, tuple[list[float], list[float]]]
"""Per kind of pick (``turn``, ``shared``, ``least_loaded``): (first after a pause, back to back) µs."""
BURST = 4


async def _pick_latencies(ctx, window_s: float, count: int) -> tuple[PickSamples, float]:  # type: ignore[no-untyped-def]
    """Time picks (eligibility + index lookup + balancer) while heartbeats flow, 20 bursts a second, the
    kinds in turn: a conversation's next turn, a shared-prefix prompt, ``least_loaded`` for a turn.

    A burst is ``BURST`` picks of new requests (nothing reused from the previous pick). The first comes
    right after the loop's 50 ms pause, as a request reaching a quiet controller does (its CPU caches
    are cold, and on a shared machine other processes ran meanwhile); the others follow back to back,
    as at a high request rate, which is where pick cost caps a controller's throughput. The CPU figure
    includes these picks: 80 picks/s is a light request load next to the heartbeats."""
    from mlxcluster.builtin.balancers import LeastLoaded
    from mlxcluster.controller.routing.balancing import PreferredTier

    least = PreferredTier(LeastLoaded(), name="least_loaded")
    samples: PickSamples = {kind: ([], []) for kind in ("turn", "shared", "least_loaded")}
    turns = hits = 0
    stop_at = time.monotonic() + window_s
    tick = 0
    while time.monotonic() < stop_at:
        kind = ("turn", "shared", "least_loaded")[tick % 3]
        for i in range(BURST):
            number = (tick * 37 + i) % count
            if kind == "shared":
                request = InferenceRequest(request_id=f"s-{tick}-{i}", model="echo", messages=shared_conversation())
            else:
                request = InferenceRequest(request_id=f"t-{tick}-{i}", model="echo", messages=conversation(number))
            started = time.perf_counter()
            if kind == "least_loaded":
                chosen = least.pick(ctx.registry.eligible("echo", set()), request)
            else:
                chosen = ctx.dispatcher._pick(request, set(), NoSpan())  # the pick as dispatch makes it, untraced
            samples[kind][0 if i == 0 else 1].append((time.perf_counter() - started) * 1e6)
            if kind == "turn":
                turns += 1
                hits += chosen is not None and chosen.id == f"sim-{number:05d}"
        tick += 1
        await asyncio.sleep(0.05)
    return samples, hits / max(1, turns)


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
            f"{r.warm_pick_p50_us:.0f}",
            f"{r.shared_pick_p50_us:.0f} / {r.warm_shared_pick_p50_us:.0f}",
            f"{r.least_loaded_pick_p50_us:.0f} / {r.warm_least_loaded_pick_p50_us:.0f}",
            f"{r.cache_index_entries:,}",
            f"{100 * r.cache_hits:.0f}",
        ]
        for r in result.rows
    ]
    return (
        f"bench scale — simulated echo workers, heartbeat every {result.heartbeat_interval_ms} ms, "
        f"{result.window_s:.0f} s windows — {result.machine}\n"
        "pick = cache_aware (the default) for a conversation one worker holds, first after a 50 ms pause "
        "(warm: back to back); shared = a prefix all workers hold; least_loaded on the same registry "
        "(pause / warm)\n"
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
                "pick warm p50 µs",
                "shared p50 µs",
                "least_loaded p50 µs",
                "index entries",
                "to holder %",
            ],
            rows,
        )
    )
