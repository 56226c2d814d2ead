"""The decode stall of a running stream while another request's long prompt prefills (``bench multiturn`` c).

The mlx engine runs in this process (the command re-executes itself with the workers' BLAS), one engine
per ``prefill_step_size``: a stream decodes alone (the baseline gaps between its tokens), then decodes
again while a long prompt is inserted after its 4th token; the gaps counted are those between the long
prompt's arrival and its first token. mlx-lm's ``BatchGenerator`` runs one decode step and one prefill
chunk per step, so the gap is about one decode step plus one chunk of ``prefill_step_size`` tokens.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from mlxcluster.bench.conversation import gaps_ms, system_prompt
from mlxcluster.bench.stats import percentile
from mlxcluster.bench.versus import token_counter
from mlxcluster.protocol import ChatMessage, InferenceRequest, SamplingParams, Token

RUNNING_PROMPT = "Count from 1 to 300, separated by commas."


class StallRow(msgspec.Struct):
    prefill_step_size: int
    baseline_gap_p50_ms: float
    baseline_gap_max_ms: float
    stall_gap_p50_ms: float
    stall_gap_max_ms: float
    gaps_during_prefill: int
    long_prompt_tokens: int
    long_prompt_ttft_ms: float
    covered: bool = True
    """The running stream outlived the long prompt's prefill (else the stall is understated)."""


def _request(request_id: str, messages: list[ChatMessage], max_tokens: int) -> InferenceRequest:
    return InferenceRequest(
        request_id=request_id,
        model="bench",
        messages=messages,
        sampling=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
    )


async def _stream(engine, request: InferenceRequest, arrivals: list[float], started: asyncio.Event | None) -> None:  # type: ignore[no-untyped-def]
    async for frame in engine.generate(request):
        if isinstance(frame, Token):
            arrivals.append(time.perf_counter())
            if started is not None and len(arrivals) >= 4:
                started.set()


async def measure_step(model_path: str, step: int, long_system: str, running_tokens: int) -> StallRow:
    """Baseline and stalled gaps of one running stream for one ``prefill_step_size``."""
    from mlxcluster.worker.engine import MlxEngine

    engine = MlxEngine(model_path, max_concurrent=4, prefill_step_size=step, prompt_cache_bytes=0)
    await engine.start()
    try:
        running = [ChatMessage(role="user", content=RUNNING_PROMPT)]
        await _stream(engine, _request("warm", running, 4), [], None)
        alone: list[float] = []
        await _stream(engine, _request("alone", running, running_tokens), alone, None)

        stalled: list[float] = []
        fourth = asyncio.Event()
        task = asyncio.create_task(_stream(engine, _request("running", running, running_tokens), stalled, fourth))
        await fourth.wait()
        long = [ChatMessage(role="system", content=long_system), ChatMessage(role="user", content="Hello!")]
        long_arrivals: list[float] = []
        sent = time.perf_counter()
        await _stream(engine, _request("long", long, 2), long_arrivals, None)
        first = long_arrivals[0] if long_arrivals else time.perf_counter()
        await task
    finally:
        await engine.stop()
    # the gaps that end inside the long prompt's prefill (sent .. its first token), plus the one spanning it
    during = [b - a for a, b in zip(stalled, stalled[1:], strict=False) if b > sent and a < first]
    base = gaps_ms(alone[1:])  # the first gap holds the stream's own prefill
    count = token_counter(model_path)
    return StallRow(
        prefill_step_size=step,
        baseline_gap_p50_ms=round(percentile(base, 50), 1),
        baseline_gap_max_ms=round(max(base, default=0.0), 1),
        stall_gap_p50_ms=round(percentile([g * 1000 for g in during], 50), 1),
        stall_gap_max_ms=round(max(during, default=0.0) * 1000, 1),
        gaps_during_prefill=len(during),
        long_prompt_tokens=count(long_system),
        long_prompt_ttft_ms=round((first - sent) * 1000, 1),
        covered=bool(stalled) and stalled[-1] >= first,
    )


async def run_stall(
    model_path: str, *, steps: tuple[int, ...], prompt_tokens: int, running_tokens: int
) -> list[StallRow]:
    long_system = system_prompt(2000, prompt_tokens, token_counter(model_path))
    return [await measure_step(model_path, step, long_system, running_tokens) for step in steps]
