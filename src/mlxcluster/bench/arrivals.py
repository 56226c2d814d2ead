"""``mlxcluster bench arrivals``: the decode stall that arriving requests cause the streams already running.

The mlx engine runs in this process on the ``qwen3_demo`` fixture (the demo model's real weights behind the
Qwen3 template, which renders tools). ``streams`` greedy streams decode ``stream_tokens`` tokens each (their end
tokens banned with ``logit_bias``, so every stream runs its full length) while, one after another, requests
arrive whose prompt is a long tool list (~2,000 tokens) already in the prompt cache, each forcing a call of a
tool not forced before (a grammar not compiled yet). The running streams' inter-token gaps are measured with
and without arrivals, and with short arrivals (a one-line prompt, no tools, no grammar) as a control; the
modes alternate over ``rounds`` so a drifting machine load falls on all of them. The figure the issue sets a
target for is the p99 gap with long arrivals over the p99 gap without arrivals.

Only :class:`~mlxcluster.worker.engine.MlxEngine`'s public API is used (constructor, ``start``, ``generate``,
``stop``) and, at import time, nothing newer than the protocol's reasoning fields, so the same code measures
an older engine: load this file with that engine's source first on ``PYTHONPATH`` (docs/BENCHMARKS.md's notes
show the command).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.protocol import ChatMessage, Done, Error, InferenceRequest, SamplingParams, Token, ToolSpec
from mlxcluster.tables import table

MODES = ("none", "long", "short")
MODE_LABELS = {
    "none": "no arrivals",
    "long": "long arrivals (cached tool list, new forced tool)",
    "short": "short arrivals (one line, no tools) [control]",
}
THINKING_OFF = {"enable_thinking": False}
ARCHIVIST = "You are an archivist. Use the tools to look records up."
RUNNING_PROMPT = "Story {index}: write a long story about a lighthouse keeper and the ships she guides."
SHORT_PROMPT = "Arrival {index}: name a colour."


class ArrivalSettings(msgspec.Struct):
    """The workload of one run."""

    streams: int = 8
    stream_tokens: int = 96
    tools: int = 15
    """Tools in the arrivals' prompt (15 render to ~2,100 tokens on the demo tokenizer)."""
    arrival_tokens: int = 8
    """Tokens each arrival generates at most (its forced call is cut there: the arrival's own answer is not
    what is measured)."""
    max_arrivals: int = 7
    """Arrivals per round at most (``tools`` / ``rounds``: no forced tool repeats in a run)."""
    pause_s: float = 0.5
    """Between one arrival's end and the next one's start."""
    rounds: int = 2

    @classmethod
    def quick(cls) -> ArrivalSettings:
        return cls(stream_tokens=48, max_arrivals=3, rounds=1)


class ModeRow(msgspec.Struct):
    """The running streams' gaps in one mode, over all rounds."""

    mode: str
    gaps: int
    gap_p50_ms: float
    gap_p90_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    arrivals: int = 0
    arrival_prompt_tokens: int = 0
    """Prompt tokens of one arrival (the first's)."""
    arrival_cached_share: float = 0.0
    """Cached prompt tokens / prompt tokens over the arrivals."""
    arrival_latency_p50_ms: float = 0.0
    arrival_errors: list[str] = []
    during_gaps: int = 0
    """Gaps that overlap an arrival's time in the engine."""
    during_p50_ms: float = 0.0
    stream_tokens: int = 0
    """Tokens the running streams produced (streams x stream_tokens when none ended early)."""


class ArrivalsResult(msgspec.Struct):
    machine: str
    model: str
    engine: str
    """Where the engine's code came from (its module's path), so a run on another checkout says so."""
    settings: ArrivalSettings
    rows: list[ModeRow]
    p99_ratio: float
    """p99 gap with long arrivals / p99 gap with none (target ≤ 1.25)."""
    p50_ratio: float
    control_p99_ratio: float
    """p99 gap with short arrivals / p99 gap with none."""

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def archive_tools(count: int) -> list[ToolSpec]:
    """``count`` different tools with bounded arguments (a few typed, described properties each)."""
    return [
        ToolSpec(
            name=f"tool_{i}",
            description=f"Look up records of kind {i} in the archive and return the matching entries with dates.",
            parameters={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 16, "description": "What to look for"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 10 + i},
                    "unit": {"enum": ["metric", "imperial"]},
                },
                "required": ["query", "limit"],
                "additionalProperties": False,
            },
        )
        for i in range(count)
    ]


def end_token_ids(model_path: str) -> list[int]:
    """The model's end-of-sequence ids (config.json's ``eos_token_id`` and the tokenizer's ``eos_token``)."""
    root = Path(model_path)
    config = json.loads((root / "config.json").read_text())
    eos = config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    token = json.loads((root / "tokenizer_config.json").read_text()).get("eos_token")
    added = json.loads((root / "tokenizer.json").read_text()).get("added_tokens", [])
    ids.update(entry["id"] for entry in added if entry.get("content") == token)
    return sorted(ids)


