"""``mlxcluster bench fuzz``: thousands of random requests against several mlx engines at once; none may die.

One in-process engine per random-weight family fixture (Qwen3, Gemma 3, Qwen3-Next, Mistral 4-bit, Llama 3
8-bit), each with a small prompt cache and fewer batch slots than requests in flight, so requests queue, share
batches and hit the cache. Requests (:mod:`.fuzz_requests`) go to the engines in turn, a bounded number in
flight. Every so often one carries a seed whose sampler is made to raise (:func:`injected_fault`): that request
must end with ``engine_error`` and the others in its batch must go on.

What must hold: no engine dies (``MlxEngine.failure`` stays None and each answers a probe afterwards); every
request ends with ``Done`` or with an ``Error`` whose code is a request error (:data:`REQUEST_ERRORS`), never
``engine_error`` unless it was the injected one; no request hangs. The run is bounded in requests and in time
and stops by itself; requests not sent when the time ran out are counted as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from mlxcluster.bench.fuzz_requests import fuzz_request, injected_request
from mlxcluster.bench.stats import machine_line
from mlxcluster.protocol import ChatMessage, Done, Error, InferenceRequest, SamplingParams, Token
from mlxcluster.tables import table

REQUEST_ERRORS = frozenset({"invalid_request", "context_length_exceeded", "cannot_continue"})
"""Errors that are the request's own (a 4xx from the API); ``cannot_continue`` is a moved stream's continuation
that cannot go on here."""
INJECTED_SEED = 7_777_777_777
"""No random request draws it (their seeds are below 2**32, or 0, or 2**63 - 1)."""
EXAMPLES = 8


class FuzzSettings(msgspec.Struct):
    requests: int = 2000
    time_limit_s: float = 900.0
    """No request is sent after this; those in flight still end (each within ``request_timeout_s``)."""
    in_flight_per_engine: int = 6
    max_concurrent: int = 4
    """Batch slots per engine (fewer than requests in flight: some queue)."""
    prompt_cache_bytes: int = 32 << 20
    inject_every: int = 100
    """Every n-th request is an injected fault (0: none)."""
    request_timeout_s: float = 120.0
    seed: int = 0


class FuzzResult(msgspec.Struct):
    machine: str
    families: list[str]
    settings: FuzzSettings
    sent: int
    not_sent: int
    """Requests left unsent when the time limit came."""
    seconds: float
    outcomes: dict[str, int]
    """Outcome label → requests (:func:`outcome_of`)."""
    by_family: dict[str, dict[str, int]]
    violations: int
    examples: list[str]
    """A few violations, with their request's fields."""
    injected: int
    injected_ended_as_injected: int
    engine_failures: dict[str, str]
    """Family → ``MlxEngine.failure`` for each engine that died (empty: none did)."""
    probes: dict[str, str]
    """Family → the outcome of a plain request after the fuzz (``done stop`` / ``done length`` when it serves)."""

    @property
    def ok(self) -> bool:
        """Every target held: no violation, no engine death, every engine serving afterwards."""
        serving = all(outcome.startswith("done") for outcome in self.probes.values())
        return self.violations == 0 and not self.engine_failures and serving

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


@contextlib.contextmanager
def injected_fault(seed: int = INJECTED_SEED) -> Iterator[None]:
    """While inside, a request with ``seed`` gets a sampler that raises (``sampling.make_request_sampler`` is
    wrapped, as the engine's fault tests do): the fault a bad request could bring into a batch step."""
    from mlxcluster.worker import sampling

    real = sampling.make_request_sampler

    def raising(_logprobs: Any) -> Any:
        raise RuntimeError("injected sampler fault")

    def make(params: Any, request_seed: Any, *args: Any, **kwargs: Any) -> Any:
        return raising if request_seed == seed else real(params, request_seed, *args, **kwargs)

    sampling.make_request_sampler = make  # type: ignore[assignment]
    try:
        yield
    finally:
        sampling.make_request_sampler = real


def outcome_of(last: Any, *, called: bool = False, injected: bool = False) -> tuple[str, bool]:
    """(label, allowed) of a request's last frame (``called``: it streamed tool calls)."""
    if isinstance(last, Done):
        finish = "tool_calls" if called and last.finish_reason == "stop" else last.finish_reason
        return f"done {finish}", not injected
    if isinstance(last, Error):
        if last.code == "engine_error":
            return ("error engine_error (injected)", True) if injected else ("error engine_error", False)
        return f"error {last.code}", last.code in REQUEST_ERRORS and not injected
    return f"no end ({type(last).__name__})", False


async def _run_one(engine: Any, request: InferenceRequest, timeout_s: float) -> tuple[Any, bool]:
    """The request's last frame (a Done or Error; a string saying what went wrong instead) and whether it
    called a tool."""
    last: Any = None
    called = False
    try:
        async with asyncio.timeout(timeout_s):
            async for frame in engine.generate(request):
                if isinstance(frame, Token) and frame.tool_calls:
                    called = True
                elif isinstance(frame, Done | Error):
                    last = frame
    except TimeoutError:
        return f"timed out after {timeout_s:.0f} s", called
    except Exception as exc:  # generate itself raised: the engine let an exception through
        return f"raised {type(exc).__name__}: {exc}", called
    return last, called


def _detail(last: Any) -> str:
    return last if isinstance(last, str) else f"{getattr(last, 'code', '')} {getattr(last, 'message', '')}"


def _describe(request: InferenceRequest) -> str:
    fields = msgspec.to_builtins(request)
    fields.pop("messages", None)
    return msgspec.json.encode({k: v for k, v in fields.items() if v not in (None, [], {}, False)}).decode()[:400]


