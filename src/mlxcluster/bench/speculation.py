"""``bench engine --parts speculation``: speculative decoding against the same engine without it and against
``mlx_lm.server`` (issue 21's targets).

Three servers run at once on 127.0.0.1, on the same model dir and BLAS: our cluster (controller + one worker)
with ``worker.speculative_tokens = 8`` (the default), the same cluster with 0 (no speculation), and
``mlx_lm.server`` with its plain decoding (it has no prompt lookup; its ``--draft-model`` needs a second, smaller
model of the same tokenizer, which an offline machine with the demo model alone does not have). Every request is
greedy and streamed. Each round sends one set of distinct prompts, never sent before, to each server in turn
(with, without, theirs; the next round in reverse order), so no prompt cache helps and load from elsewhere
falls on all three alike; a figure sums its rounds. Tokens/s is the tokens (counted with the model's tokenizer)
over the rounds' wall time, prefill included; the decode rate leaves out the time before a round's first token.

Workloads:

- **edit**: repeat a ~300-token block of Python with one function renamed (each request another function
  or new name): the answer is mostly the prompt's own text, which prompt lookup drafts;
- **chat**: distinct open questions, nothing in the prompt to look up (at 8 and 16 streams also issue 21's
  "concurrent distinct requests, no cache help" against ``mlx_lm.server``).

The speculating worker's counts (``speculation`` in ``/api/cluster/workers``, heartbeats every 0.5 s here) are
read before and after each of its rounds: acceptance rate (accepted / drafted) and the share of generated
tokens that were accepted drafts. Exact-match acceptance must leave greedy output as it was: the texts of
ours with and without speculation are compared request by request.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import aiohttp
import msgspec

from mlxcluster.bench.stats import cpu_seconds, percentile
from mlxcluster.bench.versus import chunk_text, stream_chunks
from mlxcluster.tables import table

WITH = "ours, speculation"
WITHOUT = "ours, no speculation"
THEIRS = "mlx_lm.server"

EDIT_SINGLE_TARGET = 1.8
"""Edit, one stream: ours with speculation ≥ this × ours without and × ``mlx_lm.server``."""
EDIT_CONCURRENT_TARGET = 1.3
"""Edit, 8 streams: the same ratios."""
CHAT_COST_TARGET = 0.97
"""Chat (nothing to look up): ours with speculation ≥ this × ours without (it costs ≤ 3%)."""
DISTINCT_TARGET = 1.05
"""Chat at 8 and 16 streams (distinct requests, no cache help): ours (speculation on, the default) ≥ this ×
``mlx_lm.server``."""
DISTINCT_STREAMS = (8, 16)
HEARTBEAT_INTERVAL_MS = 500
"""The clusters' heartbeat interval here, so counts read after a round are fresh."""
SETTLE_S = 1.2
"""Wait after a speculating round before reading its counts (over two heartbeats)."""
WARM_UP_PROMPT = "Say hello."

EDIT_CODE = """def compute_total(prices, quantities, discount=0.0):
    subtotal = 0.0
    for price, quantity in zip(prices, quantities):
        subtotal += price * quantity
    return round(subtotal * (1 - discount), 2)


def count_items(quantities):
    total = 0
    for quantity in quantities:
        total += quantity
    return total


def average_price(prices):
    if not prices:
        return 0.0
    return sum(prices) / len(prices)


def most_expensive(names, prices):
    best_name = None
    best_price = 0.0
    for name, price in zip(names, prices):
        if price > best_price:
            best_name = name
            best_price = price
    return best_name


def format_receipt(customer, names, prices, quantities):
    lines = ["Receipt for " + customer]
    for name, price, quantity in zip(names, prices, quantities):
        lines.append(str(quantity) + " x " + name + ": " + str(price * quantity))
    lines.append("Items: " + str(count_items(quantities)))
    lines.append("Total: " + str(compute_total(prices, quantities)))
    return "\\n".join(lines)"""
"""The edit workload's code (300 tokens for SmolLM2's tokenizer): plain functions, which the 135M demo model
copies best of the blocks tried."""