def running_request(index: int, tokens: int, banned: Sequence[int]) -> InferenceRequest:
    return InferenceRequest(
        request_id=f"running-{index}",
        model="bench",
        messages=[ChatMessage(role="user", content=RUNNING_PROMPT.format(index=index))],
        sampling=SamplingParams(temperature=0.0, logit_bias={token: -100.0 for token in banned}),
        max_tokens=tokens,
        chat_template_kwargs=THINKING_OFF,
    )


def long_arrival(index: int, tools: list[ToolSpec], tokens: int, choice: str) -> InferenceRequest:
    """The long prompt; ``choice`` is ``auto`` (no grammar), ``required`` or the name of the tool to call."""
    named = choice not in ("auto", "required")
    return InferenceRequest(
        request_id=f"long-{index}",
        model="bench",
        messages=[ChatMessage(role="system", content=ARCHIVIST), ChatMessage(role="user", content="Find the rivers.")],
        sampling=SamplingParams(temperature=0.0),
        max_tokens=tokens,
        tools=tools,
        tool_choice="function" if named else choice,  # type: ignore[arg-type]
        tool_name=choice if named else None,
        parallel_tool_calls=False,
        chat_template_kwargs=THINKING_OFF,
    )


def short_arrival(index: int, tokens: int) -> InferenceRequest:
    return InferenceRequest(
        request_id=f"short-{index}",
        model="bench",
        messages=[ChatMessage(role="user", content=SHORT_PROMPT.format(index=index))],
        sampling=SamplingParams(temperature=0.0),
        max_tokens=tokens,
        chat_template_kwargs=THINKING_OFF,
    )


async def _stream(engine: Any, request: InferenceRequest, arrivals: list[float]) -> Any:
    """Run one request; the time of each Token frame goes to ``arrivals``; returns its last frame."""
    last: Any = None
    async for frame in engine.generate(request):
        if isinstance(frame, Token):
            arrivals.extend([time.perf_counter()] * max(1, frame.count))
        elif isinstance(frame, Done | Error):
            last = frame
    return last


class _Measured(msgspec.Struct):
    gaps: list[float]
    stream_tokens: int
    during: list[float]
    """The gaps that overlap an arrival's time in the engine (sent to last frame)."""
    arrivals: list[tuple[int, int, float]]
    """(prompt tokens, cached tokens, ms) of each arrival that ended with Done."""
    errors: list[str]


async def _round(
    engine: Any, mode: str, settings: ArrivalSettings, tools: list[ToolSpec], banned: list[int], next_tool: list[int]
) -> _Measured:
    """One round of one mode: the running streams, and arrivals one after another while they decode."""
    times: list[list[float]] = [[] for _ in range(settings.streams)]
    running = [
        asyncio.create_task(_stream(engine, running_request(i, settings.stream_tokens, banned), times[i]))
        for i in range(settings.streams)
    ]
    while min(len(t) for t in times) < 2 and not all(task.done() for task in running):
        await asyncio.sleep(0.01)
    arrivals: list[tuple[int, int, float]] = []
    windows: list[tuple[float, float]] = []
    errors: list[str] = []
    sent = 0
    while mode != "none" and sent < settings.max_arrivals and not all(task.done() for task in running):
        if mode == "long":
            request = long_arrival(next_tool[0], tools, settings.arrival_tokens, f"tool_{next_tool[0]}")
            next_tool[0] = (next_tool[0] + 1) % len(tools)
        else:
            request = short_arrival(sent, settings.arrival_tokens)
        started = time.perf_counter()
        last = await _stream(engine, request, [])
        windows.append((started, time.perf_counter()))
        sent += 1
        if isinstance(last, Done):
            took_ms = (time.perf_counter() - started) * 1000
            arrivals.append((last.usage.prompt_tokens, last.usage.cached_tokens, took_ms))
        else:
            errors.append(f"{getattr(last, 'code', 'no end')}: {getattr(last, 'message', '')}"[:200])
        await asyncio.sleep(settings.pause_s)
    await asyncio.gather(*running)
    pairs = [(a, b) for stream in times for a, b in zip(stream[1:], stream[2:], strict=False)]
    during = [(b - a) * 1000 for a, b in pairs if any(a < end and b > start for start, end in windows)]
    return _Measured([(b - a) * 1000 for a, b in pairs], sum(len(t) for t in times), during, arrivals, errors)


