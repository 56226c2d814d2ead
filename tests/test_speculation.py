"""Speculative decoding in the batch: prompt-lookup drafts verified per row, output unchanged.

The policy's arithmetic is tested alone; the mechanism on the tiny llama, side by side with mlx-lm's own
``BatchGenerator`` over the same prompts: greedy output token for token the same, the finished rows' KV
caches the same (accepted drafts extend the cache exactly like decoded tokens), and drafts really
accepted (the tiny model's greedy text loops, so its own output is a good place to look up).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tiny_model import build_tiny_model

from mlxcluster.protocol import Done, Error, InferenceRequest, Progress, SamplingParams, Token
from mlxcluster.worker.engine import MlxEngine
from mlxcluster.worker.ngram_index import NGramIndex
from mlxcluster.worker.sampling import KeyedSampler
from mlxcluster.worker.speculation import RowDrafts, StepCostModel, best_length

# --- the arithmetic -------------------------------------------------------------------------------


def test_the_index_proposes_what_followed_the_longest_earlier_match() -> None:
    index = NGramIndex(sizes=(3, 2))
    index.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2])
    assert index.propose(3, 4) == [7, 8, 2]  # (8, 2, 3) never occurred; (2, 3) was last followed by 7 8 2
    index.extend([1, 2])
    assert index.propose(3, 3) == [4, 5, 9]  # (1, 2, 3) occurred at the start: the longer match wins
    assert index.propose(6, 3) == []
    assert index.propose(3, 0) == []
    assert index.continuation(4) == [3, 4, 5, 9]  # the tail (1, 2) occurred before: 3 is the guess, then a draft
    index.extend([42])
    assert index.continuation(4) == []
    grown = NGramIndex(sizes=(3, 2))
    grown.sync([1, 2, 3])
    grown.sync([1, 2, 3, 1, 2])  # catches up with a longer sequence
    assert grown.tokens == [1, 2, 3, 1, 2] and grown.propose(3, 2) == [1, 2]


def test_a_row_learns_its_acceptance_and_backs_off() -> None:
    row = RowDrafts()
    assert row.expected(2) == pytest.approx(0.8 + 0.64)
    row.verified(4, 4)
    confident = row.acceptance
    assert confident > 0.8
    for _ in range(2):
        row.verified(4, 0)
    assert row.acceptance < confident - 0.2
    assert not row.ready()  # two drafts in a row with nothing accepted: drafting pauses
    paused = 1
    while not row.ready():
        paused += 1
    assert paused == 4
    row.verified(3, 0)
    row.verified(3, 0)
    paused = 0
    while not row.ready():
        paused += 1
    assert paused == 8  # the pause doubles while drafts keep failing


def test_the_length_follows_the_machine_and_the_acceptance() -> None:
    flat = StepCostModel()  # a GPU: a forward of a few tokens costs about what one costs
    for tokens, ms in ((1, 10.0), (9, 10.5), (8, 10.4), (64, 14.0)):
        flat.observe(tokens, ms)
    sure, unsure = RowDrafts(hits=9.0, trials=10.0), RowDrafts(hits=1.0, trials=10.0)
    assert best_length([8], [sure], flat, 8) == 9
    assert best_length([8], [unsure], flat, 8) >= 2  # cheap enough to try even so
    steep = StepCostModel()  # this CPU at batch 8: each extra token of the batch costs a tenth of a step
    for tokens, ms in ((8, 134.0), (16, 193.0), (40, 371.0)):
        steep.observe(tokens, ms)
    assert best_length([4] + [0] * 7, [unsure] + [None] * 7, steep, 8) == 1
    assert best_length([8] * 8, [sure] * 8, steep, 8) > 1
    assert best_length([0, 0], [None, None], flat, 8) == 1
    c0, c1 = steep.coefficients()
    assert c0 == pytest.approx(75, abs=2) and c1 == pytest.approx(7.4, abs=0.2)


# --- the mechanism, on the tiny llama ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


PROMPTS = [
    "The capital of France is Paris. The capital of France is",
    "def f(x):\n    return x + 1\ndef f(x):\n",
    "Hello world! Hello",
]


def _generate(model: Any, prompts: list[list[int]], *, speculative: bool, **options: Any) -> dict[str, Any]:
    """Every row's tokens and its finished response, plain mlx-lm or speculative."""
    from mlx_lm.generate import BatchGenerator

    from mlxcluster.worker.speculative_batch import SpeculativeBatchGenerator

    max_tokens = options.pop("max_tokens", [60] * len(prompts))
    processors = options.pop("logits_processors", None)
    samplers = options.pop("samplers", None)
    if speculative:
        generator = SpeculativeBatchGenerator(model, completion_batch_size=8, prefill_batch_size=8, **options)
    else:
        generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8, **options)
    uids = generator.insert(prompts, max_tokens=max_tokens, logits_processors=processors, samplers=samplers)
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    finished: dict[int, Any] = {}
    for _ in range(1000):
        if len(finished) == len(uids):
            break
        for response in generator.next_generated():
            assert response.uid not in finished
            tokens[response.uid].append(response.token)
            if response.finish_reason is not None:
                finished[response.uid] = response
    generator.close()
    return {
        "tokens": [tokens[uid] for uid in uids],
        "finished": [finished[uid] for uid in uids],
        "stats": getattr(generator, "speculation", None),
    }


