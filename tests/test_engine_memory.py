"""The mlx engine under a memory budget: requests admitted by their projected KV bytes, on the qwen3 fixture.

A budget with room for two requests' KV runs six at once: all finish with exactly the output of an engine
without a budget, never more than two hold memory at a time, those waiting send Progress frames, one
closed while it waits reserves nothing, and a request that could never fit is refused, naming max_tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from families import FamilyModels

from mlxcluster.protocol import Done, Error, InferenceRequest, Progress, SamplingParams, Token
from mlxcluster.worker.engine import MlxEngine
from mlxcluster.worker.memory_budget import MemoryBudget, Reservation

MAX_TOKENS = 12


def request(n: int, *, max_tokens: int = MAX_TOKENS, **fields: Any) -> InferenceRequest:
    return InferenceRequest(
        request_id=f"r{n}",
        model="qwen3",
        prompt=f"Request number {n} asks about foxes and rivers.",
        sampling=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
        **fields,
    )


async def answer(engine: MlxEngine, req: InferenceRequest) -> tuple[str, Any, int]:
    text: list[str] = []
    last: Any = None
    waits = 0
    async for frame in engine.generate(req):
        if isinstance(frame, Token):
            text.append(frame.text)
        elif isinstance(frame, Progress):
            waits += 1
        else:
            last = frame
    return "".join(text), last, waits


class WatchedBudget(MemoryBudget):
    """A budget that records the most KV bytes it ever had reserved."""

    most_kv = 0

    async def reserve(self, model: str, nbytes: int, **kwargs: Any) -> Reservation:
        reservation = await super().reserve(model, nbytes, **kwargs)
        self.most_kv = max(self.most_kv, self.kv_bytes())
        return reservation


@pytest.fixture
async def engines(family_models: FamilyModels) -> AsyncIterator[tuple[MlxEngine, MlxEngine, WatchedBudget]]:
    path = str(family_models.path("qwen3"))
    plain = MlxEngine(path, max_concurrent=8, prompt_cache_bytes=0)
    await plain.start()
    budget = WatchedBudget(1 << 40)  # sized below, once the model's numbers are known
    budgeted = MlxEngine(path, max_concurrent=8, prompt_cache_bytes=8 << 20, memory_budget=budget, held_progress_s=0.05)
    await budgeted.start()
    yield plain, budgeted, budget
    await plain.stop()
    await budgeted.stop()


async def test_a_budget_for_two_runs_six_requests_two_at_a_time(
    engines: tuple[MlxEngine, MlxEngine, WatchedBudget],
) -> None:
    plain, engine, budget = engines
    one = engine.kv_size.projected(64 + MAX_TOKENS)  # every prompt here is shorter than 64 tokens
    assert one == engine.kv_size.projected(1)  # one 256-token step each
    budget.limit_bytes = engine.weights_bytes + 2 * one + 4096  # next to no room for prompt caches
    budget.add_model(
        engine.model_name,
        engine.weights_bytes,
        cache_bytes=lambda: engine.prompt_cache_nbytes,
        shrink_cache=engine.shrink_prompt_cache,
    )
    expected = await asyncio.gather(*(answer(plain, request(n)) for n in range(6)))
    results = await asyncio.gather(*(answer(engine, request(n)) for n in range(6)))
    for (text, last, _), (want, _, _) in zip(results, expected, strict=True):
        assert isinstance(last, Done), last
        assert text == want
    assert budget.most_kv == 2 * one
    assert sum(waits for _, _, waits in results) > 0  # the others waited, saying so
    assert budget.kv_bytes() == 0
    assert budget.peak_bytes <= budget.limit_bytes
    stats = engine.prompt_cache_stats()
    assert stats is not None and stats.evictions > 0  # shrunk to make room for the next requests

    # closed while it waits: it leaves the queue and holds nothing
    running = [asyncio.create_task(answer(engine, request(n, max_tokens=60))) for n in (7, 8)]
    while budget.kv_bytes() < 2 * one:
        await asyncio.sleep(0.005)
    stream = engine.generate(request(9))
    assert isinstance(await anext(stream), Progress)
    await stream.aclose()
    await asyncio.sleep(0.01)
    assert budget.waiting_bytes() == 0 and budget.kv_bytes() == 2 * one
    await asyncio.gather(*running)
    assert budget.kv_bytes() == 0 and budget.waiting_bytes() == 0

    # could never fit beside the weights: refused, retryable elsewhere
    _, last, _ = await answer(engine, request(10, max_tokens=1000))
    assert isinstance(last, Error), last
    assert (last.code, last.param, last.retryable) == ("exceeds_memory_budget", "max_tokens", True)
    # without max_tokens it gets what the budget leaves instead (here: one 256-token step)
    budget.limit_bytes = engine.weights_bytes + one
    long = msgspec.structs.replace(request(11, max_tokens=40960, max_tokens_auto=True), prompt="fox " * 240)
    _, last, _ = await answer(engine, long)
    assert isinstance(last, Done), last
    assert last.usage.prompt_tokens > 200
    assert 0 < last.usage.completion_tokens <= 256 - last.usage.prompt_tokens
