"""``mlxcluster bench grammar``: constrained decoding's cost, measured in one run.

1. Schema compile: each of a set of typical tool schemas compiled (first use) and fetched again
   (cached), on the model's tokenizer; p50 / p95 in ms.
2. Tokens/s of N concurrent streams in the in-process mlx engine, unconstrained and with a JSON
   schema, alternating rounds so a drifting machine load hits both alike.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from mlxcluster.bench.engine import PROMPTS
from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.protocol import ChatMessage, Done, InferenceRequest, ResponseFormat, SamplingParams, Token, ToolSpec
from mlxcluster.tables import table
from mlxcluster.worker.grammar import tool_calls_grammar

LONG_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}, "tags": {"type": "array"}},
    "required": ["title", "story"],
}
"""Room for long output, so constrained streams run as long as free ones."""


def tool_schemas(count: int) -> list[ToolSpec]:
    """Typical function tools (a few typed, described properties), all different."""
    return [
        ToolSpec(
            name=f"tool_{i}",
            description="Look something up",
            parameters={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to look for"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 50 + i},
                    "unit": {"enum": ["metric", "imperial"]},
                    "filters": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                    "exact": {"type": "boolean"},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        )
        for i in range(count)
    ]


class GrammarRow(msgspec.Struct):
    mode: str
    streams: int
    tokens: int
    seconds: float
    tokens_per_s: float


class GrammarBenchResult(msgspec.Struct):
    machine: str
    model: str
    schemas: int
    compile_p50_ms: float
    compile_p95_ms: float
    cached_p50_ms: float
    rows: list[GrammarRow]
    constrained_cost_pct: float

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def _compile_times(engine: object, count: int) -> tuple[list[float], list[float]]:
    features = engine._features  # type: ignore[attr-defined]
    compiler = features.grammars
    compiler.matcher(tool_calls_grammar(tool_schemas(1), parallel=False, start="<a>", end="</a>", special={}))
    first, cached = [], []
    for tool in tool_schemas(count):
        grammar = tool_calls_grammar([tool], parallel=True, start="<tool_call>", end="</tool_call>", special={})
        started = time.perf_counter()
        compiler.matcher(grammar)
        first.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        compiler.matcher(grammar)
        cached.append((time.perf_counter() - started) * 1000)
    return first, cached


async def _round(engine: object, streams: int, max_tokens: int, constrained: bool, seed: int) -> tuple[int, float]:
    fmt = ResponseFormat(type="json_schema", schema=LONG_SCHEMA) if constrained else None

    async def one(index: int) -> int:
        request = InferenceRequest(
            request_id=f"bench-{seed}-{index}",
            model="bench",
            messages=[ChatMessage(role="user", content=PROMPTS[index % len(PROMPTS)] + " Answer in JSON.")],
            sampling=SamplingParams(temperature=0.8),
            seed=seed * 100 + index,
            max_tokens=max_tokens,
            response_format=fmt,
        )
        tokens = 0
        async for frame in engine.generate(request):  # type: ignore[attr-defined]
            if isinstance(frame, Token):
                continue
            if isinstance(frame, Done):
                tokens = frame.usage.completion_tokens
        return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts), time.perf_counter() - started


async def run_grammar_bench(
    *, model_path: str, streams: int = 8, max_tokens: int = 64, rounds: int = 2, schemas: int = 20
) -> GrammarBenchResult:
    from mlxcluster.worker.engine import MlxEngine

    engine = MlxEngine(model_path, max_concurrent=streams)
    await engine.start()
    try:
        first, cached = _compile_times(engine, schemas)
        await _round(engine, 2, 8, True, 0)  # warm both paths
        totals = {False: [0, 0.0], True: [0, 0.0]}
        for index in range(rounds):
            for constrained in (False, True) if index % 2 == 0 else (True, False):
                tokens, seconds = await _round(engine, streams, max_tokens, constrained, index + 1)
                totals[constrained][0] += tokens
                totals[constrained][1] += seconds
    finally:
        await engine.stop()
    rows = [
        GrammarRow(
            mode="constrained (json_schema)" if constrained else "unconstrained",
            streams=streams,
            tokens=int(tokens),
            seconds=round(seconds, 2),
            tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
        )
        for constrained, (tokens, seconds) in totals.items()
    ]
    free, bound = rows[0].tokens_per_s, rows[1].tokens_per_s
    return GrammarBenchResult(
        machine=machine_line(),
        model=engine.model_name,
        schemas=schemas,
        compile_p50_ms=round(percentile(first, 50), 2),
        compile_p95_ms=round(percentile(first, 95), 2),
        cached_p50_ms=round(percentile(cached, 50), 3),
        rows=rows,
        constrained_cost_pct=round(100 * (1 - bound / free), 1) if free else 0.0,
    )


def format_table(result: GrammarBenchResult) -> str:
    lines = [
        result.machine,
        f"model {result.model}; {result.schemas} tool schemas: compile p50 {result.compile_p50_ms} ms, "
        f"p95 {result.compile_p95_ms} ms; cached p50 {result.cached_p50_ms} ms",
        table(
            ["mode", "streams", "tokens", "seconds", "tokens/s"],
            [[r.mode, str(r.streams), str(r.tokens), f"{r.seconds:.2f}", f"{r.tokens_per_s:.1f}"] for r in result.rows],
        ),
        f"constrained decoding costs {result.constrained_cost_pct}% of tokens/s (target: <= 15%)",
    ]
    return "\n".join(lines)