async def run_fuzz(paths: dict[str, Path], settings: FuzzSettings | None = None) -> FuzzResult:
    """Start one engine per family, fuzz them together, probe them, stop them."""
    from mlxcluster.worker.engine import MlxEngine

    settings = settings or FuzzSettings()
    engines = {
        family: MlxEngine(
            str(path),
            served_name=family,
            max_concurrent=settings.max_concurrent,
            prompt_cache_bytes=settings.prompt_cache_bytes,
        )
        for family, path in paths.items()
    }
    started_engines: list[Any] = []
    try:
        for engine in engines.values():
            await engine.start()
            started_engines.append(engine)
        with injected_fault():
            result = await _fuzz(engines, {family: logits_width(path) for family, path in paths.items()}, settings)
        for family, engine in engines.items():
            if engine.failure is not None:
                result.engine_failures[family] = str(engine.failure)
            probe = InferenceRequest(
                request_id=f"probe-{family}",
                model=family,
                messages=[ChatMessage(role="user", content="Still there?")],
                sampling=SamplingParams(temperature=0.0),
                max_tokens=4,
            )
            last, _ = await _run_one(engine, probe, settings.request_timeout_s)
            result.probes[family] = last if isinstance(last, str) else outcome_of(last)[0]
    finally:
        for engine in started_engines:
            await engine.stop()
    return result


def logits_width(model_path: Path) -> int:
    """The model's vocabulary size as its config states it (top level or ``text_config``)."""
    config = json.loads((model_path / "config.json").read_text())
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0)


async def _fuzz(engines: dict[str, Any], widths: dict[str, int], settings: FuzzSettings) -> FuzzResult:
    rng = random.Random(settings.seed)
    families = list(engines)
    slots = {family: asyncio.Semaphore(settings.in_flight_per_engine) for family in families}
    outcomes: Counter[str] = Counter()
    by_family: dict[str, Counter[str]] = {family: Counter() for family in families}
    examples: list[str] = []
    counts = {"violations": 0, "injected": 0, "injected_ok": 0}

    async def one(family: str, request: InferenceRequest, injected: bool) -> None:
        try:
            last, called = await _run_one(engines[family], request, settings.request_timeout_s)
        finally:
            slots[family].release()
        if isinstance(last, str):
            label, allowed = last.split(":")[0], False
        else:
            label, allowed = outcome_of(last, called=called, injected=injected)
        outcomes[label] += 1
        by_family[family][label] += 1
        if injected:
            counts["injected"] += 1
            counts["injected_ok"] += label == "error engine_error (injected)"
        if not allowed:
            counts["violations"] += 1
            if len(examples) < EXAMPLES:
                detail = _detail(last)
                described = _describe(request)
                examples.append(f"{family} {request.request_id}: {label}: {detail[:200]} — request {described}")

    started = time.monotonic()
    deadline = started + settings.time_limit_s
    tasks: list[asyncio.Task[None]] = []
    sent = 0
    for index in range(settings.requests):
        if time.monotonic() >= deadline:
            break
        injected = settings.inject_every > 0 and index % settings.inject_every == settings.inject_every - 1
        # injected faults go to each engine in turn too (index % engines alone could always pick the same one)
        family = families[(index // settings.inject_every if injected else index) % len(families)]
        request = injected_request(index, INJECTED_SEED) if injected else fuzz_request(rng, index, widths[family])
        await slots[family].acquire()
        tasks.append(asyncio.create_task(one(family, request, injected)))
        sent += 1
    await asyncio.gather(*tasks)
    return FuzzResult(
        machine=machine_line(),
        families=families,
        settings=settings,
        sent=sent,
        not_sent=settings.requests - sent,
        seconds=round(time.monotonic() - started, 1),
        outcomes=dict(outcomes.most_common()),
        by_family={family: dict(counter.most_common()) for family, counter in by_family.items()},
        violations=counts["violations"],
        examples=examples,
        injected=counts["injected"],
        injected_ended_as_injected=counts["injected_ok"],
        engine_failures={},
        probes={},
    )


def format_fuzz(result: FuzzResult) -> str:
    s = result.settings
    labels = list(result.outcomes)
    rows = [[family, *(str(result.by_family[family].get(label, 0)) for label in labels)] for family in result.families]
    rows.append(["all", *(str(result.outcomes[label]) for label in labels)])
    lines = [
        f"bench fuzz — {len(result.families)} in-process engines at once ({', '.join(result.families)}) — "
        f"{result.machine}",
        f"{result.sent} random requests sent of {s.requests} asked ({result.not_sent} left unsent by the "
        f"{s.time_limit_s:.0f} s limit), {s.in_flight_per_engine} in flight per engine on {s.max_concurrent} batch "
        f"slots, every {s.inject_every}th an injected sampler fault; {result.seconds:.0f} s",
        "",
        table(["family", *labels], rows),
        "",
        f"engine deaths: {len(result.engine_failures)} (target 0: {'met' if not result.engine_failures else 'NOT met'})"
        + "".join(f"; {family}: {why}" for family, why in result.engine_failures.items()),
        f"requests ending otherwise than Done or a request error ({', '.join(sorted(REQUEST_ERRORS))}), injected "
        f"faults aside: {result.violations} (target 0: {'met' if result.violations == 0 else 'NOT met'})",
        f"injected faults: {result.injected}, ended with engine_error: {result.injected_ended_as_injected}",
        "after the fuzz, a plain request per engine: "
        + ", ".join(f"{family} {outcome}" for family, outcome in result.probes.items()),
    ]
    lines += [f"  {example}" for example in result.examples]
    return "\n".join(lines)
