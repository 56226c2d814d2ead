"""The step budget's curve: a running stream's inter-token gaps while a long prompt prefills, and that prompt's
TTFT, per ``step_budget_ms`` (``bench engine --parts stall``; ``bench multiturn`` part c).

The mlx engine runs in this process (the command re-executes itself with the workers' BLAS), one engine per
budget, its prompt cache and speculative decoding off (drafts would turn a stream's gaps into bursts of several
tokens a step; the budget sizes the step). In each engine: a stream decodes alone (the baseline gaps between its
tokens); it decodes again and, after its 4th token, a ~2,000-token prompt arrives; the gaps counted are those
between that prompt's arrival and its first token (the one spanning its first token included). The stream
cannot end on its own (its end-of-sequence tokens are biased away) and is cancelled two tokens after the long
prompt's first, so it covers the whole prefill. Last, the same long prompt alone on the idle engine: its TTFT
there is what the budget's TTFT is compared with.

Budget 0 is the engine before the budget: every step prefills ``prefill_step_size`` (256) tokens whatever
decodes. Ratios are stated against the stream's own gap alone (its p50), so rows compare across budgets and
runs; the targets are issue 21's: gap p50 ≤ 3×, max ≤ 5×, TTFT ≤ 1.5× idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import msgspec

from mlxcluster.bench.conversation import gaps_ms, system_prompt
from mlxcluster.bench.stats import percentile
from mlxcluster.bench.versus import token_counter
from mlxcluster.protocol import ChatMessage, Error, InferenceRequest, SamplingParams, Token
from mlxcluster.tables import table

RUNNING_PROMPT = "Count from 1 to 300, separated by commas."
LONG_PROMPT_TOKENS = 2000
BUDGETS = (0.0, 150.0, 250.0, 400.0)
"""``bench multiturn`` part c's budgets (0: none, the engine before the step budget)."""
CURVE_BUDGETS = (0.0, 150.0, 250.0, 400.0, 600.0, 800.0)
"""``bench engine --parts stall``'s budgets."""
PREFILL_STEP_SIZE = 256
ALONE_TOKENS = 48
RUNNING_MAX_TOKENS = 4000
"""The running stream's cap (at most the room its context window leaves); it is cancelled long before."""
GAP_P50_TARGET = 3.0
GAP_MAX_TARGET = 5.0
TTFT_TARGET = 1.5


class StallRow(msgspec.Struct):
    """One budget's figures (times in ms; ratios against the stream's gap p50 alone and the idle TTFT)."""

    step_budget_ms: float
    prefill_step_size: int
    long_prompt_tokens: int
    baseline_gap_p50_ms: float
    baseline_gap_max_ms: float
    stall_gap_p50_ms: float
    stall_gap_max_ms: float
    gaps_during_prefill: int
    prompt_tokens_per_gap: float
    """The long prompt's tokens over those gaps: about the chunk each step prefilled."""
    long_prompt_ttft_ms: float
    """The long prompt's TTFT while the stream decodes."""
    idle_ttft_ms: float
    """The same prompt's TTFT on the same engine with nothing else running."""
    gap_p50_ratio: float
    gap_max_ratio: float
    ttft_ratio: float
    covered: bool = True
    """The running stream outlived the long prompt's prefill (else the stall is understated)."""

    @property
    def meets_target(self) -> bool:
        return (
            self.covered
            and 0 < self.gap_p50_ratio <= GAP_P50_TARGET
            and 0 < self.gap_max_ratio <= GAP_MAX_TARGET
            and 0 < self.ttft_ratio <= TTFT_TARGET
        )


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b > 0 else 0.0


