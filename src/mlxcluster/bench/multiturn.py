"""``mlxcluster bench multiturn``: conversations with a long system prompt, each turn resending the history.

Parts (each a real run on the demo model, greedy, short replies):

- **a** one worker vs ``mlx_lm.server`` (same model dir and BLAS, its prompt cache on): TTFT of turn 1
  and of the later turns of the same conversation;
- **b** two workers, conversations interleaved (each turn sent for every conversation at once, turn
  by turn), per balancer: the later turns' cached-token fraction (from ``usage.cached_tokens``) and
  their TTFT over turn 1's;
- **c** the step budget: a running stream's gaps while a ~2,000-token prompt prefills, and that prompt's TTFT,
  against no budget (:mod:`.stall`; ``bench engine --parts stall`` draws the whole curve);
- **d** no cache help: concurrent distinct non-streamed requests, tokens/s vs ``mlx_lm.server``
  (:func:`mlxcluster.bench.versus.stream_round`);
- **e** the cache's byte bound under load, from the workers' heartbeats (:mod:`.cache_bound`);
- **f** the prompt cache on each model family's fixture vs ``mlx_lm.server`` (:mod:`.family_turns`; needs the
  fixtures built by ``tests/families.py``, see :mod:`.family_dirs`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import msgspec

from mlxcluster.bench.cache_bound import CacheBoundResult, CacheWatch, run_cache_bound
from mlxcluster.bench.conversation import (
    Conversation,
    TurnSample,
    TurnSummary,
    build_conversations,
    summarize,
    turn_major,
)
from mlxcluster.bench.engine import PROMPTS, cluster_blas_env
from mlxcluster.bench.family_dirs import RANDOM_FAMILIES, MissingFamilies, family_dirs
from mlxcluster.bench.family_turns import FamilyCache, run_family_turns
from mlxcluster.bench.nats import bench_config
from mlxcluster.bench.procs import BenchCluster
from mlxcluster.bench.stall import BUDGETS, LONG_PROMPT_TOKENS, StallRow, run_stall
from mlxcluster.bench.stats import machine_line
from mlxcluster.bench.versus import (
    WARM_UP_PROMPT,
    VersusRow,
    chat_turn,
    mlx_lm_server,
    mlxcluster_server,
    stream_round,
    token_counter,
)
from mlxcluster.embedded import EmbeddedNatsServer

PARTS = "abcde"
"""The parts run by default (f needs the family fixtures)."""
OURS = "mlxcluster (controller + 1 worker)"
THEIRS = "mlx_lm.server"
BALANCERS = ("cache_aware", "least_loaded", "round_robin", "prefix_affinity")


class Settings(msgspec.Struct):
    """The workload of one ``bench multiturn`` run."""

    system_tokens: int = 1000
    turns: int = 5
    """Turns of part a's conversation."""
    interleaved_turns: int = 5
    """Turns of part b's conversations."""
    max_tokens: int = 20
    single_conversations: int = 1
    interleaved_conversations: int = 4
    concurrent_requests: int = 8
    concurrent_max_tokens: int = 64
    stall_prompt_tokens: int = LONG_PROMPT_TOKENS
    """Part c's long prompt."""
    stall_budgets: tuple[float, ...] = BUDGETS
    """Part c's ``step_budget_ms`` values (0: no budget)."""

    @classmethod
    def quick(cls) -> Settings:
        from mlxcluster.worker.step_budget import DEFAULT_STEP_BUDGET_MS

        return cls(
            interleaved_turns=3,
            interleaved_conversations=3,
            concurrent_max_tokens=32,
            stall_prompt_tokens=1000,
            stall_budgets=(0.0, DEFAULT_STEP_BUDGET_MS),
        )


class ServerTurns(msgspec.Struct):
    """Part a: one server's conversation(s)."""

    server: str
    summary: TurnSummary
    samples: list[TurnSample]


class BalancerTurns(msgspec.Struct):
    """Part b: two workers under one balancer."""

    balancer: str
    summary: TurnSummary
    samples: list[TurnSample]
    worker_hits: dict[str, int] = {}


