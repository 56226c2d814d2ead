"""Speculative decoding with a draft model (``worker.draft_model``) inside the continuous batch.

On the tiny llama, side by side with mlx-lm's plain ``BatchGenerator`` over the same schedule of rows joining
at different steps: the output is token for token the same (greedy and seeded sampling), the draft model's
cache keeps one row per batch row holding exactly that row's tokens, a draft that is the target itself is
accepted whole, a draft model with another vocabulary is refused at load naming the key.

The tiny target costs about what its draft costs, so measured step costs would rarely let the draft model
run; the mechanism tests fix the costs to a GPU's shape (a forward of a few tokens costs about what one
does, a draft forward a tenth of it): :class:`FixedCost`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_speculation import PROMPTS, _collect, _load
from tiny_model import build_tiny_model

from mlxcluster.protocol import SamplingParams
from mlxcluster.worker.draft_model import DraftModel, DraftModelError
from mlxcluster.worker.engine import MlxEngine
from mlxcluster.worker.sampling import KeyedSampler
from mlxcluster.worker.speculation import StepCostModel, best_length


class FixedCost(StepCostModel):
    """``ms = c0 + c1 * tokens``, never learning from measured steps."""

    def __init__(self, c0: float, c1: float) -> None:
        super().__init__()
        self._fit = (c0, c1)

    def observe(self, tokens: int, ms: float) -> None:
        pass


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("draft")
    return {
        "target": build_tiny_model(root / "target"),
        "other": build_tiny_model(root / "other", seed=1),  # same tokenizer, other weights
        "foreign": build_tiny_model(root / "foreign", vocab_size=300),  # another vocabulary
    }


SCHEDULE = [(0, 0, 60), (0, 1, 23), (3, 2, 45), (7, 0, 31), (12, 1, 60)]
"""(step at which the row joins, prompt, max_tokens): rows join while others decode and end at other lengths."""


def _run(
    model: Any,
    prompts: list[list[int]],
    *,
    draft: Any = None,
    samplers: Any = None,
    stop: list[list[int]] | None = None,
    check: Any = None,
    schedule: list[tuple[int, int, int]] = SCHEDULE,
) -> tuple[list[list[int]], list[str], Any]:
    """Every scheduled row's tokens and finish reason, and the generator; with ``draft``, speculating with that
    draft model (fixed GPU-shaped costs), calling ``check(batch)`` after each step."""
    from mlx_lm.generate import BatchGenerator

    from mlxcluster.worker.speculative_batch import SpeculativeBatchGenerator

    options: dict[str, Any] = {"completion_batch_size": 8, "prefill_batch_size": 8, "stop_tokens": stop}
    if draft is not None:
        generator = SpeculativeBatchGenerator(model, draft_model=draft, **options)
        batch = generator._generation_batch
        batch.cost = FixedCost(10.0, 0.01)
        assert batch.draft is not None
        batch.draft.cost = FixedCost(1.0, 0.01)
    else:
        generator = BatchGenerator(model, **options)
    uids: list[int] = []
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    for step in range(1000):
        for at, (joins, prompt, max_tokens) in enumerate(schedule):
            if joins == step:
                row_samplers = [samplers[at]] if samplers is not None else None
                (uid,) = generator.insert([prompts[prompt]], max_tokens=[max_tokens], samplers=row_samplers)
                uids.append(uid)
                tokens[uid] = []
        if len(reasons) == len(schedule):
            break
        for response in generator.next_generated():
            tokens[response.uid].append(response.token)
            if response.finish_reason is not None:
                reasons[response.uid] = response.finish_reason
        if check is not None:
            check(generator._generation_batch)
    generator.close()
    return [tokens[uid] for uid in uids], [reasons[uid] for uid in uids], generator


def _check_in_sync(batch: Any) -> None:
    """The draft cache has the batch's rows, each holding exactly the tokens it has seen, a prefix of the row's."""
    draft: DraftModel = batch.draft
    assert len(draft) == len(batch.uids)
    assert draft.lengths() == draft.seen
    assert not any(draft.drafted)  # settled after every verify
    for seen, row in zip(draft.seen, batch.tokens, strict=True):
        assert 0 < seen <= len(row) + 1


def test_a_self_draft_is_accepted_whole_and_changes_nothing(models: dict[str, Path]) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = _load(models["target"])
    draft_model, _ = _load(models["target"])
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference, _, _ = _run(model, prompts)
    stop = [reference[0][:25]]  # rows longer than 25 tokens stop there (inside accepted drafts), one of 23 does not
    plain, plain_reasons, _ = _run(model, prompts, stop=stop)
    compared: list[bool] = []

    def check(batch: Any) -> None:
        _check_in_sync(batch)
        draft: DraftModel = batch.draft
        if len(draft) > 1 and not compared:  # row 1's draft cache is its tokens' keys, as a fresh prefill has them
            seen = draft.seen[1]
            fresh = make_prompt_cache(draft_model)
            draft_model(mx.array(batch.tokens[1][:seen])[None], cache=fresh)
            ours = draft.cache[0].extract(1)
            assert ours.offset == seen
            assert mx.allclose(ours.keys[..., :seen, :], fresh[0].keys[..., :seen, :], atol=1e-4).item()
            compared.append(True)

    spec, reasons, generator = _run(model, prompts, draft=draft_model, stop=stop, check=check)
    assert spec == plain and reasons == plain_reasons
    assert "stop" in reasons and "length" in reasons and compared
    draft = generator._generation_batch.draft
    assert generator.speculation.accepted > 0 and generator.speculation.model_accepted > 0
    assert len(draft) == 0 and draft.cache == []  # every row left


def test_the_draft_models_own_drafts_are_all_accepted_when_it_is_the_target(models: dict[str, Path]) -> None:
    """Counted apart from prompt-lookup drafts: every token the self-draft drafted was the target's choice."""
    from mlxcluster.worker.speculative_batch import SpeculativeBatchGenerator

    model, tokenizer = _load(models["target"])
    draft_model, _ = _load(models["target"])
    generator = SpeculativeBatchGenerator(model, draft_model=draft_model, completion_batch_size=4)
    batch = generator._generation_batch
    batch.cost = FixedCost(10.0, 0.01)
    batch.draft.cost = FixedCost(1.0, 0.01)
    generator.insert([tokenizer.encode(p) for p in PROMPTS[:2]], max_tokens=[40, 40])
    finished = 0
    while finished < 2:
        finished += sum(r.finish_reason is not None for r in generator.next_generated())
    generator.close()
    stats = generator.speculation
    assert stats.model_drafted > 20
    assert stats.model_accepted == stats.model_drafted
    assert stats.drafted >= stats.model_drafted and stats.accepted >= stats.model_accepted