def stall_row(
    *,
    step_budget_ms: float,
    prefill_step_size: int,
    long_prompt_tokens: int,
    alone: list[float],
    stalled: list[float],
    sent: float,
    first: float,
    idle_ttft_ms: float,
) -> StallRow:
    """The row from token arrival times (``perf_counter`` seconds): ``alone`` and ``stalled`` are the running
    stream's, ``sent`` when the long prompt was sent, ``first`` when its first token came."""
    base = gaps_ms(alone[1:])  # the first gap holds the stream's own prefill
    # the gaps that end inside the long prompt's prefill (sent .. its first token), plus the one spanning it
    during = [(b - a) * 1000 for a, b in zip(stalled, stalled[1:], strict=False) if b > sent and a < first]
    base_p50 = percentile(base, 50)
    stall_p50, stall_max = percentile(during, 50), max(during, default=0.0)
    ttft_ms = (first - sent) * 1000
    return StallRow(
        step_budget_ms=step_budget_ms,
        prefill_step_size=prefill_step_size,
        long_prompt_tokens=long_prompt_tokens,
        baseline_gap_p50_ms=round(base_p50, 1),
        baseline_gap_max_ms=round(max(base, default=0.0), 1),
        stall_gap_p50_ms=round(stall_p50, 1),
        stall_gap_max_ms=round(stall_max, 1),
        gaps_during_prefill=len(during),
        prompt_tokens_per_gap=round(long_prompt_tokens / len(during), 1) if during else 0.0,
        long_prompt_ttft_ms=round(ttft_ms, 1),
        idle_ttft_ms=round(idle_ttft_ms, 1),
        gap_p50_ratio=_ratio(stall_p50, base_p50),
        gap_max_ratio=_ratio(stall_max, base_p50),
        ttft_ratio=_ratio(ttft_ms, idle_ttft_ms),
        covered=bool(stalled) and stalled[-1] >= first,
    )


def end_of_sequence_ids(model_path: str) -> list[int]:
    """The model's end-of-sequence token ids (``config.json``'s and the tokenizer's), to bias away."""
    from tokenizers import Tokenizer

    path = Path(model_path)
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = path / name
        if file.is_file():
            found: Any = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
            ids.update(found if isinstance(found, list) else [] if found is None else [found])
    config = path / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        token = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(eos) if isinstance(eos, str) else None
        if token is not None:
            ids.add(token)
    return sorted(int(i) for i in ids)


def _request(
    request_id: str, messages: list[ChatMessage], max_tokens: int, banned: list[int] | None = None
) -> InferenceRequest:
    return InferenceRequest(
        request_id=request_id,
        model="bench",
        messages=messages,
        sampling=SamplingParams(temperature=0.0, logit_bias={i: -100.0 for i in banned} if banned else None),
        max_tokens=max_tokens,
        max_tokens_auto=banned is not None,  # the running stream: at most the room its window leaves
    )


