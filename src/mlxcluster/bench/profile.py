"""Where the time of N concurrent streams goes (``bench engine --parts profile``; issue 21's item 3).

a) **CPU per streamed token, process by process.** The same N greedy streamed chats through the cluster
   (nats-server, a controller, one mlx worker; speculation off, so both run the same plain batch) and through
   ``mlx_lm.server`` on the same model dir and BLAS, each ``rounds`` times, alternating. CPU seconds (user +
   system, every thread) per process over the rounds, per generated token. CPU time, unlike wall time, hardly
   moves with what else runs on the machine, so the split holds on a busy box; the tokens/s beside it do not.
b) **The generation thread, by where its Python was.** The same chats in this process's engine, its generation
   thread under ``cProfile``; each function's own time is put in one of four places: waiting for the model
   (mlx-lm's ``generate.py``: the ``mx.eval`` / ``async_eval`` / ``.item()`` of its step, where the model
   computes), building the model's graph (``mlx_lm/models``, ``mlx/nn``: Python both servers run every step),
   ours (``mlxcluster``: scheduling, output, frames) and the rest (queues, sockets, the tokenizer). cProfile
   slows Python-heavy code most, so the non-waiting shares are upper bounds.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from mlxcluster.bench.engine import PROMPTS
from mlxcluster.bench.stats import cpu_seconds
from mlxcluster.bench.versus import WARM_UP_PROMPT, mlx_lm_server, stream_round, token_counter
from mlxcluster.tables import table

PLACES = ("waiting for the model", "building the model graph", "mlxcluster", "other")


class ProcessCpu(msgspec.Struct):
    """One process's CPU over the rounds."""

    server: str
    process: str
    cpu_s: float
    ms_per_token: float


class ServerRun(msgspec.Struct):
    """One server's rounds summed."""

    server: str
    tokens: int
    seconds: float
    tokens_per_s: float


class ThreadPlace(msgspec.Struct):
    place: str
    seconds: float
    share: float


class ProfileResult(msgspec.Struct):
    model: str
    streams: int
    max_tokens: int
    rounds: int
    cpu: list[ProcessCpu]
    runs: list[ServerRun]
    thread: list[ThreadPlace]
    thread_tokens: int
    top_ours: list[tuple[str, float]]
    """Our functions with the most own time in the generation thread (name, seconds)."""

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds([pid]) for name, pid in pids.items()}


class _Tally:
    """A server's CPU and tokens over its rounds."""

    def __init__(self, server: str, pids: dict[str, int]) -> None:
        self.server = server
        self.pids = pids
        self.cpu: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.tokens = 0
        self.seconds = 0.0

    async def round(self, base: str, model: str, streams: int, max_tokens: int, count: Callable[[str], int]) -> None:
        before = _cpu_seconds(self.pids)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
        row = await stream_round(base, model, streams, max_tokens, count, prompts)
        after = _cpu_seconds(self.pids)
        for name in self.cpu:
            self.cpu[name] += after.get(name, 0.0) - before.get(name, 0.0)
        self.tokens += row.tokens
        self.seconds += row.seconds


async def measure_cpu(
    model_path: str, streams: int, max_tokens: int, rounds: int
) -> tuple[list[ProcessCpu], list[ServerRun]]:
    """Part a: both servers up at once, taking turns, CPU per process per token."""
    from mlxcluster.bench.versus import mlxcluster_server

    count = token_counter(model_path)
    env = {"MLXCLUSTER_WORKER_SPECULATIVE_TOKENS": "0"}
    theirs_pids: list[int] = []
    async with (
        mlxcluster_server(model_path, max_concurrent=streams, env=env) as cluster,
        mlx_lm_server(model_path, decode_concurrency=streams, pids=theirs_pids) as theirs,
    ):
        ours_pids = {name: process.pid for name, process in zip(cluster.names, cluster.processes, strict=True)}
        if cluster.nats_pid is not None:
            ours_pids["nats-server"] = cluster.nats_pid
        tallies = [_Tally("mlxcluster", ours_pids), _Tally("mlx_lm.server", {"mlx_lm.server": theirs_pids[0]})]
        name = Path(model_path).name
        await stream_round(cluster.base_url, name, 1, 8, count, [WARM_UP_PROMPT])
        await stream_round(theirs, "default_model", 1, 8, count, [WARM_UP_PROMPT])
        targets = [(tallies[0], cluster.base_url, name), (tallies[1], theirs, "default_model")]
        for index in range(rounds):
            for tally, base, model in targets if index % 2 == 0 else reversed(targets):
                await tally.round(base, model, streams, max_tokens, count)
    cpu = [
        ProcessCpu(t.server, process, round(seconds, 2), round(1000 * seconds / max(t.tokens, 1), 3))
        for t in tallies
        for process, seconds in t.cpu.items()
    ]
    runs = [
        ServerRun(t.server, t.tokens, round(t.seconds, 2), round(t.tokens / max(t.seconds, 1e-9), 1)) for t in tallies
    ]
    return cpu, runs


