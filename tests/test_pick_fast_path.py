"""The pick's fast path on the registry's list (lent, with ``positions``, ``loads``, ``by_load``) picks exactly
what the straightforward definition picks: ``cache_aware`` and ``least_utilized`` on randomized fleets, the
list a balancer gets is read-only and its hints follow every load change."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from mlxcluster.api import BalancerContext, Cursor, EligibleWorkers, InferenceRequest, WorkerView, least_utilized
from mlxcluster.builtin.cache_aware import CacheAware
from mlxcluster.config import LoadBalancingSection, from_dict
from mlxcluster.controller.routing.balancing import PreferredTier
from mlxcluster.controller.routing.cache_index import CacheIndex
from mlxcluster.controller.routing.registry import WorkerRegistry
from mlxcluster.prefix_digest import canonical_text, prefix_digests
from mlxcluster.protocol import CacheEvent, Capabilities, ChatMessage, WorkerHeartbeat, WorkerRegistration

MODEL = "m"
SYSTEM = "You are the assistant every team here shares; follow the house rules. " * 12  # 3 blocks
TURNS = [f"turn {n} of the one conversation everybody continues " * 5 for n in range(4)]  # a block or more each


def prompt(turns: int) -> list[ChatMessage]:
    """The shared system prompt and the first ``turns`` turns of one conversation."""
    return [ChatMessage(role="system", content=SYSTEM)] + [
        ChatMessage(role="user" if i % 2 == 0 else "assistant", content=TURNS[i]) for i in range(turns)
    ]


def fleet(rng: random.Random, size: int, capacity: int) -> tuple[WorkerRegistry, CacheIndex]:
    """``size`` workers (shuffled registration order), random loads, each holding a random depth of the
    conversation (nothing, the system prompt, or some turns)."""
    registry, index = WorkerRegistry(from_dict({})), CacheIndex()
    ids = [f"w{i:03d}" for i in range(size)]
    rng.shuffle(ids)
    for worker_id in ids:
        registry.on_registration(
            WorkerRegistration(worker_id=worker_id, capabilities=Capabilities(max_concurrent=capacity, models=[MODEL]))
        )
        registry.on_heartbeat(
            WorkerHeartbeat(worker_id=worker_id, active=rng.randint(0, capacity // 2), models_loaded=[MODEL])
        )
        for _ in range(rng.choice((0, 0, 0, 1, capacity))):  # a few saturated
            registry.begin(worker_id)
        depth = rng.choice((-1, -1, 0, 0, 1, 2, 3, 4))
        if depth >= 0:
            digests = prefix_digests(canonical_text(prompt(depth), None))
            index.apply(CacheEvent(worker_id=worker_id, model=MODEL, instance=1.0, seq=1, reset=True, stored=digests))
    return registry, index


def straightforward(
    workers: Sequence[WorkerView], held: dict[str, int], blocks: int, section: LoadBalancingSection
) -> str | None:
    """cache_aware as its docstring defines it, written plainly: the id of the holder it follows, or ``None``
    where it goes to the least loaded worker."""
    settings = section.cache_aware
    loads = [w.load for w in workers]
    if not held:
        return None
    lowest, highest = min(loads), max(loads)
    if highest - lowest > settings.balance_abs_threshold and highest > settings.balance_rel_threshold * lowest:
        return None
    scored = [
        (held[w.id] / blocks - settings.load_weight * w.load / w.max_concurrent, -w.load, _Desc(w.id), w)
        for w in workers
        if w.id in held and w.load < w.max_concurrent
    ]
    if not scored:
        return None
    best = max(scored)[-1]
    return best.id if held[best.id] / blocks >= settings.cache_threshold else None


class _Desc(str):
    """Orders ids backwards, so that ``max`` prefers the lower id."""

    def __lt__(self, other: object) -> bool:
        return str.__gt__(self, other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        return str.__lt__(self, other)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("seed", "size", "capacity", "balance_abs_threshold"),
    # 150 workers: levels larger than a handful go through the load buckets; a threshold of 4: imbalanced fleets
    [(0, 3, 1, 64), (1, 12, 2, 64), (2, 40, 4, 64), (3, 150, 8, 64), (4, 40, 8, 4), (5, 150, 4, 4)],
)
def test_cache_aware_fast_path_picks_what_the_definition_picks(
    seed: int, size: int, capacity: int, balance_abs_threshold: int
) -> None:
    rng = random.Random(seed)
    registry, index = fleet(rng, size, capacity)
    section = from_dict(
        {"load_balancing": {"cache_aware": {"balance_abs_threshold": balance_abs_threshold, "load_weight": 0.5}}}
    ).load_balancing
    fast_balancer = CacheAware(BalancerContext(section, index))
    plain_balancer = CacheAware(BalancerContext(section, index))
    followed = passed_over = 0
    for n in range(40):
        turns = rng.randint(0, len(TURNS))
        messages = prompt(turns)
        fast = registry.eligible(MODEL)
        assert fast.by_load is not None and fast.positions is not None and fast.capacity == capacity
        plain = list(fast)  # no hints: the plain path
        text = canonical_text(messages, None)
        held = index.match(MODEL, text)
        expected = straightforward(plain, held, index.blocks(text), section)
        a = fast_balancer.pick(fast, InferenceRequest(request_id=f"a{n}", model=MODEL, messages=messages))
        b = plain_balancer.pick(plain, InferenceRequest(request_id=f"b{n}", model=MODEL, messages=messages))
        assert a is not None and b is not None
        assert a.id == b.id  # the same worker, least-loaded round-robin included
        if expected is not None:
            assert a.id == expected
            followed += 1
        else:
            assert a.load == min(w.load for w in plain)
            passed_over += bool(held)
        if rng.random() < 0.5:  # the pick's request starts, another ends: loads move between picks
            registry.begin(a.id)
        if rng.random() < 0.5:
            registry.end(rng.choice(plain).id)
    assert followed == fast_balancer.cache_picks == plain_balancer.cache_picks
    # both outcomes are exercised: holders followed (balanced fleets), holders passed over (imbalanced ones)
    assert followed > 0 if balance_abs_threshold > 8 else passed_over > 0


def test_least_utilized_through_the_buckets_round_robins_like_the_plain_list() -> None:
    rng = random.Random(7)
    registry, _ = fleet(rng, 60, 4)
    fast_cursor, plain_cursor = Cursor(), Cursor()
    for _ in range(50):
        fast = registry.eligible(MODEL)
        a, b = least_utilized(fast, fast_cursor), least_utilized(list(fast), plain_cursor)
        assert a.id == b.id and a.load == min(fast.loads or [])
        registry.begin(a.id)


def test_the_lent_list_is_read_only_and_its_hints_follow_load_changes() -> None:
    registry, _ = fleet(random.Random(3), 20, 4)
    workers = registry.eligible(MODEL)
    assert isinstance(workers, EligibleWorkers) and registry.eligible(MODEL) is workers  # lent, not copied
    with pytest.raises(TypeError):
        workers.sort(key=lambda w: w.load)
    with pytest.raises(TypeError):
        workers[0] = workers[1]
    assert sorted(workers, key=lambda w: w.load)  # copies are the balancer's own
    for worker_id in ("w001", "w001", "w005"):
        registry.begin(worker_id)
    registry.end("w005")
    registry.on_heartbeat(WorkerHeartbeat(worker_id="w007", active=3, models_loaded=[MODEL]))
    assert workers.loads == [w.load for w in workers]
    assert workers.by_load == {load: {w.id for w in workers if w.load == load} for load in set(workers.loads)}
    assert workers[workers.positions["w001"]].id == "w001"  # type: ignore[index]
    filtered = registry.eligible(MODEL, exclude={"w001"})
    assert "w001" not in {w.id for w in filtered} and filtered.by_load is None and filtered.positions is None


class Foreign:
    """A plugin that answers with a worker it was not given."""

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        return WorkerView(id="not-eligible", status="online", models=(MODEL,))


def test_a_foreign_answer_is_caught_on_the_registrys_list_too() -> None:
    registry, _ = fleet(random.Random(5), 10, 4)
    balancer = PreferredTier(Foreign(), name="foreign")
    chosen = balancer.pick(registry.eligible(MODEL), InferenceRequest(request_id="r", model=MODEL, prompt="hi"))
    assert chosen is not None and chosen.id != "not-eligible" and balancer.errors == 1


def test_an_exact_tie_in_score_goes_to_the_lower_load_across_levels() -> None:
    """The deeper holder (all 4 blocks, load 2 of 4: 1 − 0.5 × 2/4 = 0.75) and the shallower one (3 of 4
    blocks, idle: 0.75) score the same; the idle one wins on both paths."""
    registry, index = WorkerRegistry(from_dict({})), CacheIndex()
    for worker_id, turns in (("deep", 1), ("shallow", 0)):
        registry.on_registration(
            WorkerRegistration(worker_id=worker_id, capabilities=Capabilities(max_concurrent=4, models=[MODEL]))
        )
        digests = prefix_digests(canonical_text(prompt(turns), None))
        index.apply(CacheEvent(worker_id=worker_id, model=MODEL, instance=1.0, seq=1, reset=True, stored=digests))
    registry.begin("deep")
    registry.begin("deep")
    section = from_dict({"load_balancing": {"cache_aware": {"load_weight": 0.5}}}).load_balancing
    assert index.blocks(canonical_text(prompt(1), None)) == 4
    for workers in (registry.eligible(MODEL), list(registry.eligible(MODEL))):
        request = InferenceRequest(request_id="r", model=MODEL, messages=prompt(1))
        chosen = CacheAware(BalancerContext(section, index)).pick(workers, request)
        assert chosen is not None and chosen.id == "shallow"
