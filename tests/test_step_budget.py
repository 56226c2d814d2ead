"""The step budget: the prefill chunk of each step is sized so running streams keep their pace.

The arithmetic is tested on :class:`StepBudget` alone; the mechanism on the tiny llama through the real
engine with fixed step costs (no timing involved): a recording ``BatchGenerator`` notes, per step, the
``prefill_step_size`` it was given, how many streams it decoded and how far each prompt advanced.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tiny_model import build_tiny_model

from mlxcluster.protocol import Done, Error, InferenceRequest, SamplingParams, Token
from mlxcluster.worker import generation_loop
from mlxcluster.worker.engine import MlxEngine
from mlxcluster.worker.step_budget import StepBudget, StepCosts

FULL = 128
COSTS = StepCosts(decode_ms=10.0, prefill_ms_per_token=5.0)
"""With a 250 ms budget: (250 - 10) / 5 = 48 prompt tokens a step beside the decode step."""
LONG_PROMPT = " ".join(f"w{i * 7919 % 1000}" for i in range(200))


# --- the arithmetic -----------------------------------------------------------------------------


def test_chunk_fits_the_budget_beside_the_decode_step() -> None:
    budget = StepBudget(250.0, FULL, costs=StepCosts(10.0, 5.0))
    assert budget.chunk(decoding=1, prefilling=1) == 48
    assert budget.chunk(decoding=3, prefilling=2) == 24  # shared equally
    assert budget.chunk(decoding=1, prefilling=8) == 16  # 6 each: the floor keeps the prefill going
    assert budget.chunk(decoding=0, prefilling=1) == FULL  # nothing waits: full speed
    assert budget.chunk(decoding=2, prefilling=0) == FULL
    assert StepBudget(10_000.0, FULL, costs=StepCosts(10.0, 5.0)).chunk(1, 1) == FULL  # never over the step
    assert StepBudget(5.0, FULL, costs=StepCosts(10.0, 5.0)).chunk(1, 1) == 16  # decode alone is over
    assert StepBudget(250.0, FULL).chunk(1, 1) == 16  # costs unknown: the floor
    assert StepBudget(0.0, FULL, costs=StepCosts(10.0, 5.0)).chunk(1, 1) == FULL  # no budget


def test_costs_are_learned_from_step_times() -> None:
    budget = StepBudget(250.0, FULL, alpha=0.5)
    budget.observe(50.0, decoding=1, prefill_tokens=100)  # no decode cost to take out yet: no sample
    assert budget.costs == StepCosts()
    budget.observe(20.0, decoding=2, prefill_tokens=0)
    assert budget.costs.decode_ms == 20.0  # the first sample replaces the guess
    budget.observe(30.0, decoding=2, prefill_tokens=0)
    assert budget.costs.decode_ms == 25.0
    budget.observe(125.0, decoding=2, prefill_tokens=20)
    assert budget.costs.prefill_ms_per_token == 5.0
    budget.observe(70.0, decoding=0, prefill_tokens=10)  # an idle prefill: all of it is prefill
    assert budget.costs.prefill_ms_per_token == 6.0
    assert budget.chunk(1, 1) == (250 - 25) // 6
    fixed = StepBudget(250.0, FULL, costs=StepCosts(10.0, 5.0), learn=False)
    fixed.observe(500.0, decoding=1, prefill_tokens=0)
    assert fixed.costs == StepCosts(10.0, 5.0)


# --- the mechanism, on the tiny llama --------------------------------------------------------------


@dataclass
class Step:
    step_size: int
    decoding: int
    advanced: dict[int, int] = field(default_factory=dict)
    """Prompt tokens each prompt (by uid) prefilled in this step."""


def _recording_generator(model: Any, steps: list[Step], **kwargs: Any) -> Any:
    from mlx_lm.generate import BatchGenerator

    class Recording(BatchGenerator):  # type: ignore[misc]
        processed: dict[int, int] = {}

        def next(self) -> Any:
            step = Step(self.prefill_step_size, len(self._generation_batch))
            progressed, responses = super().next()
            for progress in progressed:
                if not progress.end_of_prompt:
                    done = progress.progress[0]
                    step.advanced[progress.uid] = done - self.processed.get(progress.uid, 0)
                    self.processed[progress.uid] = done
            steps.append(step)
            return progressed, responses

    return Recording(model, **kwargs)


class RecordingEngine(MlxEngine):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[Step] = []

    def _new_generator(self) -> Any:
        assert self._loaded is not None
        return _recording_generator(
            self._loaded.model,
            self.steps,
            completion_batch_size=self.max_concurrent,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step_size=self.prefill_step_size,
            stream=self._stream,
        )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def _request(request_id: str, prompt: str, max_tokens: int) -> InferenceRequest:
    return InferenceRequest(
        request_id=request_id,
        model="tiny",
        prompt=prompt,
        sampling=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
    )


async def _collect(engine: MlxEngine, request: InferenceRequest, started: asyncio.Event | None = None) -> list[str]:
    texts: list[str] = []
    async for frame in engine.generate(request):
        if isinstance(frame, Token):
            texts.append(frame.text)  # several tokens when coalesced: compare the joined text
            if started is not None and len(texts) >= 3:
                started.set()
        elif isinstance(frame, Error):
            raise AssertionError(frame)
        else:
            assert not isinstance(frame, Done) or frame.finish_reason == "length"
    return texts


async def _running_then_long(engine: MlxEngine, longs: int) -> tuple[list[str], list[list[str]]]:
    """A stream decodes; after its 3rd token ``longs`` long prompts arrive together."""
    started = asyncio.Event()
    running = asyncio.create_task(_collect(engine, _request("running", "Count to a hundred.", 160), started))
    await started.wait()
    longs_out = await asyncio.gather(
        *(_collect(engine, _request(f"long{i}", f"{i} {LONG_PROMPT}", 4)) for i in range(longs))
    )
    return await running, list(longs_out)


async def _engine(model: Path, budget_ms: float) -> RecordingEngine:
    engine = RecordingEngine(
        str(model),
        max_concurrent=4,
        prefill_step_size=FULL,
        step_budget_ms=budget_ms,
        step_costs=COSTS,
        prompt_cache_bytes=0,
    )
    await engine.start()
    return engine


def _prefill_steps(engine: RecordingEngine, *, decoding: bool) -> list[Step]:
    return [s for s in engine.steps if s.advanced and (s.decoding > 0) == decoding]


async def test_a_long_prompt_beside_a_running_stream_gets_the_budgeted_chunk(tiny_model: Path) -> None:
    engine = await _engine(tiny_model, 250.0)
    try:
        await _running_then_long(engine, 1)
    finally:
        await engine.stop()
    shared = [s for s in _prefill_steps(engine, decoding=True) if len(s.advanced) == 1]
    assert len(shared) >= 4  # the long prompt took several steps beside the stream
    assert {s.step_size for s in shared} == {48}
    advances = [n for s in shared for n in s.advanced.values()]
    assert max(advances) == 48 and advances.count(48) >= len(advances) - 2  # the last chunk(s) may be short


async def test_a_lone_prompt_prefills_at_the_full_step(tiny_model: Path) -> None:
    engine = await _engine(tiny_model, 250.0)
    try:
        await _collect(engine, _request("long", LONG_PROMPT, 4))
    finally:
        await engine.stop()
    alone = _prefill_steps(engine, decoding=False)
    assert alone and {s.step_size for s in alone} == {FULL}
    assert max(n for s in alone for n in s.advanced.values()) == FULL
    assert not _prefill_steps(engine, decoding=True)


async def test_prompts_prefilling_together_advance_equally(tiny_model: Path) -> None:
    engine = await _engine(tiny_model, 250.0)
    try:
        await _running_then_long(engine, 2)
    finally:
        await engine.stop()
    together = [s for s in _prefill_steps(engine, decoding=True) if len(s.advanced) == 2]
    assert len(together) >= 4
    assert {s.step_size for s in together} == {24}
    equal = [s for s in together if len(set(s.advanced.values())) == 1]
    assert len(equal) >= len(together) - 1  # both prompts are about as long: the last chunk may differ


async def test_greedy_output_is_the_same_with_and_without_the_budget(tiny_model: Path) -> None:
    outputs = []
    for budget_ms in (0.0, 250.0):
        engine = await _engine(tiny_model, budget_ms)
        try:
            outputs.append(await _running_then_long(engine, 2))
        finally:
            await engine.stop()
        sizes = {s.step_size for s in _prefill_steps(engine, decoding=True)}
        assert sizes == {FULL} if budget_ms == 0 else sizes <= {24, 48}
    texts = [("".join(running), ["".join(out) for out in longs]) for running, longs in outputs]
    assert texts[0] == texts[1]
    assert len(texts[0][0]) > 100 and all(texts[0][1])


# --- requests arriving together -----------------------------------------------------------------


async def test_requests_arriving_together_prefill_together(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle batch waits for the requests still being prepared: one prefill for all, none cut by the budget
    for a stream that started a moment earlier. (The wait's bound is raised so a slow machine cannot split it.)"""
    monkeypatch.setattr(generation_loop, "BURST_WAIT_S", 60.0)
    engine = await _engine(tiny_model, 250.0)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(_collect(engine, _request(f"r{i}", f"{i} {LONG_PROMPT[:300]}", 6)) for i in range(4))),
            30,
        )
    finally:
        await engine.stop()
    assert not _prefill_steps(engine, decoding=True)  # nobody's prefill was sliced beside a decoding stream
    first = _prefill_steps(engine, decoding=False)[0]
    assert len(first.advanced) == 4


