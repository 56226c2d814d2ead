"""``mlxcluster bench faults``: kill -9 one of three workers under 100 concurrent streams.

nats-server, a controller and three echo workers (one word per token, ``TOKEN_DELAY_MS`` apart) run as
separate processes, none supervised, so a killed worker stays dead. 100 streamed chat requests of
``tokens`` tokens start together; once the victim is generating its share, it gets SIGKILL. Reported per
round: streams completed whole out of 100, how long the controller took to mark the victim offline (its
API polled every 20 ms), how many streams moved to another worker mid-stream, and the latency they
added. Moved streams are told apart by their longest silence between two tokens (the ``migrations`` count
says how many); they are compared with the first streams the other workers started (the same wave), which
were not queued behind others either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
from typing import Any

import aiohttp
import msgspec

from mlxcluster.bench.nats import bench_config
from mlxcluster.bench.procs import BenchCluster
from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.tables import table

STREAMS = 100
WORKERS = ("fw1", "fw2", "fw3")
VICTIM = WORKERS[0]
TOKEN_DELAY_MS = 20
HEARTBEAT_MS = 200
OFFLINE_TIMEOUT_MS = 1500
STREAM_DEADLINE_S = 60.0


class StreamOutcome(msgspec.Struct):
    ok: bool
    duration_s: float
    longest_gap_s: float
    ttft_s: float = 0.0
    detail: str = ""


class FaultRound(msgspec.Struct):
    completed: int
    streams: int
    detect_s: float
    """Kill → the controller's API shows the victim offline."""
    migrations: int
    moved_p50_s: float
    unmoved_p50_s: float
    """Median duration of the first streams the other workers started (the moved streams' wave)."""
    added_p50_s: float
    added_max_s: float
    longest_gap_p50_s: float
    """The silence a moved stream's client saw (detection and the new worker's start)."""
    failures: list[str]


class FaultsResult(msgspec.Struct):
    machine: str
    tokens: int
    token_delay_ms: int
    offline_timeout_ms: int
    rounds: list[FaultRound]

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def _prompt(tokens: int) -> str:
    return " ".join(f"w{i}" for i in range(tokens))


