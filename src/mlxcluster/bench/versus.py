"""Side by side with ``mlx_lm.server``: the same model dir, the same prompts, the same concurrency.

Both servers are real subprocesses on 127.0.0.1 with the same BLAS; the client streams greedy chat
completions and counts generated tokens with the model's own tokenizer (so both are counted alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from mlxcluster.bench.engine import PROMPTS, cluster_blas_env
from mlxcluster.bench.nats import bench_config, free_port
from mlxcluster.bench.procs import BenchCluster, stop_process, wait_http
from mlxcluster.bench.stats import percentile
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.tables import table


class VersusRow(msgspec.Struct):
    server: str
    streams: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float


WARM_UP_PROMPT = "Say hello."  # not one of PROMPTS: mlx_lm.server's prompt cache must not start warm


async def stream_round(  # type: ignore[no-untyped-def]
    base_url: str,
    model: str,
    streams: int,
    max_tokens: int,
    count_tokens,
    prompts: list[str] = PROMPTS,
    *,
    stream: bool = True,
) -> VersusRow:
    """``streams`` concurrent greedy chats, streamed (TTFT measured) or not (TTFT is the whole answer's
    latency); aggregate generated tokens/s."""

    async def one(session: aiohttp.ClientSession, index: int) -> tuple[int, float]:
        body = {
            "model": model,
            "stream": stream,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompts[index % len(prompts)]}],
        }
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            if not stream:
                answer = await response.json()
                text = answer["choices"][0]["message"].get("content") or ""
                return count_tokens(text), (time.perf_counter() - started) * 1000
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                text = (choices[0].get("delta") or {}).get("content") if choices else None
                if text:
                    first = first or time.perf_counter() - started
                    parts.append(text)
        return count_tokens("".join(parts)), (first or 0.0) * 1000

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(session, i) for i in range(streams)))
        seconds = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    return VersusRow(
        server="",
        streams=streams,
        tokens=tokens,
        seconds=round(seconds, 2),
        tokens_per_s=round(tokens / seconds, 1),
        ttft_p50_ms=round(percentile([ms for _, ms in results], 50), 1),
    )


async def chat_turn(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> tuple[str, float, int, int]:
    """One streamed greedy turn: (reply, ms to the first token, prompt tokens, cached tokens); ``extra``
    fields go into the body as they are (``chat_template_kwargs``, say)."""
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": max_tokens,
        **(extra or {}),
    }
    started = time.perf_counter()
    first = 0.0
    parts: list[str] = []
    prompt_tokens = cached = 0
    async for chunk in stream_chunks(session, f"{base_url}/v1/chat/completions", body):
        text = chunk_text(chunk)
        if text:
            first = first or time.perf_counter() - started
            parts.append(text)
        usage = chunk.get("usage")
        if usage:
            prompt_tokens = usage.get("prompt_tokens", 0)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
    return "".join(parts), first * 1000, prompt_tokens, cached


async def stream_chunks(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], label: str = ""
) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of one streamed completion (``[DONE]`` and other lines skipped); a status other than 200
    raises, naming ``label``."""
    async with session.post(url, json=body) as response:
        if response.status != 200:
            prefix = f"{label}: " if label else ""
            raise RuntimeError(f"{prefix}HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


def chunk_text(chunk: dict[str, Any]) -> str | None:
    """A chat completion chunk's content delta (None: none)."""
    choices = chunk.get("choices") or []
    return (choices[0].get("delta") or {}).get("content") if choices else None


def fresh_prompts(streams: tuple[int, ...]) -> list[list[str]]:
    """Prompts for each round, none used before in the run, so no server starts with a warm prompt cache."""
    rounds, used = [], 0
    for n in streams:
        rounds.append([PROMPTS[(used + i) % len(PROMPTS)] for i in range(n)])
        used += n
    return rounds


@contextlib.asynccontextmanager
async def mlxcluster_server(
    model_path: str, *, workers: int = 1, max_concurrent: int = 8, env: dict[str, str] | None = None
) -> AsyncIterator[BenchCluster]:
    """nats-server, a controller and ``workers`` mlx workers on ``model_path`` (OpenBLAS preloaded)."""
    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    cluster = BenchCluster(
        nats_url=server.url,
        env={
            "MLXCLUSTER_WORKER_MODEL": model_path,
            "MLXCLUSTER_WORKER_MAX_CONCURRENT": str(max_concurrent),
            **(env or {}),
        },
    )
    cluster.nats_pid = server.pid
    try:
        cluster.start_controller()
        for index in range(workers):
            cluster.start_worker(f"bench-w{index + 1}", cluster_blas_env())
        await cluster.wait_for_workers(workers)
        yield cluster
    finally:
        cluster.stop()
        await server.stop()


@contextlib.asynccontextmanager
async def mlx_lm_server(
    model_path: str, *, decode_concurrency: int, args: tuple[str, ...] = (), pids: list[int] | None = None
) -> AsyncIterator[str]:
    """``mlx_lm.server`` on ``model_path`` with the same BLAS as our workers (its prompt cache on, as by
    default); yields its base URL once it answers (its pid appended to ``pids``)."""
    port = free_port()
    env = {**os.environ, **cluster_blas_env(), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--decode-concurrency",
            str(decode_concurrency),
            *args,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if pids is not None:
        pids.append(process.pid)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(f"{base}/v1/models", process)
        yield base
    finally:
        stop_process(process)


def token_counter(model_path: str) -> Callable[[str], int]:
    """Counts tokens of text with the model's own tokenizer (both servers' output counted alike)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


async def run_versus(
    model_path: str, *, streams: tuple[int, ...], max_tokens: int, stream: bool = True
) -> list[VersusRow]:
    """Measure mlxcluster (controller + one worker) then ``mlx_lm.server`` on the same model dir."""
    count_tokens = token_counter(model_path)
    rows: list[VersusRow] = []
    async with mlxcluster_server(model_path, max_concurrent=max(streams)) as cluster:
        name = Path(model_path).name
        await stream_round(cluster.base_url, name, 1, 8, count_tokens, [WARM_UP_PROMPT])
        for n, prompts in zip(streams, fresh_prompts(streams), strict=True):
            row = await stream_round(cluster.base_url, name, n, max_tokens, count_tokens, prompts, stream=stream)
            rows.append(msgspec.structs.replace(row, server="mlxcluster (controller + 1 worker)"))
    async with mlx_lm_server(model_path, decode_concurrency=max(streams)) as base:
        await stream_round(base, "default_model", 1, 8, count_tokens, [WARM_UP_PROMPT])  # loads the model
        for n, prompts in zip(streams, fresh_prompts(streams), strict=True):
            row = await stream_round(base, "default_model", n, max_tokens, count_tokens, prompts, stream=stream)
            rows.append(msgspec.structs.replace(row, server="mlx_lm.server"))
    return rows


def format_versus(rows: list[VersusRow]) -> str:
    body = [
        [r.server, str(r.streams), str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_s:.1f}", f"{r.ttft_p50_ms:.0f}"]
        for r in rows
    ]
    lines = [table(["server", "streams", "tokens", "seconds", "tok/s", "TTFT p50 ms"], body)]
    ours = {r.streams: r for r in rows if r.server.startswith("mlxcluster")}
    theirs = {r.streams: r for r in rows if r.server == "mlx_lm.server"}
    for n in sorted(ours):
        if n in theirs and theirs[n].tokens_per_s:
            lines.append(
                f"{n} stream(s): mlxcluster / mlx_lm.server tokens/s = "
                f"{ours[n].tokens_per_s / theirs[n].tokens_per_s:.2f}× (target ≥ 1×)"
            )
    return "\n".join(lines)