def test_a_partly_accepted_draft_and_sampled_rows_change_nothing(models: dict[str, Path]) -> None:
    """A layer-skip draft (the target's first layer of two: partly accepted, so rows keep different counts of
    their drafted tokens in the draft cache) and seeded sampled rows: the tokens plain decoding gives with the
    same seeds, the draft cache in sync throughout."""
    model, tokenizer = _load(models["target"])
    other, _ = _load(models["target"])
    other.model.layers = other.model.layers[:1]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    vocab = model.args.vocab_size
    params = SamplingParams(temperature=0.1, top_p=0.95)

    def samplers() -> list[Any]:  # rows 1 and 3 sampled, the others greedy
        return [None if i % 2 == 0 else KeyedSampler(params, 7 + i, vocab) for i in range(len(SCHEDULE))]

    plain, plain_reasons, _ = _run(model, prompts, samplers=samplers())
    spec, reasons, generator = _run(model, prompts, draft=other, samplers=samplers(), check=_check_in_sync)
    assert spec == plain and reasons == plain_reasons
    stats = generator.speculation
    assert 0 < stats.model_accepted < stats.model_drafted


def test_a_draft_model_that_is_never_right_backs_off(models: dict[str, Path]) -> None:
    """Another model with the same tokenizer (never accepted here) is priced at its own acceptance, not at the
    rows' (which prompt lookup may hold high): after its first misses it runs on few steps (tried again now and
    then as its estimate drifts back toward the prior), and the output is plain decoding's."""
    model, tokenizer = _load(models["target"])
    other, _ = _load(models["other"])
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    schedule = [(0, 0, 120), (0, 1, 120)]
    plain, _, _ = _run(model, prompts, schedule=schedule)
    drafted_at: list[int] = []
    steps = [0]

    def check(batch: Any) -> None:
        steps[0] += 1
        if batch.stats.model_drafted > sum(drafted_at[-1:]):
            drafted_at.append(batch.stats.model_drafted)

    spec, _, generator = _run(model, prompts, draft=other, schedule=schedule, check=check)
    assert spec == plain
    assert generator.speculation.model_accepted == 0
    assert 2 <= len(drafted_at) < steps[0] / 4  # run, judged poor, tried again now and then only


def test_the_draft_cost_counts_in_the_length() -> None:
    from mlxcluster.worker.speculation import RowDrafts

    flat = FixedCost(10.0, 0.01)
    sure = RowDrafts(hits=9.0, trials=10.0)
    assert best_length([8], [sure], flat, 8) == 9
    assert best_length([8], [sure], flat, 8, draft_ms=lambda n: 1.0 * n) > 1
    assert best_length([8], [sure], flat, 8, draft_ms=lambda n: 20.0 * n) == 1  # a draft dearer than a step