async def test_a_lone_request_and_a_refused_one_do_not_hold_the_batch(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing on its way: no wait. A request refused while being prepared ends the wait for it at once."""
    monkeypatch.setattr(generation_loop, "BURST_WAIT_S", 60.0)
    engine = await _engine(tiny_model, 250.0)
    try:
        await asyncio.wait_for(_collect(engine, _request("lone", "Hello there.", 4)), 30)
        refused = _request("refused", "Hello.", 4)
        refused.sampling.logit_bias = {5: 500.0}
        frames = [f async for f in engine.generate(refused)]
        assert isinstance(frames[-1], Error) and frames[-1].param == "logit_bias"
        ok, bad = await asyncio.wait_for(
            asyncio.gather(_collect(engine, _request("ok", "Hello there.", 4)), _frames(engine, refused)), 30
        )
    finally:
        await engine.stop()
    assert ok and isinstance(bad[-1], Error)
    assert engine.on_the_way == 0


async def test_a_lone_request_waits_for_company_that_arrives_just_after_it(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request sent with the first but reaching the worker after it was prepared (nothing on its way) still
    prefills with it. (The company share is raised so that the wait outlasts any delay; a full batch ends it.)"""
    monkeypatch.setattr(generation_loop, "BURST_WAIT_S", 60.0)
    monkeypatch.setattr(generation_loop, "COMPANY_SHARE", 1000.0)
    engine = RecordingEngine(
        str(tiny_model), max_concurrent=2, prefill_step_size=FULL, step_budget_ms=250.0, step_costs=COSTS
    )
    await engine.start()
    try:
        first = asyncio.create_task(_collect(engine, _request("first", f"1 {LONG_PROMPT[:300]}", 4)))
        loop = engine._loop
        assert loop is not None
        for _ in range(3000):  # the first is on the generation thread, alone, waiting for company
            if loop.waiting and engine.on_the_way == 0:
                break
            await asyncio.sleep(0.01)
        assert loop.waiting and not loop.active
        await asyncio.wait_for(
            asyncio.gather(first, _collect(engine, _request("second", f"2 {LONG_PROMPT[:300]}", 4))), 60
        )
    finally:
        await engine.stop()
    assert len(_prefill_steps(engine, decoding=False)[0].advanced) == 2


def test_the_wait_for_company_is_a_share_of_the_lone_prompts_prefill() -> None:
    """5% of its expected prefill (uncached tokens × measured ms per token), capped; none once others wait
    or are on their way, or before a prefill token's cost is known."""

    class Cache:
        def cached_length(self, tokens: list[int]) -> int:
            return 30 if len(tokens) > 30 else 0

    def job(tokens: int) -> Any:
        return SimpleNamespace(prepared=SimpleNamespace(prompt=list(range(tokens))), generated=[])

    def wait(jobs: list[Any], *, preparing: int = 0, costs: StepCosts = COSTS, cache: Any = None) -> float:
        loop = SimpleNamespace(
            waiting=deque(jobs),
            preparing=lambda: preparing,
            step_budget=StepBudget(250.0, FULL, costs=costs),
            prompt_cache=cache,
        )
        return float(generation_loop.GenerationLoop.company_wait_s(loop))  # type: ignore[arg-type]

    assert wait([job(40)]) == pytest.approx(0.05 * 40 * 5.0 / 1000)  # 10 ms
    assert wait([job(40)], cache=Cache()) == pytest.approx(0.05 * 10 * 5.0 / 1000)  # 30 of them cached
    assert wait([job(100_000)]) == generation_loop.BURST_WAIT_S
    assert wait([job(40), job(40)]) == 0.0  # company already
    assert wait([job(40)], preparing=1) == 0.0  # on its way: the burst wait covers it
    assert wait([job(40)], costs=StepCosts()) == 0.0  # not measured yet


async def _frames(engine: MlxEngine, request: InferenceRequest) -> list[Any]:
    return [frame async for frame in engine.generate(request)]


async def test_prompts_admitted_with_a_stream_are_not_sliced_for_it(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst larger than the prefill batch: the prompts that wait for the first ones to finish prefilling
    arrived with them, so they prefill at the full step beside them; a stream admitted earlier is protected."""
    monkeypatch.setattr(generation_loop, "BURST_WAIT_S", 60.0)
    engine = RecordingEngine(
        str(tiny_model),
        max_concurrent=6,
        prefill_step_size=FULL,
        prefill_batch_size=2,
        step_budget_ms=250.0,
        step_costs=COSTS,
        prompt_cache_bytes=0,
    )
    await engine.start()
    try:
        burst = [_request(f"b{i}", f"{i} {LONG_PROMPT[:600]}", 40) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(_collect(engine, r) for r in burst)), 60)
        beside_burst = [s.step_size for s in _prefill_steps(engine, decoding=True)]
        engine.steps.clear()
        await asyncio.wait_for(_running_then_long(engine, 1), 60)
        beside_earlier = {s.step_size for s in _prefill_steps(engine, decoding=True)}
    finally:
        await engine.stop()
    assert beside_burst and set(beside_burst) == {FULL}  # the second pair beside the first, unsliced
    assert beside_earlier == {48}  # a later arrival beside an earlier stream: the budget's chunk