def _load(path: Path) -> tuple[Any, Any]:
    from mlx_lm import load

    model, tokenizer = load(str(path))[:2]
    return model, tokenizer


def test_greedy_output_and_caches_are_those_of_plain_decoding(tiny_model: Path) -> None:
    import mlx.core as mx

    model, tokenizer = _load(tiny_model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    plain = _generate(model, prompts, speculative=False)
    spec = _generate(model, prompts, speculative=True)
    assert spec["tokens"] == plain["tokens"]
    assert spec["stats"].accepted > 0 and spec["stats"].steps > 0
    for ours, theirs in zip(spec["finished"], plain["finished"], strict=True):
        assert ours.finish_reason == theirs.finish_reason == "length"
        assert ours.all_tokens == theirs.all_tokens
        for a, b in zip(ours.prompt_cache, theirs.prompt_cache, strict=True):
            assert a.offset == b.offset == len(ours.all_tokens)
            assert mx.allclose(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :], atol=1e-4).item()
            assert mx.allclose(a.values[..., : a.offset, :], b.values[..., : b.offset, :], atol=1e-4).item()


def test_rows_stop_where_plain_decoding_stops(tiny_model: Path) -> None:
    """``max_tokens`` and a stop token both land inside accepted drafts; the rows end exactly there."""
    model, tokenizer = _load(tiny_model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference = _generate(model, prompts, speculative=False)["tokens"]
    stop = reference[0][7:27]  # a 20-token stop sequence: it completes well after drafting started
    options = {"max_tokens": [60, 17, 41], "stop_tokens": [stop]}
    plain = _generate(model, prompts, speculative=False, **dict(options))
    spec = _generate(model, prompts, speculative=True, **dict(options))
    assert spec["tokens"] == plain["tokens"]
    reasons = [r.finish_reason for r in spec["finished"]]
    assert reasons == [r.finish_reason for r in plain["finished"]]
    assert "stop" in reasons and "length" in reasons
    assert len(spec["tokens"][1]) == 17 and 20 < len(spec["tokens"][0]) < 60
    for response in spec["finished"]:
        assert response.prompt_cache[0].offset == len(response.all_tokens)
    assert spec["stats"].accepted > 0


def test_rows_that_cannot_draft_decode_beside_those_that_do(tiny_model: Path) -> None:
    """A row with logits processors never drafts; it decodes in the same forwards, its output unchanged."""
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = _load(tiny_model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    penalty = make_logits_processors(repetition_penalty=1.3)
    options = {"logits_processors": [[], penalty, []]}
    plain = _generate(model, prompts, speculative=False, **dict(options))
    spec = _generate(model, prompts, speculative=True, **dict(options))
    assert spec["tokens"] == plain["tokens"]
    assert spec["stats"].accepted > 0


def test_sampled_rows_draft_and_draw_the_tokens_plain_sampling_draws(tiny_model: Path) -> None:
    """A seeded sampled row accepts a drafted token when its draw (with the key plain decoding would use for
    that token) equals it: the same tokens as plain sampling with the same seeds, and drafts accepted (every
    row samples, so the accepted drafts are sampled rows')."""
    model, tokenizer = _load(tiny_model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # a low temperature: the random model's logits are nearly flat; at 0.1 its text still differs from greedy
    params = [SamplingParams(temperature=0.1, top_p=0.95), SamplingParams(temperature=0.1, top_k=20)] * 2
    vocab = model.args.vocab_size

    def samplers(seeds: tuple[int, ...] = (7, 11, 5)) -> list[Any]:
        return [KeyedSampler(p, seed, vocab) for p, seed in zip(params, seeds, strict=False)]

    plain = _generate(model, prompts, speculative=False, samplers=samplers())
    spec = _generate(model, prompts, speculative=True, samplers=samplers())
    assert spec["tokens"] == plain["tokens"]
    assert spec["stats"].accepted > 0
    other_seeds = _generate(model, prompts, speculative=True, samplers=samplers((8, 12, 6)))
    assert other_seeds["tokens"] != plain["tokens"]  # the draws really are the seeds'


# --- through the engine --------------------------------------------------------------------------------


async def _collect(engine: MlxEngine, prompt: str, max_tokens: int, seed: int | None = None) -> str:
    request = InferenceRequest(
        request_id=f"r{abs(hash(prompt)) % 10_000}-{seed}",
        model="tiny",
        prompt=prompt,
        sampling=SamplingParams(temperature=0.0 if seed is None else 0.1),
        seed=seed,
        max_tokens=max_tokens,
    )
    text = []
    async for frame in engine.generate(request):
        if isinstance(frame, Token):
            text.append(frame.text)
        elif isinstance(frame, Error):
            raise AssertionError(frame)
        else:
            assert isinstance(frame, Done | Progress), frame
    return "".join(text)


async def test_the_engine_speculates_without_changing_the_text(tiny_model: Path) -> None:
    texts = {}
    for tokens in (0, 8):
        engine = MlxEngine(str(tiny_model), max_concurrent=4, speculative_tokens=tokens, prompt_cache_bytes=0)
        await engine.start()
        try:
            sampled = await _collect(engine, PROMPTS[1], 50, seed=4)  # alone, through the engine's guarded sampler
            alone = engine.speculation_stats()
            texts[tokens] = [sampled, *await asyncio.gather(*(_collect(engine, p, 50) for p in PROMPTS))]
            stats = engine.speculation_stats()
        finally:
            await engine.stop()
        if tokens:
            assert alone is not None and alone.accepted > 0  # the seeded sampled request drafted
            assert stats is not None and stats.accepted > alone.accepted and stats.drafted >= stats.accepted
        else:
            assert stats is None
    assert texts[8] == texts[0]
    assert all(len(t) > 20 for t in texts[0])


async def test_a_grammar_row_drafts_within_its_grammar(tiny_model: Path) -> None:
    """A drafted token the grammar forbids ends the draft; the accepted ones advance the grammar as decoded
    ones do: the JSON is the same with and without speculation, and drafts were accepted."""
    from mlxcluster.protocol import ChatMessage, ResponseFormat

    words = {"type": "string", "enum": ["fox jumps", "lazy dog", "Paris"]}
    schema = {"type": "array", "items": words, "minItems": 8, "maxItems": 8}
    texts = {}
    for tokens in (0, 8):
        engine = MlxEngine(str(tiny_model), max_concurrent=2, speculative_tokens=tokens, prompt_cache_bytes=0)
        await engine.start()
        try:
            request = InferenceRequest(
                request_id="json",
                model="tiny",
                messages=[ChatMessage(role="user", content="The quick brown fox jumps over the lazy dog.")],
                sampling=SamplingParams(temperature=0.0),
                max_tokens=60,
                response_format=ResponseFormat(type="json_schema", schema=schema),
            )
            text = []
            async for frame in engine.generate(request):
                if isinstance(frame, Token):
                    text.append(frame.text)
                assert not isinstance(frame, Error), frame
            texts[tokens] = "".join(text)
            stats = engine.speculation_stats()
        finally:
            await engine.stop()
        if tokens:
            assert stats is not None and stats.accepted > 0
    assert texts[8] == texts[0]
    assert texts[0].startswith('["') and texts[0].count('"') >= 6


def test_real_text_with_rejected_drafts_is_unchanged() -> None:
    """On the demo model's real text drafts are partly rejected (rows accept different counts, so the cache
    goes ragged): the text and the finished caches are still those of plain decoding."""
    import mlx.core as mx
    from cluster_harness import demo_model_or_skip

    model, tokenizer = _load(Path(demo_model_or_skip()))
    code = "def area(width, height):\n    return width * height\n\ndef perimeter(width, height):\n"
    messages = [
        f"Return this code with area renamed to surface:\n{code}",
        "Copy this text: The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    ]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True) for m in messages
    ]
    plain = _generate(model, prompts, speculative=False, max_tokens=[40, 40])
    spec = _generate(model, prompts, speculative=True, max_tokens=[40, 40])
    assert spec["tokens"] == plain["tokens"]
    stats = spec["stats"]
    assert 0 < stats.accepted < stats.drafted
    for ours, theirs in zip(spec["finished"], plain["finished"], strict=True):
        assert ours.all_tokens == theirs.all_tokens
        for a, b in zip(ours.prompt_cache, theirs.prompt_cache, strict=True):
            assert a.offset == b.offset == len(ours.all_tokens)
            assert mx.allclose(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :], atol=1e-3).item()


def test_the_ragged_cache_keeps_each_rows_tokens_exactly() -> None:
    """Rows cut by different amounts, written at their own ends, re-aligned, extended, trimmed and filtered:
    each row's extracted cache is always exactly the keys and values of its own tokens, in order."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    from mlxcluster.worker.ragged_cache import RaggedKVCache

    def kv(n: int, seed: int) -> mx.array:
        return mx.random.normal((1, 2, n, 4), key=mx.random.key(seed))

    def single(n: int, seed: int) -> KVCache:
        cache = KVCache()
        cache.update_and_fetch(kv(n, seed), kv(n, seed + 100))
        return cache

    rows = [[kv(3, 1)], [kv(5, 2)]]  # the keys each row should hold
    ragged = RaggedKVCache.adopt(BatchKVCache.merge([single(3, 1), single(5, 2)]))
    ragged.step = 4  # grow in small steps, so writes past the buffer are exercised
    new = mx.random.normal((2, 2, 3, 4), key=mx.random.key(7))
    ragged.update_and_fetch(new, new)
    ragged.trim_rows([2, 0])  # row 0 keeps 1 of the 3 new positions, row 1 all 3
    rows[0].append(new[0:1, :, :1])
    rows[1].append(new[1:2, :, :3])
    assert not ragged.aligned and ragged.ends[0] < ragged.ends[1]
    mask = ragged.make_mask(2)
    assert mask.shape == (2, 1, 2, ragged._idx + 2)
    more = mx.random.normal((2, 2, 2, 4), key=mx.random.key(8))
    ragged.update_and_fetch(more, more)  # written at each row's own end
    rows[0].append(more[0:1])
    rows[1].append(more[1:2])
    assert ragged.offset.tolist() == [6, 10]

    def check(cache: RaggedKVCache, expected: list[list[mx.array]]) -> None:
        for index, parts in enumerate(expected):
            keys = mx.concatenate(parts, axis=2)
            extracted = cache.extract(index)
            assert extracted.offset == keys.shape[2]
            assert mx.allclose(extracted.keys, keys).item()

    check(ragged, rows)
    ragged.extend(BatchKVCache.merge([single(4, 3)]))  # a row joins: the others are aligned first
    rows.append([kv(4, 3)])
    assert ragged.aligned
    check(ragged, rows)
    ragged.filter([0, 2])
    check(ragged, [rows[0], rows[2]])
    assert ragged.trim(1) == 1 and ragged.aligned
    assert ragged.extract(0).offset == 5 and ragged.extract(1).offset == 3


class _Judge:
    """A draftable logits processor that allows at most ``allow`` drafted tokens and records rollbacks."""

    draftable = True

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.rolled_back = 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        return logits

    def valid_prefix(self, tokens: list[int]) -> int:
        return min(self.allow, len(tokens))

    def rollback(self, count: int) -> None:
        self.rolled_back += count


@pytest.mark.parametrize("allow", [0, 1])
def test_a_processor_cuts_drafts_down_to_nothing_or_one(tiny_model: Path, allow: int) -> None:
    """A grammar that allows none of a draft makes the row's step a plain one; one that allows a token keeps
    just that; the text stays that of plain decoding either way."""
    model, tokenizer = _load(tiny_model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    plain = _generate(model, prompts, speculative=False)
    judges = [_Judge(allow) for _ in prompts]
    spec = _generate(model, prompts, speculative=True, logits_processors=[[judge] for judge in judges])
    assert spec["tokens"] == plain["tokens"]
    stats = spec["stats"]
    if allow == 0:
        assert stats.steps > 0 and stats.drafted == 0  # verify forwards ran, every draft was cut to nothing
    else:
        assert 0 < stats.accepted <= stats.drafted <= stats.steps * len(prompts)  # one drafted token a row


def test_the_engines_counters_are_the_heartbeats_fields() -> None:
    """The engine hands its counters to the heartbeat field for field: each must exist on both sides."""
    import dataclasses

    from mlxcluster.protocol import SpeculationCounts
    from mlxcluster.worker.speculation import SpeculationStats

    assert {f.name for f in dataclasses.fields(SpeculationStats)} == set(SpeculationCounts.__struct_fields__)
    stats = SpeculationStats(steps=2, drafted=9, accepted=5, model_drafted=4, model_accepted=1)
    assert SpeculationCounts(**dataclasses.asdict(stats)) == SpeculationCounts(2, 9, 5, 4, 1)
