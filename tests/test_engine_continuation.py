"""The mlx engine continues an interrupted answer: ``InferenceRequest.continuation`` on the real demo model.

A stream moved to another worker resends the prompt plus the text generated so far. With greedy or
seeded sampling the continuation must be exactly what the first run would have produced after that text.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from mlxcluster.protocol import ChatMessage, Done, InferenceRequest, SamplingParams, Token
from mlxcluster.worker.engine import MlxEngine

pytestmark = pytest.mark.model

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from mlxcluster.models.demo import ensure_demo_model
    from mlxcluster.models.registry import default_models_dir

    return ensure_demo_model(Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir()))


async def frames_of(engine: MlxEngine, request: InferenceRequest) -> tuple[list[Token], Done]:
    frames = [frame async for frame in engine.generate(request)]
    done = frames[-1]
    assert isinstance(done, Done), done
    return [f for f in frames if isinstance(f, Token)], done


def continued(request: InferenceRequest, tokens: list[Token]) -> InferenceRequest:
    """What the dispatcher sends after relaying ``tokens`` (see controller.migration.StreamSoFar)."""
    count = sum(t.count for t in tokens)
    sampling = request.sampling
    if request.seed is not None:
        sampling = msgspec.structs.replace(sampling, seed_offset=count)
    return msgspec.structs.replace(
        request, continuation="".join(t.text for t in tokens), max_tokens=request.max_tokens - count, sampling=sampling
    )


def chat(temperature: float = 0.0, seed: int | None = None) -> InferenceRequest:
    return InferenceRequest(
        request_id="c",
        model="",
        messages=[ChatMessage(role="user", content="Name three colours of the rainbow.")],
        sampling=SamplingParams(temperature=temperature),
        seed=seed,
        max_tokens=MAX_TOKENS,
    )


CASES = {
    "greedy chat": chat(),
    "seeded chat": chat(temperature=0.8, seed=11),
    "greedy text": InferenceRequest(
        request_id="t",
        model="",
        prompt="The three primary colours are",
        sampling=SamplingParams(temperature=0.0),
        max_tokens=MAX_TOKENS,
    ),
}


async def test_a_continuation_goes_on_exactly_where_the_first_run_was(demo_model: Path) -> None:
    engine = MlxEngine(str(demo_model), max_concurrent=2)  # one load for every case
    await engine.start()
    try:
        for case, original in CASES.items():
            await check_continuation(engine, msgspec.structs.replace(original, model=engine.model_name), case)
    finally:
        await engine.stop()


async def check_continuation(engine: MlxEngine, original: InferenceRequest, case: str) -> None:
    tokens, done = await frames_of(engine, original)
    assert done.usage.completion_tokens == MAX_TOKENS, f"{case}: the answer should use the whole budget"
    whole = "".join(t.text for t in tokens)
    cut = len(tokens) // 2
    rest, rest_done = await frames_of(engine, continued(original, tokens[:cut]))
    assert "".join(t.text for t in tokens[:cut]) + "".join(t.text for t in rest) == whole, case
    assert rest_done.finish_reason == done.finish_reason, case
    # usage of the continuation: the original prompt, and only the tokens generated here
    assert rest_done.usage.prompt_tokens == done.usage.prompt_tokens, case
    assert rest_done.usage.completion_tokens == MAX_TOKENS - sum(t.count for t in tokens[:cut]), case