def place_of(filename: str) -> str:
    """Which of :data:`PLACES` a function's own time belongs to, by its file."""
    path = filename.replace("\\", "/")
    if path.endswith("mlx_lm/generate.py"):
        return PLACES[0]
    if "/mlx_lm/models/" in path or "/mlx/nn/" in path:
        return PLACES[1]
    if "/mlxcluster/" in path:
        return PLACES[2]
    return PLACES[3]


async def profile_thread(model_path: str, streams: int, max_tokens: int) -> tuple[list[ThreadPlace], int, list[Any]]:
    """Part b: the in-process engine's generation thread under cProfile, one warm-up round first."""
    from mlxcluster.protocol import ChatMessage, Done, InferenceRequest, SamplingParams
    from mlxcluster.worker import generation_loop
    from mlxcluster.worker.engine import MlxEngine

    profiler = cProfile.Profile()
    profiling = [False]
    original = generation_loop.GenerationLoop.step

    def step(self: generation_loop.GenerationLoop) -> None:
        if not profiling[0]:
            return original(self)
        profiler.enable()
        try:
            return original(self)
        finally:
            profiler.disable()

    engine = MlxEngine(model_path, served_name="profile", max_concurrent=streams, speculative_tokens=0)
    generation_loop.GenerationLoop.step = step  # type: ignore[method-assign]
    try:
        await engine.start()

        async def one(index: int, prompt: str) -> int:
            request = InferenceRequest(
                request_id=f"profile-{index}-{time.monotonic_ns()}",
                model="profile",
                messages=[ChatMessage(role="user", content=prompt)],
                sampling=SamplingParams(temperature=0.0),
                max_tokens=max_tokens,
            )
            tokens = 0
            async for frame in engine.generate(request):
                if isinstance(frame, Done):
                    tokens = frame.usage.completion_tokens
            return tokens

        await one(0, WARM_UP_PROMPT)
        profiling[0] = True
        counts = await asyncio.gather(*(one(i, PROMPTS[i % len(PROMPTS)]) for i in range(streams)))
        profiling[0] = False
    finally:
        generation_loop.GenerationLoop.step = original  # type: ignore[method-assign]
        await engine.stop()
    stats = pstats.Stats(profiler)
    seconds = dict.fromkeys(PLACES, 0.0)
    ours: list[tuple[str, float]] = []
    for (filename, line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        own = float(row[2])
        place = place_of(filename)
        seconds[place] += own
        if place == PLACES[2]:
            ours.append((f"{Path(filename).stem}.{function}:{line}", own))
    total = sum(seconds.values()) or 1.0
    places = [ThreadPlace(place, round(s, 3), round(s / total, 4)) for place, s in seconds.items()]
    ours.sort(key=lambda item: -item[1])
    return places, sum(counts), [(name, round(s, 3)) for name, s in ours[:5]]


async def run_profile(model_path: str, *, streams: int, max_tokens: int, rounds: int = 2) -> ProfileResult:
    cpu, runs = await measure_cpu(model_path, streams, max_tokens, rounds)
    places, tokens, ours = await profile_thread(model_path, streams, max_tokens)
    return ProfileResult(
        model=Path(model_path).name,
        streams=streams,
        max_tokens=max_tokens,
        rounds=rounds,
        cpu=cpu,
        runs=runs,
        thread=places,
        thread_tokens=tokens,
        top_ours=ours,
    )


def format_profile(result: ProfileResult) -> str:
    from mlxcluster.bench.stats import machine_line

    ours_total = sum(c.cpu_s for c in result.cpu if c.server == "mlxcluster")
    lines = [
        f"bench engine --parts profile — {result.model}, {result.streams} concurrent greedy streamed chats, "
        f"max {result.max_tokens} tokens, {result.rounds} round(s) each, alternating — {machine_line()}",
        "",
        "a) CPU per generated token, per process (user + system, all threads)",
        table(
            ["server", "process", "CPU s", "ms / token", "share of the server's CPU"],
            [
                [
                    c.server,
                    c.process,
                    f"{c.cpu_s:.2f}",
                    f"{c.ms_per_token:.2f}",
                    f"{c.cpu_s / ours_total:.1%}" if c.server == "mlxcluster" and ours_total else "100%",
                ]
                for c in result.cpu
            ],
        ),
        table(
            ["server", "tokens", "seconds", "tok/s"],
            [[r.server, str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_s:.1f}"] for r in result.runs],
        ),
        "",
        f"b) the in-process engine's generation thread under cProfile ({result.thread_tokens} tokens)",
        table(
            ["where", "seconds", "share"],
            [[p.place, f"{p.seconds:.2f}", f"{p.share:.1%}"] for p in result.thread],
        ),
        "our functions with the most own time: "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.top_ours),
    ]
    return "\n".join(lines)