def _row(mode: str, measured: list[_Measured]) -> ModeRow:
    gaps = [g for m in measured for g in m.gaps]
    during = [g for m in measured for g in m.during]
    arrivals = [a for m in measured for a in m.arrivals]
    prompt = sum(a[0] for a in arrivals)
    return ModeRow(
        mode=mode,
        gaps=len(gaps),
        gap_p50_ms=round(percentile(gaps, 50), 1),
        gap_p90_ms=round(percentile(gaps, 90), 1),
        gap_p99_ms=round(percentile(gaps, 99), 1),
        gap_max_ms=round(max(gaps, default=0.0), 1),
        arrivals=len(arrivals) + sum(len(m.errors) for m in measured),
        arrival_prompt_tokens=arrivals[0][0] if arrivals else 0,
        arrival_cached_share=round(sum(a[1] for a in arrivals) / prompt, 3) if prompt else 0.0,
        arrival_latency_p50_ms=round(percentile([a[2] for a in arrivals], 50), 1),
        arrival_errors=[e for m in measured for e in m.errors],
        during_gaps=len(during),
        during_p50_ms=round(percentile(during, 50), 1),
        stream_tokens=sum(m.stream_tokens for m in measured),
    )


async def run_arrivals(model_path: str, settings: ArrivalSettings | None = None) -> ArrivalsResult:
    """Warm the engine and the prompt cache, then alternate the modes over ``settings.rounds`` rounds."""
    from mlxcluster.worker import engine as engine_module
    from mlxcluster.worker.engine import MlxEngine

    settings = settings or ArrivalSettings()
    tools = archive_tools(settings.tools)
    banned = end_token_ids(model_path)
    engine = MlxEngine(model_path, max_concurrent=settings.streams + 2, prompt_cache_bytes=1 << 30)
    await engine.start()
    measured: dict[str, list[_Measured]] = {mode: [] for mode in MODES}
    try:
        await _stream(engine, running_request(-1, 4, banned), [])  # warm-up
        await _stream(engine, short_arrival(-1, 2), [])
        await _stream(engine, long_arrival(-1, tools, 1, "auto"), [])  # the tool list into the prompt cache
        await _stream(engine, long_arrival(-2, tools, 1, "required"), [])  # the grammar engine's one-time set-up
        next_tool = [0]
        for index in range(settings.rounds):
            order = MODES if index % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                measured[mode].append(await _round(engine, mode, settings, tools, banned, next_tool))
    finally:
        await engine.stop()
    rows = [_row(mode, measured[mode]) for mode in MODES]
    by = {row.mode: row for row in rows}
    base = by["none"]
    return ArrivalsResult(
        machine=machine_line(),
        model=Path(model_path).name,
        engine=str(Path(engine_module.__file__ or "?").parent.parent),
        settings=settings,
        rows=rows,
        p99_ratio=round(by["long"].gap_p99_ms / base.gap_p99_ms, 2) if base.gap_p99_ms else 0.0,
        p50_ratio=round(by["long"].gap_p50_ms / base.gap_p50_ms, 2) if base.gap_p50_ms else 0.0,
        control_p99_ratio=round(by["short"].gap_p99_ms / base.gap_p99_ms, 2) if base.gap_p99_ms else 0.0,
    )


def format_arrivals(result: ArrivalsResult) -> str:
    s = result.settings
    rows = [
        [
            MODE_LABELS[r.mode],
            str(r.arrivals) if r.mode != "none" else "-",
            f"{r.arrival_prompt_tokens} ({r.arrival_cached_share * 100:.0f}%)" if r.arrivals else "-",
            f"{r.arrival_latency_p50_ms:.0f}" if r.arrivals else "-",
            f"{r.during_p50_ms:.0f} ({r.during_gaps})" if r.arrivals else "-",
            str(r.gaps),
            f"{r.gap_p50_ms:.0f}",
            f"{r.gap_p90_ms:.0f}",
            f"{r.gap_p99_ms:.0f}",
            f"{r.gap_max_ms:.0f}",
        ]
        for r in result.rows
    ]
    headers = ["mode", "arrivals", "arrival prompt tok (cached)", "arrival ms p50", "gap p50 ms while one runs (n)"]
    headers += ["gaps", "gap p50 ms"]
    lines = [
        f"bench arrivals — {result.model}, in-process engine — {result.machine}",
        f"{s.streams} greedy streams of {s.stream_tokens} tokens; arrivals one after another ({s.pause_s:g} s apart, "
        f"at most {s.max_arrivals} a round, each ≤ {s.arrival_tokens} tokens) while they decode; modes alternate "
        f"over {s.rounds} round(s)",
        "",
        table([*headers, "p90 ms", "p99 ms", "max ms"], rows),
        "",
        f"p99 gap with long arrivals / without: {result.p99_ratio:.2f}× (target ≤ 1.25×: "
        f"{'met' if 0 < result.p99_ratio <= 1.25 else 'NOT met'}); p50 {result.p50_ratio:.2f}×; "
        f"short arrivals (control) p99 {result.control_p99_ratio:.2f}×",
    ]
    errors = [e for r in result.rows for e in r.arrival_errors]
    if errors:
        lines.append(f"arrivals that failed: {len(errors)}, e.g. {errors[0]}")
    short = [r for r in result.rows if r.stream_tokens < s.streams * s.stream_tokens * s.rounds]
    if short:
        lines.append("running streams that ended early: " + ", ".join(r.mode for r in short))
    return "\n".join(lines)
