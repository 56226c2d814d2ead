"""``bench grammar --parts strict``: strict JSON under sampling, on every model-family fixture.

Sampled generations (temperature 1, a seed each) under ``json_schema``, ``json_object`` and a forced tool call,
spread evenly over the fixtures and modes, each family's in its own in-process engine, ``streams`` at a time
(batched). Every finished output (``stop``, or ``tool_calls``: a call and nothing else) must pass Python's
``json.loads`` (strict: no raw control character inside a string) and its schema. On templates with a thinking
switch, half the requests think (with a small budget, so the answer still comes) and half do not: the grammar
applies after the reasoning either way. Outputs cut by ``max_tokens`` are counted, not checked.

Random-weight fixtures never end on their own: the schemas are bounded (``maxLength``, integer ranges, no
extra properties), so the grammar ends them. ``json_object`` is not bounded, so many of its generations run to
``max_tokens``. The schema check uses ``jsonschema`` (a dev dependency); where it is not installed the run says
so and checks ``json.loads`` only. Random weights seldom close an open object, so ``json_object`` requests add
a ``logit_bias`` of +8 to the short tokens that end in ``"`` or ``}`` (a sampling parameter like any other: the
grammar still decides what is allowed).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec

from mlxcluster.bench.family_dirs import THINKING
from mlxcluster.bench.stats import machine_line
from mlxcluster.protocol import (
    ChatMessage,
    Done,
    Error,
    InferenceRequest,
    ReasoningParams,
    ResponseFormat,
    SamplingParams,
    Token,
    ToolSpec,
)
from mlxcluster.tables import table

MODES = ("json_schema", "json_object", "tool_call")
ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 10},
        "sure": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["a", "b\n", None]},
    },
    "required": ["answer", "sure"],
    "additionalProperties": False,
}
OBJECT = {"type": "object"}
WEATHER = ToolSpec(
    name="get_weather",
    description="The weather in a city",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
)
CLOSE_BIAS = 8.0
THINKING_BUDGET = 8
EXAMPLES = 5
"""Failures kept with their output."""


class StrictCount(msgspec.Struct):
    """One family and mode: what finished, what was cut, what passed."""

    family: str
    mode: str
    requests: int = 0
    finished: int = 0
    cut: int = 0
    """Ended by ``max_tokens`` (not checked)."""
    errors: int = 0
    """Ended with an Error frame (none expected)."""
    passed: int = 0
    failed: int = 0


class StrictFailure(msgspec.Struct):
    family: str
    mode: str
    seed: int
    output: str
    problem: str


class StrictResult(msgspec.Struct):
    machine: str
    requests: int
    max_tokens: int
    streams: int
    schema_checked: bool
    """``jsonschema`` was there to check the schemas (else ``json.loads`` only)."""
    seconds: float
    counts: list[StrictCount]
    failures: list[StrictFailure]
    error_examples: list[str] = []

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def _validator() -> Any:
    """``jsonschema.validate``, or None where the dev dependency is not installed."""
    try:
        import jsonschema  # type: ignore[import-untyped]  # a dev dependency, without stubs
    except ImportError:
        return None
    return jsonschema.validate


def closing_tokens(model_path: Path) -> list[int]:
    """Ids of the short tokens that end in ``"`` or ``}`` (from the model's tokenizer.json vocabulary): what
    closes a string or an object."""
    vocab = json.loads((model_path / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(i for token, i in vocab.items() if token.endswith(('"', "}")) and len(token) <= 2)


def strict_request(
    family: str, mode: str, seed: int, max_tokens: int, closers: list[int] | None = None
) -> InferenceRequest:
    """A sampled request of ``mode``; on a thinking template, odd seeds think within a budget; ``closers`` get
    :data:`CLOSE_BIAS` under ``json_object``."""
    fields: dict[str, Any] = {}
    sampling = SamplingParams(temperature=1.0)
    if mode == "json_object" and closers:
        sampling = SamplingParams(temperature=1.0, logit_bias={token: CLOSE_BIAS for token in closers})
    if family in THINKING:
        if seed % 2:
            fields["reasoning"] = ReasoningParams(enabled=True, budget_tokens=THINKING_BUDGET, param="thinking")
        else:
            fields["chat_template_kwargs"] = {"enable_thinking": False}
    if mode == "tool_call":
        content = f"What is the weather in city number {seed} for a few days?"
        fields.update(tools=[WEATHER], tool_choice="function", tool_name=WEATHER.name, parallel_tool_calls=False)
    else:
        content = f"Answer question {seed} in JSON."
        schema = ANSWER if mode == "json_schema" else None
        fields["response_format"] = ResponseFormat(type=mode, schema=schema)  # type: ignore[arg-type]
    return InferenceRequest(
        request_id=f"strict-{family}-{mode}-{seed}",
        model=family,
        messages=[ChatMessage(role="user", content=content)],
        sampling=sampling,
        seed=seed,
        max_tokens=max_tokens,
        **fields,
    )


def check_output(mode: str, text: str, calls: list[Any], validate: Any) -> str | None:
    """Why a finished output fails (None: it passes): strict ``json.loads``, then the schema."""
    if mode == "tool_call":
        if text.strip() or len(calls) != 1:
            return f"expected one call and no text, got {len(calls)} call(s) and {text!r}"
        if calls[0].name != WEATHER.name:
            return f"called {calls[0].name!r}"
        payload, schema = calls[0].arguments, WEATHER.parameters
    else:
        payload, schema = text, ANSWER if mode == "json_schema" else OBJECT
    try:
        value = json.loads(payload)
    except ValueError as exc:
        return f"json.loads: {exc}"
    if validate is not None:
        try:
            validate(value, schema)
        except Exception as exc:  # jsonschema.ValidationError, SchemaError
            return f"schema: {getattr(exc, 'message', exc)}"
    elif mode != "tool_call" and not isinstance(value, dict):
        return "not an object"
    return None


async def _one(engine: Any, request: InferenceRequest) -> tuple[Any, str, list[Any]]:
    """Run a request: its last frame, its content text and its tool calls."""
    text: list[str] = []
    calls: list[Any] = []
    last: Any = None
    async for frame in engine.generate(request):
        if isinstance(frame, Token):
            text.append(frame.text)
            calls.extend(frame.tool_calls or [])
        elif isinstance(frame, Done | Error):
            last = frame
    return last, "".join(text), calls


async def run_family(
    family: str, path: Path, seeds: dict[str, list[int]], *, streams: int, max_tokens: int, result: StrictResult
) -> None:
    """One family's engine: every mode's seeds, ``streams`` requests at a time."""
    from mlxcluster.worker.engine import MlxEngine

    validate = _validator()
    engine = MlxEngine(str(path), served_name=family, max_concurrent=streams, prompt_cache_bytes=0)
    await engine.start()
    slots = asyncio.Semaphore(streams)
    counts = {mode: StrictCount(family, mode) for mode in seeds}
    closers = closing_tokens(path)

    async def one(mode: str, seed: int) -> None:
        async with slots:
            last, text, calls = await _one(engine, strict_request(family, mode, seed, max_tokens, closers))
        count = counts[mode]
        count.requests += 1
        if isinstance(last, Error) or last is None:
            count.errors += 1
            if len(result.error_examples) < EXAMPLES:
                result.error_examples.append(f"{family} {mode} seed {seed}: {getattr(last, 'code', 'no end')}")
            return
        if last.finish_reason != "stop":
            count.cut += 1
            return
        count.finished += 1
        problem = check_output(mode, text, calls, validate)
        if problem is None:
            count.passed += 1
            return
        count.failed += 1
        if len(result.failures) < EXAMPLES:
            shown = text if mode != "tool_call" else json.dumps([msgspec.to_builtins(c) for c in calls])
            result.failures.append(StrictFailure(family, mode, seed, shown[:300], problem[:300]))

    try:
        await asyncio.gather(*(one(mode, seed) for mode, mode_seeds in seeds.items() for seed in mode_seeds))
    finally:
        await engine.stop()
    result.counts.extend(counts.values())


def spread(total: int, families: list[str]) -> dict[str, dict[str, list[int]]]:
    """``total`` seeds spread evenly over families and modes (the first ones get the remainder)."""
    cells = [(family, mode) for family in families for mode in MODES]
    out: dict[str, dict[str, list[int]]] = {family: {} for family in families}
    seed = 0
    for index, (family, mode) in enumerate(cells):
        n = total // len(cells) + (1 if index < total % len(cells) else 0)
        out[family][mode] = list(range(seed, seed + n))
        seed += n
    return out


async def run_strict_json(
    paths: dict[str, Path], *, total: int = 1000, streams: int = 8, max_tokens: int = 64
) -> StrictResult:
    """``total`` sampled generations over ``paths``' families (one engine at a time)."""
    result = StrictResult(
        machine=machine_line(),
        requests=total,
        max_tokens=max_tokens,
        streams=streams,
        schema_checked=_validator() is not None,
        seconds=0.0,
        counts=[],
        failures=[],
    )
    started = time.perf_counter()
    for family, seeds in spread(total, list(paths)).items():
        await run_family(family, paths[family], seeds, streams=streams, max_tokens=max_tokens, result=result)
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def format_strict(result: StrictResult) -> str:
    rows = [
        [c.family, c.mode, str(c.requests), str(c.finished), str(c.passed), str(c.failed), str(c.cut), str(c.errors)]
        for c in result.counts
    ]
    finished = sum(c.finished for c in result.counts)
    failed = sum(c.failed for c in result.counts)
    checked = (
        "json.loads (strict) and the schema (jsonschema)"
        if result.schema_checked
        else ("json.loads (strict) only: jsonschema, a dev dependency, is not installed")
    )
    lines = [
        f"bench grammar --parts strict — the model-family fixtures, in-process engines — {result.machine}",
        f"{result.requests} sampled generations (temperature 1, one seed each, ≤ {result.max_tokens} tokens, "
        f"{result.streams} at a time per engine); every finished output checked with {checked}",
        f"(json_object requests add logit_bias +{CLOSE_BIAS:g} to the short tokens ending in '\"' or '}}': "
        "random weights seldom close an open object; thinking templates think with a budget of "
        f"{THINKING_BUDGET} tokens on odd seeds, not at all on even ones)",
        "",
        table(["family", "mode", "requests", "finished", "passed", "failed", "cut by max_tokens", "errors"], rows),
        "",
        f"finished outputs that fail: {failed} of {finished} (target 0: {'met' if failed == 0 else 'NOT met'}); "
        f"{result.seconds:.0f} s",
    ]
    lines += [f"  {f.family} {f.mode} seed {f.seed}: {f.problem} — output {f.output!r}" for f in result.failures]
    if result.error_examples:
        lines.append("errors: " + "; ".join(result.error_examples))
    return "\n".join(lines)
