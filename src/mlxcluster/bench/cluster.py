"""``mlxcluster bench cluster``: what the controller + NATS path costs, and what it sustains.

Echo engine (no model; labelled as such). The baseline, in the same run, is a bare aiohttp handler
(:mod:`mlxcluster.bench.bare`) that returns the same OpenAI JSON: the added p50 of a short request
(sequential) and the ratio of short-request throughput (concurrent) are the cluster path's cost. The
load comes from its own process (:mod:`mlxcluster.bench.loadgen`, or wrk), so it never runs on the
controller's loop, and the steps of the two targets alternate, so both see the same machine. Then
requests/s with more worker processes, and streamed tokens/s. Every load loop is bounded by a request
count and a time limit; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec

from mlxcluster.bench.loadgen import LoadPlan, LoadStep, TargetFigures, run_in_subprocess
from mlxcluster.bench.nats import bench_config, free_port
from mlxcluster.bench.procs import BenchCluster, stop_process, wait_http
from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.bench.wrk import run_wrk, wrk_available
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import ChatMessage, InferenceRequest
from mlxcluster.tables import table
from mlxcluster.worker.echo import EchoEngine

SHORT_PROMPT = "ping"
STREAM_PROMPT = " ".join(f"w{i}" for i in range(256))


TARGET_ADDED_P50_MS = 0.6
TARGET_THROUGHPUT_RATIO = 0.6
TARGET_PROCESSES_RATIO = 1.4


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
    """What ``bench cluster`` measured (echo engine), the bare handler beside it."""

    machine: str
    engine: str
    load_generator: str
    server_loop: str
    """The event loop of the controller, the worker and the bare handler (uvloop where installed)."""
    direct_p50_ms: float
    direct_p99_ms: float
    bare_p50_ms: float
    bare_p99_ms: float
    cluster_p50_ms: float
    cluster_p99_ms: float
    added_p50_ms: float
    """Cluster p50 minus the bare handler's p50, sequential short requests."""
    added_p99_ms: float
    bare_nats_p50_ms: float
    """The bare handler making one nats-py request/reply per request (to a bare responder in another process)
    through the same server: HTTP and NATS with none of the cluster's code."""
    bare_nats_p99_ms: float
    bare_requests_per_s: float
    cluster_requests_per_s: float
    """One worker, the same clients as the bare handler's step."""
    throughput_ratio: float
    bare_nats_requests_per_s: float
    bare_nats_ratio: float
    """Its throughput over the bare handler's: the most a controller built on aiohttp + nats-py reaches here."""
    throughput: list[ThroughputRow]
    stream_tokens_per_s: float
    stream_concurrency: int
    quick: bool = False
    load_average: str = ""
    profiled: bool = False
    """The controller and workers ran under cProfile: their figures are the profiler's."""
    processes: int = 1
    """``--processes N``: a controller of N processes (one port) measured beside the one-process controller in
    the throughput step, on the same worker (0 figures below when N is 1)."""
    processes_requests_per_s: float = 0.0
    processes_p50_ms: float = 0.0
    processes_ratio: float = 0.0
    """Its req/s over the one-process controller's, the same step (the issue's target: ≥ 1.4× with 2)."""

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


@dataclass
class BenchSizes:
    """How much ``bench cluster`` sends: ``--quick`` is a smaller instance of the same steps.

    Requests and seconds are per target, shared by its ``rounds`` (each step ends at whichever comes first)."""

    latency_requests: int = 2000
    throughput_requests: int = 200_000
    concurrency: int = 32
    time_limit_s: float = 20.0
    worker_counts: tuple[int, ...] = (1, 2, 4)
    rounds: int = 4
    """Alternating bare/cluster rounds of each step."""
    stream_requests: int = 200
    quick: bool = False

    @classmethod
    def quick_sizes(cls) -> BenchSizes:
        """``--quick``: one worker, shorter steps (well under two minutes)."""
        return cls(
            latency_requests=1000, time_limit_s=12.0, worker_counts=(1,), rounds=3, stream_requests=40, quick=True
        )