RENAMED = ("compute_total", "count_items", "average_price", "most_expensive", "format_receipt")
"""The functions a request may rename."""
VERBS = ("get", "calc", "make", "build", "find", "eval", "show", "sum", "read", "take", "give", "load")

CHAT_TEMPLATES = (
    "What are the main advantages and drawbacks of {}?",
    "How would you explain {} to a curious teenager?",
    "How has {} changed over the last hundred years?",
    "What would a world without {} look like?",
    "Which common mistakes do beginners make with {}?",
)
CHAT_TOPICS = (
    "public libraries",
    "learning a second language",
    "night trains",
    "beekeeping",
    "urban gardens",
    "board games",
    "solar panels",
    "handwritten letters",
    "volunteer firefighters",
    "sourdough baking",
    "lighthouses",
    "chess clubs",
)


def edit_rename(index: int) -> tuple[str, str]:
    """Request ``index``'s rename: (function, new name); distinct for the first 60 indexes."""
    old = RENAMED[index % len(RENAMED)]
    noun = old.split("_", 1)[1]
    return old, f"{VERBS[index // len(RENAMED) % len(VERBS)]}_{noun}"


def edit_prompt(index: int) -> str:
    """The instruction first (so requests differ from their first tokens on), then the code; of the phrasings
    tried, the one the demo model follows best."""
    old, new = edit_rename(index)
    return f"Repeat this code exactly, but call the function {old} {new} instead:\n\n```python\n{EDIT_CODE}\n```"


def edit_expected(index: int) -> str:
    old, new = edit_rename(index)
    return EDIT_CODE.replace(old, new)