async def _stream(session: aiohttp.ClientSession, url: str, prompt: str) -> StreamOutcome:
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    started = time.monotonic()
    first: float | None = None
    last: float | None = None  # gaps are measured between tokens, not before the first one (queueing)
    parts: list[str] = []
    finish, gap, error = None, 0.0, ""
    try:
        async with asyncio.timeout(STREAM_DEADLINE_S), session.post(url, json=body) as response:
            if response.status != 200:
                return StreamOutcome(False, time.monotonic() - started, 0.0, 0.0, f"HTTP {response.status}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("code") or "error"
                    continue
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        now = time.monotonic()
                        gap, last = (gap if last is None else max(gap, now - last)), now
                        first = first or now
                        parts.append(choice["delta"]["content"])
                    finish = choice.get("finish_reason") or finish
    except (TimeoutError, aiohttp.ClientError) as exc:
        error = type(exc).__name__
    duration = time.monotonic() - started
    ok = not error and finish is not None and "".join(parts) == prompt
    ttft = (first or started) - started
    return StreamOutcome(ok, duration, gap, ttft, error or ("" if ok else "incomplete or corrupt"))


async def _json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            if response.status == 200:
                answer: dict[str, Any] = await response.json()
                return answer
    return {}


async def _one_round(tokens: int) -> FaultRound:
    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    cluster = BenchCluster(
        nats_url=server.url,
        env={
            "MLXCLUSTER_WORKER_ENGINE": "echo",
            "MLXCLUSTER_WORKER_ECHO_TOKEN_DELAY_MS": str(TOKEN_DELAY_MS),
            "MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_MS),
            "MLXCLUSTER_DISCOVERY_OFFLINE_TIMEOUT_MS": str(OFFLINE_TIMEOUT_MS),
            "MLXCLUSTER_CONTROLLER_FIRST_TOKEN_TIMEOUT_S": "10",
        },
    )
    try:
        cluster.start_controller()
        for worker_id in WORKERS:
            cluster.start_worker(worker_id)
        await cluster.wait_for_workers(len(WORKERS))
        victim = cluster.processes[1]  # started right after the controller
        base = cluster.base_url
        prompt = _prompt(tokens)
        limits = aiohttp.TCPConnector(limit=STREAMS + 10)
        async with aiohttp.ClientSession(connector=limits) as session:
            streams = [
                asyncio.create_task(_stream(session, base + "/v1/chat/completions", prompt)) for _ in range(STREAMS)
            ]
            while True:  # the victim is generating its share of the streams
                view = await _json(session, f"{base}/api/cluster/workers/{VICTIM}")
                if view.get("active", 0) >= 4:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(tokens * TOKEN_DELAY_MS / 1000 / 3)  # about a third of the way into them
            killed_at = time.monotonic()
            os.killpg(victim.pid, signal.SIGKILL)
            detect_s = -1.0
            while time.monotonic() - killed_at < 20:
                view = await _json(session, f"{base}/api/cluster/workers/{VICTIM}")
                if view.get("status") == "offline":
                    detect_s = time.monotonic() - killed_at
                    break
                await asyncio.sleep(0.02)
            outcomes = await asyncio.gather(*streams)
            status = await _json(session, f"{base}/api/cluster/status")
        migrations = int(status.get("requests", {}).get("migrations", 0))
    finally:
        cluster.stop()
        await server.stop()
    by_gap = sorted(outcomes, key=lambda o: o.longest_gap_s, reverse=True)
    moved, unmoved = by_gap[:migrations], by_gap[migrations:]
    # the same wave: the first streams the two other workers started (as many each as the victim ran),
    # which, like the moved ones, were not queued behind others
    wave = sorted(unmoved, key=lambda o: o.ttft_s)[: 2 * len(moved)] or unmoved
    unmoved_p50 = statistics.median(o.duration_s for o in wave) if wave else 0.0
    added = [o.duration_s - unmoved_p50 for o in moved]
    return FaultRound(
        completed=sum(o.ok for o in outcomes),
        streams=len(outcomes),
        detect_s=round(detect_s, 3),
        migrations=migrations,
        moved_p50_s=round(percentile([o.duration_s for o in moved], 50), 3),
        unmoved_p50_s=round(unmoved_p50, 3),
        added_p50_s=round(percentile(added, 50), 3),
        added_max_s=round(max(added, default=0.0), 3),
        longest_gap_p50_s=round(percentile([o.longest_gap_s for o in moved], 50), 3),
        failures=sorted({o.detail for o in outcomes if not o.ok}),
    )


async def run_faults_bench(*, rounds: int, tokens: int) -> FaultsResult:
    results = [await _one_round(tokens) for _ in range(rounds)]
    return FaultsResult(
        machine=machine_line(),
        tokens=tokens,
        token_delay_ms=TOKEN_DELAY_MS,
        offline_timeout_ms=OFFLINE_TIMEOUT_MS,
        rounds=results,
    )


def format_table(result: FaultsResult) -> str:
    rows = [
        [
            str(i + 1),
            f"{r.completed}/{r.streams}",
            f"{r.detect_s:.2f}",
            str(r.migrations),
            f"{r.unmoved_p50_s:.2f}",
            f"{r.moved_p50_s:.2f}",
            f"{r.added_p50_s:.2f} (max {r.added_max_s:.2f})",
            f"{r.longest_gap_p50_s:.2f}",
        ]
        for i, r in enumerate(result.rounds)
    ]
    failures = sorted({f for r in result.rounds for f in r.failures})
    return (
        f"bench faults — kill -9 one of 3 echo workers under {STREAMS} concurrent streams of {result.tokens} "
        f"tokens ({result.token_delay_ms} ms per token; heartbeats {HEARTBEAT_MS} ms, offline timeout "
        f"{result.offline_timeout_ms} ms) — {result.machine}\n"
        + table(
            [
                "round",
                "completed",
                "detect s",
                "moved",
                "same-wave unmoved p50 s",
                "moved p50 s",
                "added s p50",
                "seam gap p50 s",
            ],
            rows,
        )
        + "\n\ndetect: kill → the controller lists the worker offline; added: a moved stream's duration over the"
        "\nmedian of the first streams the other workers started (the same wave: not queued behind others);"
        "\nseam gap: the longest silence between two tokens a moved stream's client saw."
        + (f"\nfailures: {', '.join(failures)}" if failures else "")
    )
