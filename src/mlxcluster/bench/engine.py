"""``mlxcluster bench engine``: the mlx engine in-process vs the same model behind one worker over NATS.

Both paths run the same prompts with the same seeds, one stream and N concurrent streams; tokens/s is
generated tokens (from the worker's own usage counts) over wall time. The worker is a real subprocess
started like dual mode starts it (OpenBLAS preloaded when present); the in-process engine runs in this
process, which the benchmark re-executes with OpenBLAS preloaded too so both use the same BLAS.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec

from mlxcluster.bench.nats import bench_config
from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.bus import Bus, Signal, StreamInbox
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import (
    ChatMessage,
    Done,
    Error,
    InferenceRequest,
    SamplingParams,
    Token,
)
from mlxcluster.tables import table

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "List ten uses for a paperclip and explain each one.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about a trip to the sea.",
    "Explain why the sky is blue in simple words.",
    "Give advice to someone learning to cook.",
    "Tell a legend about a mountain and a river.",
    "Describe how bread is made, step by step.",
    "Write a poem about a lighthouse keeper.",
]


class EngineRow(msgspec.Struct):
    path: str
    streams: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float


class EngineBenchResult(msgspec.Struct):
    machine: str
    model: str
    details: dict[str, str]
    max_tokens: int
    rows: list[EngineRow]
    worker_vs_inprocess_single: float
    worker_vs_inprocess_concurrent: float
    concurrent_speedup: float

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def make_request(index: int, model: str, max_tokens: int) -> InferenceRequest:
    return InferenceRequest(
        request_id=f"bench-{uuid.uuid4().hex[:12]}",
        model=model,
        messages=[ChatMessage(role="user", content=PROMPTS[index % len(PROMPTS)])],
        sampling=SamplingParams(temperature=0.7),
        seed=1000 + index,
        max_tokens=max_tokens,
    )


async def _in_process(engine, model: str, streams: int, max_tokens: int) -> EngineRow:  # type: ignore[no-untyped-def]
    async def one(index: int) -> tuple[int, float]:
        started = time.perf_counter()
        first = None
        tokens = 0
        async for frame in engine.generate(make_request(index, model, max_tokens)):
            if isinstance(frame, Token) and first is None:
                first = time.perf_counter() - started
            if isinstance(frame, Done):
                tokens = frame.usage.completion_tokens
        return tokens, (first or 0.0) * 1000

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    return _row("engine in-process", streams, results, time.perf_counter() - started)


async def _over_nats(bus: Bus, worker_id: str, model: str, streams: int, max_tokens: int) -> EngineRow:
    inbox = StreamInbox(bus, f"bench-{uuid.uuid4().hex[:8]}")  # answers the worker's liveness probes too
    await inbox.start()

    async def one(index: int) -> tuple[int, float]:
        request = make_request(index, model, max_tokens)
        stream = inbox.open(request.request_id, worker_id)
        started = time.perf_counter()
        first = None
        tokens = 0
        try:
            await bus.publish(bus.subjects.inference(worker_id), request, reply=stream.reply)
            while True:
                frame = await stream.receive(time.monotonic() + 600)
                if frame is Signal.SILENT:
                    raise TimeoutError(f"no frame from {worker_id} within 600s")
                if isinstance(frame, Token) and first is None:
                    first = time.perf_counter() - started
                elif isinstance(frame, Done):
                    tokens = frame.usage.completion_tokens
                    break
                elif isinstance(frame, Error):
                    raise RuntimeError(f"worker error: {frame.code}: {frame.message}")
        finally:
            inbox.discard(stream.key)
        return tokens, (first or 0.0) * 1000

    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(i) for i in range(streams)))
    finally:
        await inbox.close()
    return _row("worker over NATS", streams, results, time.perf_counter() - started)


def _row(path: str, streams: int, results: list[tuple[int, float]], seconds: float) -> EngineRow:
    tokens = sum(t for t, _ in results)
    return EngineRow(
        path=path,
        streams=streams,
        tokens=tokens,
        seconds=round(seconds, 2),
        tokens_per_s=round(tokens / seconds, 1),
        ttft_p50_ms=round(percentile([ms for _, ms in results], 50), 1),
    )


async def run_engine_bench(*, model_path: str, served_name: str, streams: int, max_tokens: int) -> EngineBenchResult:
    """Measure in-process first (nothing else running), then one worker subprocess over NATS."""
    from mlxcluster.bench.procs import BenchCluster
    from mlxcluster.worker.engine import MlxEngine

    engine = MlxEngine(model_path, served_name=served_name, max_concurrent=streams)
    await engine.start()
    try:
        await _in_process(engine, served_name, 1, 8)  # warm-up
        rows = [await _in_process(engine, served_name, n, max_tokens) for n in (1, streams)]
        details = engine.info().details
    finally:
        await engine.stop()

    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    cluster = BenchCluster(
        nats_url=server.url,
        env={"MLXCLUSTER_WORKER_MODEL": model_path, "MLXCLUSTER_WORKER_MAX_CONCURRENT": str(streams)},
    )
    try:
        bus = await Bus.connect(config.nats, name="bench-engine", attempts=5)
        try:
            worker_id = "bench-engine-w1"
            cluster.start_worker(worker_id, cluster_blas_env())
            await _wait_registered(bus, worker_id)
            await _over_nats(bus, worker_id, _served(model_path, served_name), 1, 8)  # warm-up
            for n in (1, streams):
                rows.append(await _over_nats(bus, worker_id, _served(model_path, served_name), n, max_tokens))
        finally:
            await bus.close()
    finally:
        cluster.stop()
        await server.stop()
    single_in, multi_in, single_w, multi_w = rows
    return EngineBenchResult(
        machine=machine_line(),
        model=served_name,
        details=details,
        max_tokens=max_tokens,
        rows=rows,
        worker_vs_inprocess_single=round(single_w.tokens_per_s / single_in.tokens_per_s, 3),
        worker_vs_inprocess_concurrent=round(multi_w.tokens_per_s / multi_in.tokens_per_s, 3),
        concurrent_speedup=round(multi_w.tokens_per_s / single_w.tokens_per_s, 2),
    )


def _served(model_path: str, served_name: str) -> str:
    """The name the worker subprocess serves a model path under (its directory name)."""
    from pathlib import Path

    return Path(model_path).name if Path(model_path).is_dir() else served_name


def cluster_blas_env() -> dict[str, str]:
    """The same OpenBLAS preload that dual mode gives its workers."""
    import os

    from mlxcluster.worker.blas import preload_env

    preload = preload_env(os.environ).get("LD_PRELOAD")
    return {"LD_PRELOAD": preload} if preload else {}


async def _wait_registered(bus: Bus, worker_id: str, timeout: float = 120.0) -> None:
    """Until the worker's first heartbeat arrives (it is serving then)."""
    from nats.aio.msg import Msg

    from mlxcluster.protocol import WorkerHeartbeat

    serving = asyncio.Event()

    async def on_heartbeat(heartbeat: WorkerHeartbeat, _msg: Msg) -> None:
        if heartbeat.worker_id == worker_id:
            serving.set()

    sub = await bus.subscribe(bus.subjects.heartbeat, WorkerHeartbeat, on_heartbeat)
    try:
        await asyncio.wait_for(serving.wait(), timeout)
    except TimeoutError:
        raise TimeoutError(f"worker {worker_id} did not start within {timeout:.0f}s") from None
    finally:
        await sub.unsubscribe()


def format_table(result: EngineBenchResult) -> str:
    rows = [
        [r.path, str(r.streams), str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_s:.1f}", f"{r.ttft_p50_ms:.0f}"]
        for r in result.rows
    ]
    details = ", ".join(f"{k}={result.details.get(k, '?')}" for k in ("weights_dtype", "blas"))
    return (
        f"bench engine — {result.model} ({details}) — {result.machine}\n"
        f"{result.max_tokens} tokens per request at most, temperature 0.7, fixed seeds\n\n"
        + table(["path", "streams", "tokens", "seconds", "tok/s", "TTFT p50 ms"], rows)
        + f"\n\nworker / in-process, 1 stream: {result.worker_vs_inprocess_single:.1%} (target ≥ 95%)"
        + f"\nworker / in-process, concurrent: {result.worker_vs_inprocess_concurrent:.1%}"
        + f"\nconcurrent / single through the worker: {result.concurrent_speedup:.2f}× (target ≥ 3×)"
    )