async def _stream(
    engine: Any,
    request: InferenceRequest,
    arrivals: list[float],
    *,
    started: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Record each token's arrival; end two tokens after ``stop`` is set (closing the stream cancels it)."""
    after_stop = 0
    async with contextlib.aclosing(engine.generate(request)) as frames:
        async for frame in frames:
            if isinstance(frame, Error):
                raise RuntimeError(f"{request.request_id}: {frame.code}: {frame.message}")
            if not isinstance(frame, Token):
                continue
            arrivals.append(time.perf_counter())
            if started is not None and len(arrivals) >= 4:
                started.set()
            if stop is not None and stop.is_set():
                after_stop += 1
                if after_stop >= 2:
                    return


async def _long_ttft(engine: Any, messages: list[ChatMessage], request_id: str) -> tuple[float, float]:
    """(sent, first token) of the long prompt, one token asked."""
    arrivals: list[float] = []
    sent = time.perf_counter()
    await _stream(engine, _request(request_id, messages, 1), arrivals)
    if not arrivals:
        raise RuntimeError(f"{request_id}: the long prompt produced no token")
    return sent, arrivals[0]


async def measure_budget(
    model_path: str, budget_ms: float, long_system: str, *, prefill_step_size: int = PREFILL_STEP_SIZE
) -> StallRow:
    """One engine with ``step_budget_ms = budget_ms``: the stream alone, the stream with the long prompt, the
    long prompt alone on the idle engine."""
    from mlxcluster.worker.engine import MlxEngine

    banned = end_of_sequence_ids(model_path)
    engine = MlxEngine(
        model_path,
        max_concurrent=4,
        prefill_step_size=prefill_step_size,
        step_budget_ms=budget_ms,
        prompt_cache_bytes=0,
        speculative_tokens=0,  # drafts change the tokens a step yields, not the step: the budget alone here
    )
    await engine.start()
    try:
        running = [ChatMessage(role="user", content=RUNNING_PROMPT)]
        long = [ChatMessage(role="system", content=long_system), ChatMessage(role="user", content="Hello!")]
        await _stream(engine, _request("warm", running, 4), [])
        alone: list[float] = []
        await _stream(engine, _request("alone", running, ALONE_TOKENS, banned), alone)

        stalled: list[float] = []
        fourth, stop = asyncio.Event(), asyncio.Event()
        request = _request("running", running, RUNNING_MAX_TOKENS, banned)
        task = asyncio.create_task(_stream(engine, request, stalled, started=fourth, stop=stop))
        waiter = asyncio.create_task(fourth.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():  # it ended (or failed) before its 4th token
            task.result()
        try:
            sent, first = await _long_ttft(engine, long, "long")
        finally:
            stop.set()
            await task
        idle_sent, idle_first = await _long_ttft(engine, long, "long-idle")
    finally:
        await engine.stop()
    return stall_row(
        step_budget_ms=budget_ms,
        prefill_step_size=prefill_step_size,
        long_prompt_tokens=token_counter(model_path)(long_system),
        alone=alone,
        stalled=stalled,
        sent=sent,
        first=first,
        idle_ttft_ms=(idle_first - idle_sent) * 1000,
    )


async def run_stall(
    model_path: str, *, budgets: tuple[float, ...] = BUDGETS, prompt_tokens: int = LONG_PROMPT_TOKENS
) -> list[StallRow]:
    """One row per budget, in order, each on its own engine."""
    long_system = system_prompt(2000, prompt_tokens, token_counter(model_path))
    return [await measure_budget(model_path, budget, long_system) for budget in budgets]


def _budget(row: StallRow) -> str:
    if row.step_budget_ms <= 0:
        return f"none ({row.prefill_step_size}/step)"
    return f"{row.step_budget_ms:g}"


def format_stall(rows: list[StallRow], default_budget_ms: float | None = None) -> list[str]:
    """The curve: one line per budget, then the targets and which budgets meet them."""
    if not rows:
        return []
    table_rows = [
        [
            _budget(r),
            f"{r.baseline_gap_p50_ms:.0f} / {r.baseline_gap_max_ms:.0f}",
            f"{r.stall_gap_p50_ms:.0f} / {r.stall_gap_max_ms:.0f}",
            str(r.gaps_during_prefill),
            f"{r.prompt_tokens_per_gap:.0f}",
            f"{r.gap_p50_ratio:.1f}×",
            f"{r.gap_max_ratio:.1f}×",
            f"{r.long_prompt_ttft_ms:.0f} / {r.idle_ttft_ms:.0f}",
            f"{r.ttft_ratio:.2f}×",
            ("met" if r.meets_target else "NOT met") + ("" if r.covered else " (stream ended first)"),
        ]
        for r in rows
    ]
    headers = [
        "step_budget_ms",
        "gap alone p50/max ms",
        f"gap during {rows[0].long_prompt_tokens}-tok prefill p50/max ms",
        "gaps",
        "prompt tok/gap",
        "p50 / alone p50",
        "max / alone p50",
        "TTFT ms / idle",
        "TTFT / idle",
        "target",
    ]
    lines = [
        table(headers, table_rows),
        f"targets: gap p50 ≤ {GAP_P50_TARGET:g}× and max ≤ {GAP_MAX_TARGET:g}× the stream's gap p50 alone, "
        f"long prompt TTFT ≤ {TTFT_TARGET:g}× its TTFT on the idle engine",
    ]
    meeting = [_budget(r) for r in rows if r.meets_target]
    lines.append("budgets meeting all three: " + (", ".join(meeting) if meeting else "none"))
    if default_budget_ms is not None:
        default = next((r for r in rows if r.step_budget_ms == default_budget_ms), None)
        if default is not None:
            verdict = "met" if default.meets_target else "NOT met"
            lines.append(f"default step_budget_ms = {default_budget_ms:g}: {verdict}")
    return lines


class StallCurve(msgspec.Struct):
    """``bench engine --parts stall``: the curve on one model, with the machine it ran on."""

    machine: str
    model: str
    default_budget_ms: float
    rows: list[StallRow]

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


async def run_curve(
    model_path: str, *, budgets: tuple[float, ...] = CURVE_BUDGETS, prompt_tokens: int = LONG_PROMPT_TOKENS
) -> StallCurve:
    from mlxcluster.bench.stats import machine_line
    from mlxcluster.worker.step_budget import DEFAULT_STEP_BUDGET_MS

    rows = await run_stall(model_path, budgets=budgets, prompt_tokens=prompt_tokens)
    return StallCurve(machine_line(), Path(model_path).name, DEFAULT_STEP_BUDGET_MS, rows)


def format_curve(curve: StallCurve) -> str:
    head = [
        f"bench engine --parts stall — {curve.model}, in-process engine, greedy — {curve.machine}",
        "one stream decoding alone, then again while a long prompt prefills (sent after its 4th token), then the "
        "long prompt alone on the idle engine; one engine per step_budget_ms, prompt cache off",
        "",
    ]
    return "\n".join(head + format_stall(curve.rows, curve.default_budget_ms))