async def test_the_engine_drafts_with_its_draft_model_and_refuses_another_vocabulary(
    models: dict[str, Path],
) -> None:
    texts = {}
    for draft in (None, models["other"]):
        engine = MlxEngine(
            str(models["target"]), max_concurrent=4, draft_model=str(draft) if draft else None, prompt_cache_bytes=0
        )
        await engine.start()
        try:
            assert (engine._draft is not None) == (draft is not None)
            assert ("draft_model" in engine.info().details) == (draft is not None)
            texts[draft] = [await _collect(engine, PROMPTS[1], 30, seed=4), await _collect(engine, PROMPTS[0], 30)]
        finally:
            await engine.stop()
    assert texts[None] == texts[models["other"]]

    off = MlxEngine(str(models["target"]), speculative_tokens=0, draft_model=str(models["other"]), prompt_cache_bytes=0)
    await off.start()
    try:
        assert off._draft is None  # no speculation: the draft model is not even loaded
    finally:
        await off.stop()

    foreign = MlxEngine(str(models["target"]), draft_model=str(models["foreign"]), prompt_cache_bytes=0)
    with pytest.raises(DraftModelError, match=r"worker\.draft_model .*foreign.*tokens"):
        await foreign.start()


def test_the_worker_gives_the_draft_model_to_the_model_it_starts_with(models: dict[str, Path], tmp_path: Path) -> None:
    """``worker.draft_model`` is resolved like ``worker.model`` and drafts for that model only; one that cannot
    be had fails naming the key."""
    import msgspec

    from mlxcluster.config import Config, ModelsSection, WorkerSection
    from mlxcluster.errors import NodeError
    from mlxcluster.protocol import CatalogueModel
    from mlxcluster.worker.catalogue import CatalogueEntry
    from mlxcluster.worker.memory_budget import MemoryBudget
    from mlxcluster.worker.worker_role import draft_model_path, engine_factory, prepare_model

    target, other = str(models["target"]), str(models["other"])
    worker = WorkerSection(model=target, draft_model=other)
    config = msgspec.structs.replace(Config(), worker=worker, models=ModelsSection(dir=str(tmp_path)))
    factory = engine_factory(config, MemoryBudget(1 << 30))
    started = factory(CatalogueEntry("target", target, target, CatalogueModel(name="target")))
    on_demand = factory(CatalogueEntry("other", other, other, CatalogueModel(name="other")))
    assert isinstance(started, MlxEngine) and started.draft_model == other
    assert isinstance(on_demand, MlxEngine) and on_demand.draft_model is None
    assert prepare_model(config) is not None
    missing = msgspec.structs.replace(config, worker=WorkerSection(model=target, draft_model="no-such-model"))
    with pytest.raises(NodeError, match=r"^worker\.draft_model: no model 'no-such-model'"):
        draft_model_path(missing)
    with pytest.raises(NodeError, match=r"^worker\.draft_model"):
        prepare_model(missing)


def test_the_bench_makes_a_layer_skip_draft_and_hands_it_to_the_speculating_cluster(
    models: dict[str, Path], tmp_path: Path
) -> None:
    import mlx_lm

    from mlxcluster.bench.layer_skip import make_layer_skip_draft
    from mlxcluster.bench.speculation import SpeculationSettings, cluster_envs
    from mlxcluster.config import load
    from mlxcluster.worker.draft_model import check_draft_model

    made = make_layer_skip_draft(models["target"], 1, tmp_path / "draft")
    draft, draft_tokenizer, config = mlx_lm.load(str(made), return_config=True)
    assert config["num_hidden_layers"] == 1 and len(draft.model.layers) == 1
    check_draft_model(_load(models["target"])[1], draft, draft_tokenizer, name=str(made))
    with pytest.raises(ValueError, match="1 to 1 of target's 2 layers, not 2"):
        make_layer_skip_draft(models["target"], 2, tmp_path / "whole")
    speculating, plain = cluster_envs(SpeculationSettings(draft_layers=1), str(made))
    assert load(env=speculating).worker.draft_model == str(made)
    assert load(env=plain).worker.draft_model == "" and load(env=plain).worker.speculative_tokens == 0


class _Tokenizer:
    """What the check reads of a tokenizer."""

    def __init__(self, vocab: dict[str, int], eos: tuple[int, ...] = (0,), split: bool = False) -> None:
        self.vocab, self.eos_token_ids, self.split = vocab, list(eos), split

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in (text.split() if self.split else [text])]


