"""``mlxcluster bench cluster``: what the controller + NATS path costs, and what it sustains.

Echo engine (no model; labelled as such): added latency of the cluster path over calling the engine
in-process, requests/s through one controller with 1, 2 and 4 worker processes, and streamed tokens/s.
Every load loop is bounded by a request count and a time limit; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import msgspec

from mlxcluster.bench.nats import bench_config
from mlxcluster.bench.procs import BenchCluster
from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.bench.wrk import run_wrk, wrk_available
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import ChatMessage, InferenceRequest
from mlxcluster.tables import table
from mlxcluster.worker.echo import EchoEngine

SHORT_PROMPT = "ping"
STREAM_PROMPT = " ".join(f"w{i}" for i in range(256))


class ThroughputRow(msgspec.Struct):
    workers: int
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float


class ClusterBenchResult(msgspec.Struct):
    """What ``bench cluster`` measured (echo engine)."""

    machine: str
    engine: str
    load_generator: str
    direct_p50_ms: float
    direct_p99_ms: float
    cluster_p50_ms: float
    cluster_p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    throughput: list[ThroughputRow]
    stream_tokens_per_s: float
    stream_concurrency: int

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


@dataclass
class LoadResult:
    latencies_ms: list[float]
    errors: int
    seconds: float
    tokens: int = 0


def chat_body(prompt: str, *, stream: bool = False, max_tokens: int = 16, model: str = "echo") -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def run_load(
    base_url: str,
    *,
    concurrency: int,
    requests: int,
    time_limit_s: float,
    body: dict[str, object] | Callable[[int], dict[str, object]],
) -> LoadResult:
    """``requests`` chat calls from ``concurrency`` clients, stopping early at ``time_limit_s``.

    ``body`` is the request body, or a function of the request's number that builds it."""
    latencies: list[float] = []
    errors = 0
    tokens = 0
    issued = 0
    stop_at = time.monotonic() + time_limit_s
    url = f"{base_url}/v1/chat/completions"
    streaming = bool((body(0) if callable(body) else body).get("stream"))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors, tokens, issued
        while issued < requests and time.monotonic() < stop_at:
            payload = body(issued) if callable(body) else body
            issued += 1
            started = time.perf_counter()
            try:
                async with session.post(url, json=payload) as response:
                    if streaming:
                        async for line in response.content:
                            if line.startswith(b"data: {") and b'"usage"' in line:
                                tokens += msgspec.json.decode(line[6:])["usage"]["completion_tokens"]
                    else:
                        await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, OSError):
                ok = False
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=time_limit_s + 30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return LoadResult(latencies, errors, time.perf_counter() - started, tokens)


@dataclass
class Measurement:
    """One load step, whichever generator drove it."""

    ok: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float


async def measure(
    base_url: str, body: dict[str, object], *, concurrency: int, requests: int, time_limit_s: float, use_wrk: bool
) -> Measurement:
    """Drive ``body`` at ``concurrency`` with wrk (time-bound) or the Python client (count- and time-bound)."""
    if use_wrk:
        url = f"{base_url}/v1/chat/completions"
        result = await asyncio.to_thread(run_wrk, url, body, connections=concurrency, seconds=time_limit_s)
        return Measurement(result.requests, result.errors, result.seconds, result.p50_ms, result.p99_ms)
    load = await run_load(base_url, concurrency=concurrency, requests=requests, time_limit_s=time_limit_s, body=body)
    return Measurement(
        len(load.latencies_ms),
        load.errors,
        load.seconds,
        percentile(load.latencies_ms, 50),
        percentile(load.latencies_ms, 99),
    )