async def run_turns(
    base_url: str, model: str, conversations: list[Conversation], turns: int, max_tokens: int, first_turn: int = 1
) -> list[TurnSample]:
    """Turn-major: each round sends the next turn of every conversation at once, then waits for all.
    Turns are numbered from ``first_turn``."""
    samples: list[TurnSample] = []
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for turn, round_ in enumerate(turn_major(conversations, turns), start=first_turn):
            answers = await asyncio.gather(
                *(chat_turn(session, base_url, model, c.request_messages(), max_tokens) for c in round_)
            )
            for conversation, (reply, ttft, prompt, cached) in zip(round_, answers, strict=True):
                conversation.record(reply)
                samples.append(TurnSample(conversation.index, turn, round(ttft, 1), prompt, cached))
    return samples


async def _warm_up(base_url: str, model: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await chat_turn(session, base_url, model, [{"role": "user", "content": WARM_UP_PROMPT}], 4)


async def run_single(model_path: str, settings: Settings) -> list[ServerTurns]:
    """Part a: both servers up at once, the same conversation sent to each turn by turn, alternately
    (ours, then theirs, one request at a time), so load from elsewhere falls on both alike."""
    count = token_counter(model_path)
    n = settings.single_conversations
    name = Path(model_path).name
    async with (
        mlxcluster_server(model_path, max_concurrent=max(n, 4)) as cluster,
        mlx_lm_server(model_path, decode_concurrency=max(n, 4)) as base,
    ):
        targets = [(OURS, cluster.base_url, name), (THEIRS, base, "default_model")]
        conversations = {server: build_conversations(n, settings.system_tokens, count) for server, _, _ in targets}
        samples: dict[str, list[TurnSample]] = {server: [] for server, _, _ in targets}
        for _, url, model in targets:
            await _warm_up(url, model)
        for turn in range(1, settings.turns + 1):
            for server, url, model in targets:
                samples[server] += await run_turns(url, model, conversations[server], 1, settings.max_tokens, turn)
    return [ServerTurns(server, summarize(samples[server]), samples[server]) for server, _, _ in targets]


def available_balancers(wanted: tuple[str, ...] = BALANCERS) -> tuple[list[str], list[str]]:
    """(present, absent) among ``wanted``, from the plugin manager (what ``mlxcluster balancers list`` shows)."""
    from mlxcluster.plugins import collect_balancers, get_plugin_manager

    names = set(collect_balancers(get_plugin_manager()))
    return [b for b in wanted if b in names], [b for b in wanted if b not in names]


async def run_balancers(model_path: str, settings: Settings, balancers: list[str]) -> list[BalancerTurns]:
    """Part b: two workers stay up; per balancer a fresh controller, and fresh conversations (distinct
    system prompts, so nothing cached by an earlier balancer's run helps)."""
    count = token_counter(model_path)
    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    workers = BenchCluster(
        nats_url=server.url,
        env={"MLXCLUSTER_WORKER_MODEL": model_path, "MLXCLUSTER_WORKER_MAX_CONCURRENT": "4"},
    )
    results = []
    first = 0
    try:
        for index in range(2):
            workers.start_worker(f"mt-w{index + 1}", cluster_blas_env())
        async with CacheWatch(config.nats) as watch:
            for balancer in balancers:
                controller = BenchCluster(nats_url=server.url, env={"MLXCLUSTER_LOAD_BALANCING_STRATEGY": balancer})
                try:
                    controller.start_controller()
                    await controller.wait_for_workers(2, timeout=240)
                    name = Path(model_path).name
                    await _warm_up(controller.base_url, name)
                    before = watch.hits()
                    n = settings.interleaved_conversations
                    conversations = build_conversations(n, settings.system_tokens, count, first=first)
                    first += n
                    samples = await run_turns(
                        controller.base_url, name, conversations, settings.interleaved_turns, settings.max_tokens
                    )
                    await watch.settle()
                    hits = {w: watch.hits().get(w, 0) - before.get(w, 0) for w in watch.hits()}
                    results.append(BalancerTurns(balancer, summarize(samples), samples, hits))
                finally:
                    controller.stop()
    finally:
        workers.stop()
        await server.stop()
    return results


async def run_concurrent(model_path: str, settings: Settings) -> list[VersusRow]:
    """Part d: concurrent distinct greedy non-streamed requests. Both servers are up at once and take
    rounds in the order ours, theirs, theirs, ours, each round with prompts never sent before, so load
    from elsewhere falls on both alike; each server's figure sums its two rounds."""
    count = token_counter(model_path)
    n, max_tokens = settings.concurrent_requests, settings.concurrent_max_tokens
    rounds = [[f"Request {r * n + i}: {PROMPTS[i % len(PROMPTS)]}" for i in range(n)] for r in range(2)]
    name = Path(model_path).name
    async with (
        mlxcluster_server(model_path, max_concurrent=n) as cluster,
        mlx_lm_server(model_path, decode_concurrency=n) as base,
    ):
        targets = {OURS: (cluster.base_url, name), THEIRS: (base, "default_model")}
        for url, model in targets.values():
            await _warm_up(url, model)
        measured: dict[str, list[VersusRow]] = {server: [] for server in targets}
        for server, prompts in ((OURS, rounds[0]), (THEIRS, rounds[0]), (THEIRS, rounds[1]), (OURS, rounds[1])):
            url, model = targets[server]
            measured[server].append(await stream_round(url, model, n, max_tokens, count, prompts, stream=False))
    return [_combined(server, rows) for server, rows in measured.items()]


def _combined(server: str, rows: list[VersusRow]) -> VersusRow:
    tokens, seconds = sum(r.tokens for r in rows), sum(r.seconds for r in rows)
    return VersusRow(
        server=server,
        streams=rows[0].streams,
        tokens=tokens,
        seconds=round(seconds, 2),
        tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
        ttft_p50_ms=round(sum(r.ttft_p50_ms for r in rows) / len(rows), 1),
    )


class MultiturnResult(msgspec.Struct):
    """Everything one ``bench multiturn`` run measured (parts not run are empty)."""

    machine: str
    model: str
    quick: bool
    settings: Settings
    parts: str = PARTS
    single: list[ServerTurns] = []
    balancers: list[BalancerTurns] = []
    balancers_absent: list[str] = []
    default_strategy: str = ""
    stall: list[StallRow] = []
    concurrent: list[VersusRow] = []
    cache_bound: CacheBoundResult | None = None
    families: list[FamilyCache] = []
    families_note: str = ""
    """Why part f did not run (its fixtures are not built), when it was asked for."""

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


FAMILY_ORDER = ("gemma3", "qwen3_next", *(f for f in RANDOM_FAMILIES if f not in ("gemma3", "qwen3_next")))
"""Part f's families: the two whose caches cannot be trimmed first."""


async def run_multiturn(
    model_path: str,
    *,
    parts: str = PARTS,
    quick: bool = False,
    families_dir: Path | None = None,
    families: tuple[str, ...] = FAMILY_ORDER,
) -> MultiturnResult:
    """Run the chosen parts in order, each with its own processes."""
    from mlxcluster.config import Config

    settings = Settings.quick() if quick else Settings()
    result = MultiturnResult(
        machine=machine_line(),
        model=Path(model_path).name,
        quick=quick,
        settings=settings,
        parts=parts,
        default_strategy=Config().load_balancing.strategy,
    )
    if "a" in parts:
        result.single = await run_single(model_path, settings)
    if "b" in parts:
        present, result.balancers_absent = available_balancers()
        result.balancers = await run_balancers(model_path, settings, present)
    if "c" in parts:
        result.stall = await run_stall(
            model_path, budgets=settings.stall_budgets, prompt_tokens=settings.stall_prompt_tokens
        )
    if "d" in parts:
        result.concurrent = await run_concurrent(model_path, settings)
    if "e" in parts:
        result.cache_bound = await run_cache_bound(
            model_path,
            requests=4 if quick else 8,
            prompt_tokens=settings.system_tokens // 2,
            limit_bytes=64 << 20,
        )
    if "f" in parts:
        try:
            paths = family_dirs(families_dir, families)
        except MissingFamilies as missing:
            result.families_note = str(missing)
        else:
            result.families = await run_family_turns(
                paths, turns=settings.turns, system_tokens=settings.system_tokens, max_tokens=settings.max_tokens
            )
    return result