def test_each_difference_that_drafting_cannot_bridge_is_named() -> None:
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from mlxcluster.worker.draft_model import check_draft_model

    class Draft:
        def __init__(self, width: int, rotating: bool = False) -> None:
            self.args = type("Args", (), {"vocab_size": width})()
            self.rotating = rotating

        def make_cache(self) -> list[Any]:
            return [RotatingKVCache(max_size=8) if self.rotating else KVCache()]

    vocab = {"a": 0, "b": 1, "c": 2}
    base = _Tokenizer(vocab)
    check_draft_model(base, Draft(3), _Tokenizer(dict(vocab)), name="d")  # the same: accepted
    cases = {
        "vocabulary differs": (_Tokenizer({"a": 0, "b": 2, "c": 1}), Draft(3)),
        "encodes": (_Tokenizer(dict(vocab), split=True), Draft(3)),
        "end-of-sequence": (_Tokenizer(dict(vocab), eos=(1,)), Draft(3)),
        "2 logits, fewer than the tokenizer's 3": (_Tokenizer(dict(vocab)), Draft(2)),
        "RotatingKVCache": (_Tokenizer(dict(vocab)), Draft(3, rotating=True)),
    }
    for why, (tokenizer, draft) in cases.items():
        with pytest.raises(DraftModelError, match=rf"^worker\.draft_model d: .*{why}"):
            check_draft_model(base, draft, tokenizer, name="d")


async def test_a_model_that_cannot_draft_does_not_load_its_draft_model(family_models: Any) -> None:
    """Gemma 3's sliding-window layers cannot drop positions per row: the draft model is not even loaded."""
    path = str(family_models.path("gemma3"))
    engine = MlxEngine(path, draft_model=path, prompt_cache_bytes=0)
    await engine.start()
    try:
        assert engine._draft is None and "draft_model" not in engine.info().details
    finally:
        await engine.stop()


class _CountingModel:
    """A model whose forwards are counted (everything else is the model's)."""

    def __init__(self, model: Any) -> None:
        self.model, self.forwards = model, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.forwards += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_rows_joining_together_are_prefilled_in_one_forward_per_chunk(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of unequal lengths joining at once (a short one left-padded, longer ones over the chunk, one so short
    it is prefilled in a group of its own) draft what they draft when joined one at a time, their caches hold
    the same keys, and each group costs one forward per chunk of its longest row."""
    import mlx.core as mx

    from mlxcluster.worker import draft_model

    monkeypatch.setattr(draft_model, "PREFILL_CHUNK", 32)
    model, tokenizer = _load(models["target"])
    text = tokenizer.encode(" ".join(PROMPTS) * 16)
    rows = [text[:70], text[5:25], text[9:54], text[1:401], text[3:4]]
    assert [len(row) for row in rows] == [70, 20, 45, 400, 1]
    assert draft_model.prefill_groups([len(row) for row in rows]) == [[3], [0, 1, 2], [4]]
    pending = [row[-1] + 1 for row in rows]
    present = text[20:60]

    counted = _CountingModel(model)
    together, alone = DraftModel(counted), DraftModel(model)
    for draft in (together, alone):
        draft.extend([present])  # a row already in the batch
        draft.draft([present], [7], 3)
        draft.settle([[]])
    counted.forwards = 0
    together.extend(rows)
    assert counted.forwards == 13 + 3 + 1  # per group: 400, 70 and 1 positions in chunks of 32 (alone: 20)
    for row in rows:
        alone.extend([row])
    assert together.seen == alone.seen == [len(present) + 1, *(len(row) for row in rows)]
    assert together.lengths() == together.seen
    for ours, theirs in zip(together.cache, alone.cache, strict=True):
        for i, seen in enumerate(together.seen):
            mine, reference = ours.extract(i), theirs.extract(i)
            assert mine.offset == reference.offset == seen
            assert mx.allclose(mine.keys, reference.keys, atol=1e-4).item()
            assert mx.allclose(mine.values, reference.values, atol=1e-4).item()
    sequences = [[*present, 7], *rows]
    assert together.draft(sequences, [3, *pending], 6) == alone.draft(sequences, [3, *pending], 6)


def test_prefill_groups_pad_similar_rows_together_only() -> None:
    from mlxcluster.worker.draft_model import prefill_groups

    assert prefill_groups([40, 33, 50, 47, 30, 41, 38, 45]) == [list(range(8))]  # eight chats: one forward
    assert prefill_groups([40] * 3 + [2000] + [40] * 4) == [[3], [0, 1, 2, 4, 5, 6, 7]]
    assert prefill_groups([1, 20]) == [[0, 1]]  # a little padding is free
    assert prefill_groups([]) == []