async def direct_latencies(count: int) -> list[float]:
    """The echo engine called in-process: the baseline the cluster path is compared with."""
    engine = EchoEngine()
    request = InferenceRequest(
        request_id="bench", model="echo", messages=[ChatMessage(role="user", content=SHORT_PROMPT)], max_tokens=16
    )
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        async for _frame in engine.generate(request):
            pass
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def run_cluster_bench(
    *,
    latency_requests: int,
    throughput_requests: int,
    concurrency: int,
    time_limit_s: float,
    worker_counts: tuple[int, ...] = (1, 2, 4),
) -> ClusterBenchResult:
    """Start nats-server, a controller and up to max(worker_counts) echo workers; measure."""
    use_wrk = wrk_available()
    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    rows: list[ThroughputRow] = []
    cluster = BenchCluster(nats_url=server.url, env={"MLXCLUSTER_WORKER_ENGINE": "echo"})
    try:
        cluster.start_controller()
        cluster.start_worker("bench-w1")
        await cluster.wait_for_workers(1)
        await run_load(cluster.base_url, concurrency=4, requests=200, time_limit_s=10, body=chat_body(SHORT_PROMPT))
        sequential = await measure(
            cluster.base_url,
            chat_body(SHORT_PROMPT),
            concurrency=1,
            requests=latency_requests,
            time_limit_s=min(time_limit_s, 5),
            use_wrk=use_wrk,
        )
        started_workers = 1
        for count in worker_counts:
            while started_workers < count:
                started_workers += 1
                cluster.start_worker(f"bench-w{started_workers}")
            await cluster.wait_for_workers(count)
            step = await measure(
                cluster.base_url,
                chat_body(SHORT_PROMPT),
                concurrency=concurrency,
                requests=throughput_requests,
                time_limit_s=time_limit_s,
                use_wrk=use_wrk,
            )
            rows.append(
                ThroughputRow(
                    workers=count,
                    concurrency=concurrency,
                    requests=step.ok,
                    errors=step.errors,
                    seconds=round(step.seconds, 2),
                    requests_per_s=round(step.ok / step.seconds, 1),
                    p50_ms=round(step.p50_ms, 2),
                    p99_ms=round(step.p99_ms, 2),
                )
            )
        stream_concurrency = 8
        streamed = await run_load(
            cluster.base_url,
            concurrency=stream_concurrency,
            requests=200,
            time_limit_s=time_limit_s,
            body=chat_body(STREAM_PROMPT, stream=True, max_tokens=256),
        )
    finally:
        cluster.stop()
        await server.stop()
    direct = await direct_latencies(latency_requests)
    return ClusterBenchResult(
        machine=machine_line(),
        engine="echo (no model)",
        load_generator="wrk" if use_wrk else "python aiohttp client",
        direct_p50_ms=round(percentile(direct, 50), 3),
        direct_p99_ms=round(percentile(direct, 99), 3),
        cluster_p50_ms=round(sequential.p50_ms, 3),
        cluster_p99_ms=round(sequential.p99_ms, 3),
        added_p50_ms=round(sequential.p50_ms - percentile(direct, 50), 3),
        added_p99_ms=round(sequential.p99_ms - percentile(direct, 99), 3),
        throughput=rows,
        stream_tokens_per_s=round(streamed.tokens / streamed.seconds, 1),
        stream_concurrency=stream_concurrency,
    )


def format_table(result: ClusterBenchResult) -> str:
    """The result as text tables, with the issue's targets beside the figures."""
    latency = table(
        ["path", "p50 ms", "p99 ms"],
        [
            ["echo engine in-process", f"{result.direct_p50_ms:.3f}", f"{result.direct_p99_ms:.3f}"],
            ["HTTP → controller → NATS → worker", f"{result.cluster_p50_ms:.3f}", f"{result.cluster_p99_ms:.3f}"],
            [
                "added by the cluster path (target p50 ≤ 1 ms)",
                f"{result.added_p50_ms:.3f}",
                f"{result.added_p99_ms:.3f}",
            ],
        ],
    )
    throughput = table(
        ["workers", "clients", "ok", "errors", "req/s", "p50 ms", "p99 ms"],
        [
            [
                str(r.workers),
                str(r.concurrency),
                str(r.requests),
                str(r.errors),
                f"{r.requests_per_s:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
            ]
            for r in result.throughput
        ],
    )
    return (
        f"bench cluster — {result.engine} — {result.machine}\n"
        f"(load generator: {result.load_generator}; it, the controller and the workers share these cores)\n\n"
        f"{latency}\n\nshort requests through one controller (target ≥ 2,000 req/s on 2 cores):\n{throughput}\n\n"
        f"streamed tokens/s through the cluster ({result.stream_concurrency} streams): "
        f"{result.stream_tokens_per_s:,.0f}"
    )