def chat_prompt(index: int) -> str:
    """Request ``index``'s question; distinct for the first 60 indexes."""
    template = CHAT_TEMPLATES[index % len(CHAT_TEMPLATES)]
    return template.format(CHAT_TOPICS[index // len(CHAT_TEMPLATES) % len(CHAT_TOPICS)])


def line_recall(expected: str, reply: str) -> float:
    """The share of ``expected``'s non-blank lines that ``reply`` holds verbatim (indentation aside)."""
    wanted = [line.strip() for line in expected.splitlines() if line.strip()]
    got = {line.strip() for line in reply.splitlines()}
    return sum(line in got for line in wanted) / len(wanted) if wanted else 0.0


class SpeculationSettings(msgspec.Struct):
    """What one run measures."""

    edit_streams: tuple[int, ...] = (1, 8)
    edit_max_tokens: int = 350
    """Above the edit's answer (~320 tokens with its fences): each answer ends where the model ends it."""
    chat_streams: tuple[int, ...] = (1, 8, 16)
    chat_max_tokens: int = 128
    rounds: int = 2
    draft_tokens: int = 8
    """``worker.speculative_tokens`` of the speculating cluster."""
    draft_layers: int = 0
    """The speculating cluster also drafts with a draft model (``worker.draft_model``): the model cut to its first
    this many layers (:func:`~mlxcluster.bench.layer_skip.make_layer_skip_draft`); 0: prompt lookup only."""

    @classmethod
    def quick(cls) -> SpeculationSettings:
        return cls(edit_streams=(1,), chat_streams=(8,), chat_max_tokens=64, rounds=1)

    def max_streams(self) -> int:
        return max((*self.edit_streams, *self.chat_streams, 1))


class Target(NamedTuple):
    """One server under test."""

    label: str
    base_url: str
    model: str
    counts: bool = False
    """It is our cluster speculating: read its workers' speculation counts around each round."""
    pids: tuple[int, ...] = ()
    """The server's processes (ours: controller, worker, nats-server), whose CPU time each round is sampled."""


class Counts(NamedTuple):
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    model_drafted: int = 0
    """Of ``drafted``, the draft model's (``worker.draft_model``)."""
    model_accepted: int = 0

    def plus(self, other: Counts, sign: int = 1) -> Counts:
        return Counts(*(a + sign * b for a, b in zip(self, other, strict=True)))


class Measure(msgspec.Struct):
    """One server on one workload and concurrency, its rounds summed."""

    workload: str
    streams: int
    server: str
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    """Tokens over the rounds' wall time (prompts' prefill included)."""
    ttft_p50_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    """Tokens after each request's first, over the time from a round's first token to its last."""
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    model_drafted: int = 0
    """Of ``drafted``, the draft model's."""
    model_accepted: int = 0
    cpu_ms_per_token: float = 0.0
    """CPU time of the server's processes (all threads) per generated token: steadier than tokens/s when other
    load shares the machine."""
    round_tokens_per_s: list[float] = []
    """Each round's tokens/s, in order."""


class Comparison(msgspec.Struct):
    """One workload and concurrency: the ratios, the speculating worker's counts, the texts compared."""

    workload: str
    streams: int
    with_vs_without: float
    with_vs_theirs: float
    without_vs_theirs: float
    acceptance_rate: float
    """Accepted / drafted tokens."""
    accepted_share: float
    """Accepted drafts / tokens generated with speculation: the share of tokens that needed no forward."""
    tokens_per_step: float
    """1 + accepted drafts per verify step, all rows of the batch together (0: no verify step); with one stream,
    the tokens each verify step gave."""
    identical: int
    """Requests whose text with speculation equals the text without."""
    compared: int
    identical_theirs: int
    """Requests whose text from ``mlx_lm.server`` equals ours without speculation."""
    first_difference: str = ""
    decode_with_vs_without: float = 0.0
    """The same ratio on decode rates (prefill left out)."""
    decode_with_vs_theirs: float = 0.0
    edit_recall: float = 0.0
    """Edit: the share of the expected code's lines that ours-without's replies reproduce (mean; 1.0: all)."""
    renamed: int = 0
    """Edit: replies (ours without) that rename the function and keep no ``def`` of the old name."""
    cpu_with_vs_without: float = 0.0
    """CPU per token with speculation over without (below 1: speculation saved CPU)."""
    round_ratios: list[float] = []
    """With / without tokens/s round by round: their spread is the run's noise."""


class SpeculationResult(msgspec.Struct):
    machine: str
    model: str
    settings: SpeculationSettings
    measures: list[Measure]
    comparisons: list[Comparison]

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else 0.0


class Reply(NamedTuple):
    text: str
    first: float = 0.0
    """``perf_counter`` when its first text came (0.0: none came)."""
    last: float = 0.0


async def chat(session: aiohttp.ClientSession, target: Target, prompt: str, max_tokens: int) -> Reply:
    """One greedy streamed chat completion: its text and when its first and last text came."""
    body = {
        "model": target.model,
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    parts: list[str] = []
    first = last = 0.0
    async for chunk in stream_chunks(session, f"{target.base_url}/v1/chat/completions", body, target.label):
        text = chunk_text(chunk)
        if text:
            last = time.perf_counter()
            first = first or last
            parts.append(text)
    return Reply("".join(parts), first, last)


async def read_counts(session: aiohttp.ClientSession, target: Target) -> Counts:
    """The speculation counts of the target's workers, summed (zeros where a worker does not speculate)."""
    async with session.get(f"{target.base_url}/api/cluster/workers") as response:
        response.raise_for_status()
        listing = await response.json()
    total = Counts()
    for worker in listing.get("workers", []):
        spec = worker.get("speculation") or {}
        total = total.plus(Counts(*(int(spec.get(field, 0)) for field in Counts._fields)))
    return total


class _Sums:
    """A server's rounds on one workload and concurrency, summed as they come."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.seconds = 0.0
        self.ttfts_ms: list[float] = []
        self.decode_tokens = 0
        self.decode_seconds = 0.0
        self.counts = Counts()
        self.cpu_s = 0.0
        self.round_rates: list[float] = []

    def add(
        self, started: float, ended: float, replies: list[Reply], count_tokens: Callable[[str], int], cpu_s: float = 0.0
    ) -> None:
        """One round's replies: wall time, TTFTs, the tokens after each first one over the time from the round's
        first token to its last (its decode rate, prefills that overlap it included), and the server's CPU."""
        self.seconds += ended - started
        self.cpu_s += cpu_s
        tokens = sum(count_tokens(reply.text) for reply in replies)
        self.round_rates.append(round(tokens / (ended - started), 2) if ended > started else 0.0)
        self.texts += [reply.text for reply in replies]
        came = [reply for reply in replies if reply.first]
        self.ttfts_ms += [(reply.first - started) * 1000 for reply in came]
        if came:
            self.decode_tokens += sum(max(0, count_tokens(reply.text) - 1) for reply in came)
            self.decode_seconds += max(r.last for r in came) - min(r.first for r in came)


class Workload(NamedTuple):
    name: str
    streams: tuple[int, ...]
    max_tokens: int
    prompt: Callable[[int], str]
    expected: Callable[[int], str] | None = None
    rename: Callable[[int], tuple[str, str]] | None = None


def workloads(settings: SpeculationSettings) -> list[Workload]:
    return [
        Workload("edit", settings.edit_streams, settings.edit_max_tokens, edit_prompt, edit_expected, edit_rename),
        Workload("chat", settings.chat_streams, settings.chat_max_tokens, chat_prompt),
    ]


async def measure(
    targets: Sequence[Target],
    settings: SpeculationSettings,
    count_tokens: Callable[[str], int],
    *,
    settle_s: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Measure], list[Comparison]]:
    """Every workload at each of its concurrencies on every target, ``settings.rounds`` rounds, alternating;
    ``settle_s`` (default :data:`SETTLE_S`): the wait for fresh counts after a speculating round."""
    settle = SETTLE_S if settle_s is None else settle_s
    measures: list[Measure] = []
    comparisons: list[Comparison] = []
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for target in targets:
            await chat(session, target, WARM_UP_PROMPT, 8)  # loads mlx_lm.server's model
        await asyncio.sleep(settle)
        for workload in workloads(settings):
            index = 0  # prompt indexes go on across concurrencies: no prompt is sent twice to a server
            for streams in workload.streams:
                sums = {target.label: _Sums() for target in targets}
                indexes: list[int] = []
                for round_ in range(settings.rounds):
                    batch = list(range(index, index + streams))
                    index += streams
                    indexes += batch
                    order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                    for target in order:
                        if progress is not None:
                            progress(f"{workload.name} ×{streams}, round {round_ + 1}: {target.label}")
                        before = await read_counts(session, target) if target.counts else Counts()
                        cpu_before = cpu_seconds(target.pids)
                        started = time.perf_counter()
                        replies = await asyncio.gather(
                            *(chat(session, target, workload.prompt(i), workload.max_tokens) for i in batch)
                        )
                        ended = time.perf_counter()
                        cpu = cpu_seconds(target.pids) - cpu_before
                        sums[target.label].add(started, ended, replies, count_tokens, cpu)
                        if target.counts:
                            await asyncio.sleep(settle)
                            after = await read_counts(session, target)
                            sums[target.label].counts = sums[target.label].counts.plus(after.plus(before, -1))
                for target in targets:
                    measures.append(_measure(workload.name, streams, target.label, sums[target.label], count_tokens))
                comparisons.append(_compare(workload, streams, indexes, measures[-len(targets) :], sums))
    return measures, comparisons


def _measure(workload: str, streams: int, server: str, sums: _Sums, count_tokens: Callable[[str], int]) -> Measure:
    tokens = sum(count_tokens(text) for text in sums.texts)
    return Measure(
        workload=workload,
        streams=streams,
        server=server,
        requests=len(sums.texts),
        tokens=tokens,
        seconds=round(sums.seconds, 2),
        tokens_per_s=round(tokens / sums.seconds, 2) if sums.seconds > 0 else 0.0,
        ttft_p50_ms=round(percentile(sums.ttfts_ms, 50), 1),
        decode_tokens_per_s=round(sums.decode_tokens / sums.decode_seconds, 2) if sums.decode_seconds > 0 else 0.0,
        steps=sums.counts.steps,
        drafted=sums.counts.drafted,
        accepted=sums.counts.accepted,
        model_drafted=sums.counts.model_drafted,
        model_accepted=sums.counts.model_accepted,
        cpu_ms_per_token=round(1000 * sums.cpu_s / tokens, 3) if tokens else 0.0,
        round_tokens_per_s=sums.round_rates,
    )


def first_difference(index: int, a: str, b: str) -> str:
    """Where two texts part, briefly (for the report)."""
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"request {index}, char {at}: {a[at : at + 24]!r} (with) vs {b[at : at + 24]!r} (without)"


def _compare(
    workload: Workload, streams: int, indexes: list[int], measures: list[Measure], sums: dict[str, _Sums]
) -> Comparison:
    by_server = {m.server: m for m in measures}
    with_, without, theirs = (by_server.get(s) for s in (WITH, WITHOUT, THEIRS))
    rate = (with_.tokens_per_s if with_ else 0.0), (without.tokens_per_s if without else 0.0)
    theirs_rate = theirs.tokens_per_s if theirs else 0.0
    ours_with = sums[WITH].texts if WITH in sums else []
    ours_without = sums[WITHOUT].texts if WITHOUT in sums else []
    pairs = list(zip(ours_with, ours_without, strict=False))
    differing = [(i, a, b) for i, (a, b) in zip(indexes, pairs, strict=False) if a != b]
    theirs_texts = sums[THEIRS].texts if THEIRS in sums else []
    comparison = Comparison(
        workload=workload.name,
        streams=streams,
        with_vs_without=_ratio(*rate),
        with_vs_theirs=_ratio(rate[0], theirs_rate),
        without_vs_theirs=_ratio(rate[1], theirs_rate),
        acceptance_rate=_ratio(with_.accepted, with_.drafted) if with_ else 0.0,
        accepted_share=_ratio(with_.accepted, with_.tokens) if with_ else 0.0,
        tokens_per_step=round(1 + with_.accepted / with_.steps, 2) if with_ and with_.steps else 0.0,
        identical=len(pairs) - len(differing),
        compared=len(pairs),
        identical_theirs=sum(a == b for a, b in zip(theirs_texts, ours_without, strict=False)),
        first_difference=first_difference(*differing[0]) if differing else "",
        decode_with_vs_without=_ratio(*(m.decode_tokens_per_s if m else 0.0 for m in (with_, without))),
        decode_with_vs_theirs=_ratio(*(m.decode_tokens_per_s if m else 0.0 for m in (with_, theirs))),
        cpu_with_vs_without=_ratio(*(m.cpu_ms_per_token if m else 0.0 for m in (with_, without))),
        round_ratios=[
            _ratio(a, b)
            for a, b in zip(
                with_.round_tokens_per_s if with_ else [], without.round_tokens_per_s if without else [], strict=False
            )
        ],
    )
    if workload.expected is not None and workload.rename is not None and ours_without:
        scores = [line_recall(workload.expected(i), text) for i, text in zip(indexes, ours_without, strict=False)]
        comparison.edit_recall = round(sum(scores) / len(scores), 3)
        comparison.renamed = sum(
            workload.rename(i)[1] in text and f"def {workload.rename(i)[0]}(" not in text
            for i, text in zip(indexes, ours_without, strict=False)
        )
    return comparison


def cluster_envs(
    settings: SpeculationSettings, draft_model: str | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of our speculating cluster (with ``draft_model`` as ``worker.draft_model``) and of the
    plain one."""
    common = {"MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_INTERVAL_MS)}
    speculating = {**common, "MLXCLUSTER_WORKER_SPECULATIVE_TOKENS": str(settings.draft_tokens)}
    if draft_model is not None:
        speculating["MLXCLUSTER_WORKER_DRAFT_MODEL"] = draft_model
    return speculating, {**common, "MLXCLUSTER_WORKER_SPECULATIVE_TOKENS": "0"}


@contextlib.asynccontextmanager
async def servers(
    model_path: str, settings: SpeculationSettings, draft_model: str | None = None
) -> AsyncIterator[list[Target]]:
    """Our cluster with and without speculation and ``mlx_lm.server``, all up at once."""
    from mlxcluster.bench.versus import mlx_lm_server, mlxcluster_server

    n = settings.max_streams()
    speculating, plain = cluster_envs(settings, draft_model)
    name = Path(model_path).name
    theirs_pids: list[int] = []
    async with (
        mlxcluster_server(model_path, max_concurrent=n, env=speculating) as with_,
        mlxcluster_server(model_path, max_concurrent=n, env=plain) as without,
        mlx_lm_server(model_path, decode_concurrency=n, pids=theirs_pids) as theirs,
    ):
        yield [
            Target(WITH, with_.base_url, name, counts=True, pids=with_.pids()),
            Target(WITHOUT, without.base_url, name, pids=without.pids()),
            Target(THEIRS, theirs, "default_model", pids=tuple(theirs_pids)),
        ]


async def run_speculation(
    model_path: str, settings: SpeculationSettings, *, progress: Callable[[str], None] | None = None
) -> SpeculationResult:
    from mlxcluster.bench.stats import machine_line
    from mlxcluster.bench.versus import token_counter

    with tempfile.TemporaryDirectory(prefix="mlxcluster-draft-") as scratch:
        draft_model = None
        if settings.draft_layers > 0:
            from mlxcluster.bench.layer_skip import make_layer_skip_draft

            draft_model = str(make_layer_skip_draft(model_path, settings.draft_layers, Path(scratch) / "draft"))
        async with servers(model_path, settings, draft_model) as targets:
            measures, comparisons = await measure(targets, settings, token_counter(model_path), progress=progress)
    return SpeculationResult(machine_line(), Path(model_path).name, settings, measures, comparisons)


def _spread(ratios: list[float]) -> str:
    """The lowest and highest of per-round ratios ("-" without any)."""
    if not ratios:
        return "-"
    low, high = min(ratios), max(ratios)
    return f"{low:.2f}×" if low == high else f"{low:.2f}–{high:.2f}×"


def _verdict(value: float, target: float) -> str:
    return f"{value:.2f}× (target ≥ {target:g}×: {'met' if value >= target else 'NOT met'})"


def target_lines(comparisons: list[Comparison]) -> list[str]:
    """Issue 21's targets, each with its measured ratio and whether it is met."""
    lines: list[str] = []
    for c in comparisons:
        where = f"{c.workload}, {c.streams} stream{'s' if c.streams > 1 else ''}"
        if c.workload == "edit":
            target = EDIT_SINGLE_TARGET if c.streams == 1 else EDIT_CONCURRENT_TARGET
            lines.append(f"{where}: with / without speculation {_verdict(c.with_vs_without, target)}")
            lines.append(f"{where}: with speculation / mlx_lm.server {_verdict(c.with_vs_theirs, target)}")
            same = "met" if c.identical == c.compared else "NOT met"
            lines.append(f"{where}: output identical with and without: {c.identical}/{c.compared} ({same})")
        else:
            cost = 1 - c.with_vs_without
            verdict = "met" if c.with_vs_without >= CHAT_COST_TARGET else "NOT met"
            cpu = f"; CPU per token with / without {c.cpu_with_vs_without:.3f}×" if c.cpu_with_vs_without else ""
            spread = f"; per round {_spread(c.round_ratios)}" if len(c.round_ratios) > 1 else ""
            lines.append(
                f"{where}: speculation costs {cost:.1%} tokens/s "
                f"(with / without {c.with_vs_without:.3f}×; target ≤ {1 - CHAT_COST_TARGET:.0%}: {verdict}"
                f"{spread}{cpu})"
            )
            if c.streams in DISTINCT_STREAMS:
                lines.append(
                    f"{where}: ours (speculation on) / mlx_lm.server {_verdict(c.with_vs_theirs, DISTINCT_TARGET)}"
                )
    return lines


def format_speculation(result: SpeculationResult) -> str:
    s = result.settings
    head = [
        f"bench engine --parts speculation — {result.model}, greedy, streamed — {result.machine}",
        f"edit: repeat a {len(EDIT_CODE.splitlines())}-line (~300-token) Python block with one function renamed, "
        f"max {s.edit_max_tokens} tokens; chat: distinct open questions, max {s.chat_max_tokens} tokens",
        f"{s.rounds} round(s) each, the three servers up at once and taking turns (reversed every other round), "
        f"prompts never sent before; ours: controller + 1 worker, worker.speculative_tokens = {s.draft_tokens} vs 0",
        *(
            [
                f"ours with speculation also drafts with a draft model: {result.model} cut to its first "
                f"{s.draft_layers} layers (worker.draft_model; drafted / accepted count both sources, "
                f"the draft model's own in brackets)"
            ]
            if s.draft_layers
            else []
        ),
        "",
    ]
    rows = [
        [
            m.workload,
            str(m.streams),
            m.server,
            str(m.requests),
            str(m.tokens),
            f"{m.seconds:.1f}",
            f"{m.tokens_per_s:.1f}",
            f"{m.ttft_p50_ms:.0f}",
            f"{m.decode_tokens_per_s:.1f}",
            f"{m.cpu_ms_per_token:.1f}" if m.cpu_ms_per_token else "-",
            f"{m.steps} / {m.drafted} / {m.accepted}"
            + (f" ({m.model_drafted} / {m.model_accepted})" if m.model_drafted else "")
            if m.steps
            else "-",
        ]
        for m in result.measures
    ]
    headers = [
        "workload",
        "streams",
        "server",
        "requests",
        "tokens",
        "seconds",
        "tok/s",
        "TTFT p50 ms",
        "decode tok/s",
        "CPU ms/tok",
    ]
    counted = "verify steps / drafted / accepted" + (" (the draft model's)" if s.draft_layers else "")
    body = [table([*headers, counted], rows, align="llllrrrrrrr")]
    ratios = [
        [
            c.workload,
            str(c.streams),
            f"{c.with_vs_without:.2f}×",
            _spread(c.round_ratios),
            f"{c.cpu_with_vs_without:.2f}×" if c.cpu_with_vs_without else "-",
            f"{c.with_vs_theirs:.2f}×",
            f"{c.without_vs_theirs:.2f}×",
            f"{c.decode_with_vs_without:.2f}×",
            f"{c.decode_with_vs_theirs:.2f}×",
            f"{c.acceptance_rate:.0%}",
            f"{c.accepted_share:.0%}",
            f"{c.tokens_per_step:.2f}" if c.tokens_per_step else "-",
            f"{c.identical}/{c.compared}",
            f"{c.identical_theirs}/{c.compared}",
        ]
        for c in result.comparisons
    ]
    headers = [
        "workload",
        "streams",
        "with / without",
        "per round",
        "CPU/tok: with / without",
        "with / mlx_lm",
        "without / mlx_lm",
        "decode: with / without",
        "with / mlx_lm",
        "acceptance",
        "drafted share",
        "tok per verify",
        "same text (with = without)",
        "mlx_lm = without",
    ]
    body += ["", table(headers, ratios)]
    notes = [
        f"{c.workload} ×{c.streams}: the replies (ours without speculation) reproduce {c.edit_recall:.0%} of the "
        f"expected code's lines (mean); {c.renamed}/{c.compared} renamed the function"
        for c in result.comparisons
        if c.workload == "edit"
    ]
    notes += [
        f"{c.workload} ×{c.streams}: first difference: {c.first_difference}"
        for c in result.comparisons
        if c.first_difference
    ]
    tail = [
        "tok/s: tokens over the rounds' wall time (prefill included: the targets' figure); decode tok/s: tokens "
        "after each first one over the time from a round's first token to its last",
        "per round: with / without tokens/s in each round, lowest to highest (their spread is this run's noise); "
        "CPU/tok: CPU seconds of each server's processes (all threads) per generated token, steadier than tokens/s "
        "on a shared machine",
        "acceptance: accepted / drafted tokens; drafted share: the share of generated tokens that were accepted "
        "drafts (accepted / tokens); tok per verify: 1 + accepted / verify steps",
        *notes,
        "",
        "targets (issue 21):",
        *target_lines(result.comparisons),
    ]
    return "\n".join(head + body + [""] + tail)