def short_answer_template(answer: dict[str, object]) -> dict[str, object]:
    """The cluster's answer to the short request, as the bare handler's template (``id``/``created`` are
    refreshed per request)."""
    return {key: value for key, value in answer.items() if key not in ("id", "created")}


async def fetch_short_answer(base_url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/v1/chat/completions", json=chat_body(SHORT_PROMPT)) as response:
            response.raise_for_status()
            answer: dict[str, object] = await response.json()
            return answer


@contextlib.asynccontextmanager
async def bare_server(template: dict[str, object], nats_url: str | None = None) -> AsyncIterator[str]:
    """The bare handler in its own process (making one NATS round trip per request to the bare responder
    when ``nats_url`` is given); yields its base URL once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxcluster.bench.bare",
            str(port),
            msgspec.json.encode(template).decode(),
            *([nats_url] if nats_url else []),
        ],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{base_url}/v1/chat/completions", process, 30, post=chat_body(SHORT_PROMPT))
        yield base_url
    finally:
        stop_process(process, timeout=10)


@contextlib.contextmanager
def bare_responder(nats_url: str) -> Iterator[None]:
    """The bare NATS responder of the ``bare+nats`` baseline, in its own process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mlxcluster.bench.bare", "respond", nats_url],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield
    finally:
        stop_process(process, timeout=10)


def _port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


def alternating(targets: dict[str, str], *, concurrency: int, requests: int, seconds: float, rounds: int) -> LoadPlan:
    """``rounds`` rounds of one step per target in turn, sharing ``requests`` and ``seconds``."""
    body = msgspec.json.encode(chat_body(SHORT_PROMPT)).decode()
    steps = [
        LoadStep(
            label=label,
            port=_port(url),
            body=body,
            concurrency=concurrency,
            requests=max(1, requests // rounds),
            seconds=seconds / rounds,
        )
        for _ in range(rounds)
        for label, url in targets.items()
    ]
    return LoadPlan(steps=steps)


async def wrk_alternating(
    targets: dict[str, str], *, concurrency: int, seconds: float, rounds: int
) -> dict[str, TargetFigures]:
    """As :func:`alternating`, driven by wrk (time-bound only): p50/p99 are those of the last round."""
    figures = {label: TargetFigures() for label in targets}
    for _ in range(rounds):
        for label, url in targets.items():
            result = await asyncio.to_thread(
                run_wrk,
                f"{url}/v1/chat/completions",
                chat_body(SHORT_PROMPT),
                connections=concurrency,
                seconds=max(1.0, seconds / rounds),
            )
            entry = figures[label]
            entry.ok += result.requests
            entry.errors += result.errors
            entry.seconds += result.seconds
            entry.p50_ms, entry.p99_ms = result.p50_ms, result.p99_ms
    return figures


def _row(workers: int, concurrency: int, figures: TargetFigures) -> ThroughputRow:
    return ThroughputRow(
        workers=workers,
        concurrency=concurrency,
        requests=figures.ok,
        errors=figures.errors,
        seconds=round(figures.seconds, 2),
        requests_per_s=round(figures.requests_per_s, 1),
        p50_ms=round(figures.p50_ms, 2),
        p99_ms=round(figures.p99_ms, 2),
    )


def _load_average() -> str:
    import os

    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


async def run_cluster_bench(
    sizes: BenchSizes | None = None, *, use_wrk: bool = False, profile_dir: Path | None = None, processes: int = 1
) -> ClusterBenchResult:
    """Start nats-server, a controller, echo workers and the bare handler; measure both side by side.

    With ``profile_dir`` the controller and the workers run under cProfile (CPU time) and leave
    ``<name>.prof`` there; the figures of such a run are the profiler's, not the cluster's. With
    ``processes`` > 1 a second controller of that many processes (its own port, the same NATS and workers)
    joins the throughput step as one more alternating target."""
    sizes = sizes or BenchSizes()
    if use_wrk and not wrk_available():
        raise RuntimeError("wrk is not installed (apt-get install wrk), or leave out --wrk")
    load_average = _load_average()
    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    rows: list[ThroughputRow] = []
    cluster = BenchCluster(nats_url=server.url, env={"MLXCLUSTER_WORKER_ENGINE": "echo"}, profile_dir=profile_dir)
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    try:
        cluster.start_controller()
        tier_url = cluster.start_controller(processes, port=free_port()) if processes > 1 else None
        cluster.start_worker("bench-w1")
        await cluster.wait_for_workers(1)
        if tier_url is not None:
            await cluster.wait_for_workers(1, base_url=tier_url)
        template = short_answer_template(await fetch_short_answer(cluster.base_url))
        async with contextlib.AsyncExitStack() as baselines:
            baselines.enter_context(bare_responder(server.url))
            bare_url = await baselines.enter_async_context(bare_server(template))
            floor_url = await baselines.enter_async_context(bare_server(template, server.url))
            targets = {"bare": bare_url, "bare+nats": floor_url, "cluster": cluster.base_url}
            await run_in_subprocess(alternating(targets, concurrency=4, requests=600, seconds=10, rounds=1))
            latency = await run_in_subprocess(
                alternating(
                    targets,
                    concurrency=1,
                    requests=sizes.latency_requests,
                    seconds=min(sizes.time_limit_s, 10),
                    rounds=sizes.rounds,
                )
            )
            tier_label = f"{processes} processes"
            load_targets = targets if tier_url is None else {**targets, tier_label: tier_url}
            if use_wrk:
                load = await wrk_alternating(
                    load_targets, concurrency=sizes.concurrency, seconds=sizes.time_limit_s, rounds=sizes.rounds
                )
            else:
                report = await run_in_subprocess(
                    alternating(
                        load_targets,
                        concurrency=sizes.concurrency,
                        requests=sizes.throughput_requests,
                        seconds=sizes.time_limit_s,
                        rounds=sizes.rounds,
                    )
                )
                load = report.targets
        rows.append(_row(1, sizes.concurrency, load["cluster"]))
        started_workers = 1
        for count in sizes.worker_counts:
            if count <= 1:
                continue
            while started_workers < count:
                started_workers += 1
                cluster.start_worker(f"bench-w{started_workers}")
            await cluster.wait_for_workers(count)
            only = {"cluster": cluster.base_url}
            if use_wrk:
                step = await wrk_alternating(only, concurrency=sizes.concurrency, seconds=sizes.time_limit_s, rounds=1)
            else:
                plan = alternating(
                    only,
                    concurrency=sizes.concurrency,
                    requests=sizes.throughput_requests,
                    seconds=sizes.time_limit_s,
                    rounds=1,
                )
                step = (await run_in_subprocess(plan)).targets
            rows.append(_row(count, sizes.concurrency, step["cluster"]))
        stream_concurrency = 8
        streamed = await run_load(
            cluster.base_url,
            concurrency=stream_concurrency,
            requests=sizes.stream_requests,
            time_limit_s=sizes.time_limit_s,
            body=chat_body(STREAM_PROMPT, stream=True, max_tokens=256),
        )
    finally:
        cluster.stop()
        await server.stop()
    direct = await direct_latencies(sizes.latency_requests)
    bare, floor, through = latency.targets["bare"], latency.targets["bare+nats"], latency.targets["cluster"]
    bare_rps, floor_rps, cluster_rps = (load[k].requests_per_s for k in ("bare", "bare+nats", "cluster"))
    tier = load.get(tier_label) if tier_url is not None else None
    return ClusterBenchResult(
        machine=machine_line(),
        engine="echo (no model)",
        load_generator=(
            "wrk (throughput), own process" if use_wrk else f"python raw HTTP/1.1 ({latency.loop}), own process"
        ),
        server_loop=server_loop_name(),
        direct_p50_ms=round(percentile(direct, 50), 3),
        direct_p99_ms=round(percentile(direct, 99), 3),
        bare_p50_ms=round(bare.p50_ms, 3),
        bare_p99_ms=round(bare.p99_ms, 3),
        cluster_p50_ms=round(through.p50_ms, 3),
        cluster_p99_ms=round(through.p99_ms, 3),
        added_p50_ms=round(through.p50_ms - bare.p50_ms, 3),
        added_p99_ms=round(through.p99_ms - bare.p99_ms, 3),
        bare_nats_p50_ms=round(floor.p50_ms, 3),
        bare_nats_p99_ms=round(floor.p99_ms, 3),
        bare_requests_per_s=round(bare_rps, 1),
        cluster_requests_per_s=round(cluster_rps, 1),
        throughput_ratio=round(cluster_rps / bare_rps, 3) if bare_rps else 0.0,
        bare_nats_requests_per_s=round(floor_rps, 1),
        bare_nats_ratio=round(floor_rps / bare_rps, 3) if bare_rps else 0.0,
        throughput=rows,
        stream_tokens_per_s=round(streamed.tokens / streamed.seconds, 1) if streamed.seconds else 0.0,
        stream_concurrency=stream_concurrency,
        quick=sizes.quick,
        load_average=load_average,
        profiled=profile_dir is not None,
        processes=processes,
        processes_requests_per_s=round(tier.requests_per_s, 1) if tier is not None else 0.0,
        processes_p50_ms=round(tier.p50_ms, 2) if tier is not None else 0.0,
        processes_ratio=round(tier.requests_per_s / cluster_rps, 3) if tier is not None and cluster_rps else 0.0,
    )


def server_loop_name() -> str:
    """The loop that the controller, worker and bare handler run on (what ``fast_loop_factory`` gives)."""
    from mlxcluster.roles import fast_loop_factory

    return "uvloop" if fast_loop_factory() is not None else "asyncio"


def format_table(result: ClusterBenchResult) -> str:
    """The result as text tables, with the issue's targets beside the figures."""
    latency = table(
        ["path (sequential short requests)", "p50 ms", "p99 ms"],
        [
            ["echo engine in-process", f"{result.direct_p50_ms:.3f}", f"{result.direct_p99_ms:.3f}"],
            ["bare aiohttp handler, same JSON", f"{result.bare_p50_ms:.3f}", f"{result.bare_p99_ms:.3f}"],
            [
                "bare handler + one NATS request/reply",
                f"{result.bare_nats_p50_ms:.3f}",
                f"{result.bare_nats_p99_ms:.3f}",
            ],
            ["HTTP → controller → NATS → worker", f"{result.cluster_p50_ms:.3f}", f"{result.cluster_p99_ms:.3f}"],
            [
                f"added by the cluster path (target p50 ≤ {TARGET_ADDED_P50_MS} ms)",
                f"{result.added_p50_ms:.3f}",
                f"{result.added_p99_ms:.3f}",
            ],
            [
                "  of which HTTP + NATS alone (bare + NATS − bare)",
                f"{result.bare_nats_p50_ms - result.bare_p50_ms:.3f}",
                "",
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
    clients = result.throughput[0].concurrency if result.throughput else 0
    ratio = (
        f"short requests, {clients} clients: cluster {result.cluster_requests_per_s:,.0f} req/s, bare handler "
        f"{result.bare_requests_per_s:,.0f} req/s: {result.throughput_ratio:.2f}× "
        f"(target ≥ {TARGET_THROUGHPUT_RATIO}×)\nthe bare handler with one NATS round trip, none of our code: "
        f"{result.bare_nats_requests_per_s:,.0f} req/s: {result.bare_nats_ratio:.2f}×"
    )
    if result.processes > 1:
        ratio += (
            f"\na controller of {result.processes} processes on one port, the same step: "
            f"{result.processes_requests_per_s:,.0f} req/s (p50 {result.processes_p50_ms:.2f} ms): "
            f"{result.processes_ratio:.2f}× one process (target ≥ {TARGET_PROCESSES_RATIO}× with 2)"
        )
    return (
        f"bench cluster{' --quick' if result.quick else ''} — {result.engine} — {result.machine}\n"
        + (
            "(PROFILED: the controller and workers ran under cProfile; these figures are not the cluster's)\n"
            if result.profiled
            else ""
        )
        + f"(servers on {result.server_loop}; load generator: {result.load_generator}; it, nats-server, the "
        f"controller, the workers and the bare handler share these cores; load average "
        f"{result.load_average or '?'} at the start)\n\n"
        f"{latency}\n\n{ratio}\n\nshort requests through one controller:\n{throughput}\n\n"
        f"streamed tokens/s through the cluster ({result.stream_concurrency} streams): "
        f"{result.stream_tokens_per_s:,.0f}"
    )
