"""Built-in balancers, priority tiers, sticky sessions and plugin isolation in the pick pipeline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from mlxcluster.api import Balancer, LruMap, WorkerView
from mlxcluster.builtin.balancers import (
    HardwareAware,
    LeastLoaded,
    PrefixAffinity,
    RandomChoice,
    RoundRobin,
    affinity_key,
)
from mlxcluster.config import LoadBalancingSection, from_dict
from mlxcluster.controller.routing.balancing import (
    PreferredTier,
    StickySessions,
    UnknownBalancerError,
    balancer_from_entries,
    build_balancer,
    preferred_tier,
)
from mlxcluster.controller.routing.dispatch import pick_worker
from mlxcluster.controller.routing.registry import WorkerRegistry
from mlxcluster.plugins import collect_balancers, get_plugin_manager
from mlxcluster.protocol import Capabilities, ChatMessage, InferenceRequest, WorkerHeartbeat, WorkerRegistration


def worker(worker_id: str, load: int = 0, max_concurrent: int = 4, **fields: object) -> WorkerView:
    return WorkerView(id=worker_id, status="online", load=load, max_concurrent=max_concurrent, **fields)  # type: ignore[arg-type]


def request(prompt: str = "hello", session_id: str | None = None, model: str = "m") -> InferenceRequest:
    return InferenceRequest(request_id="r", model=model, prompt=prompt, session_id=session_id)


def picks(balancer: Balancer, workers: Sequence[WorkerView], n: int, **kwargs: object) -> Counter[str]:
    counts: Counter[str] = Counter()
    for i in range(n):
        chosen = balancer.pick(workers, request(prompt=f"p{i}", **kwargs))  # type: ignore[arg-type]
        assert chosen is not None
        counts[chosen.id] += 1
    return counts


BUILTINS = [RoundRobin, LeastLoaded, HardwareAware, RandomChoice, PrefixAffinity]


@pytest.mark.parametrize("factory", BUILTINS)
def test_every_builtin_refuses_empty_and_returns_a_given_worker(factory: type) -> None:
    balancer = factory()
    assert isinstance(balancer, Balancer)
    assert balancer.pick([], request()) is None
    workers = [worker("a"), worker("b")]
    assert balancer.pick(workers, request()) in workers


def test_round_robin_cycles_evenly_and_survives_membership_changes() -> None:
    balancer = RoundRobin()
    workers = [worker("c"), worker("a"), worker("b")]
    assert [balancer.pick(workers, request()).id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    balancer.pick(workers, request())  # a
    assert balancer.pick([worker("a"), worker("c")], request()).id == "c"  # b left: next after a is c
    assert picks(balancer, workers, 300) == {"a": 100, "b": 100, "c": 100}


def test_least_loaded_uses_load_relative_to_capacity_and_round_robins_ties() -> None:
    balancer = LeastLoaded()
    workers = [worker("a", load=3, max_concurrent=4), worker("b", load=4, max_concurrent=8), worker("c", load=2)]
    assert balancer.pick(workers, request()).id == "b"  # 0.5 < 0.75, and ties with c (0.5)
    assert balancer.pick(workers, request()).id == "c"
    assert balancer.pick(workers, request()).id == "b"
    idle = [worker("x"), worker("y"), worker("z")]
    assert picks(balancer, idle, 300) == {"x": 100, "y": 100, "z": 100}


def test_random_covers_all_workers_roughly_evenly() -> None:
    counts = picks(RandomChoice(seed=7), [worker(f"w{i}") for i in range(4)], 4000)
    assert set(counts) == {"w0", "w1", "w2", "w3"}
    assert all(800 < c < 1200 for c in counts.values())


def test_hardware_aware_prefers_fast_free_workers_and_skips_low_memory() -> None:
    balancer = HardwareAware(min_free_memory_gb=1.0)
    fast = worker("fast", tokens_per_second=100.0, available_memory_gb=16.0)
    slow = worker("slow", tokens_per_second=20.0, available_memory_gb=16.0)
    full = worker("full", tokens_per_second=500.0, available_memory_gb=0.2)
    assert balancer.pick([slow, fast, full], request()).id == "fast"
    busy_fast = worker("fast", load=3, tokens_per_second=100.0)  # 100 * 1/4 = 25 > 20 * 4/4
    assert balancer.pick([slow, busy_fast], request()).id == "fast"
    busier_fast = worker("fast", load=4, tokens_per_second=100.0)  # no free slot
    assert balancer.pick([slow, busier_fast], request()).id == "slow"
    assert balancer.pick([full], request()) is None  # nobody has memory for it


def test_hardware_aware_unmeasured_workers_count_at_the_mean_and_ties_round_robin() -> None:
    balancer = HardwareAware()
    workers = [worker("a", tokens_per_second=50.0), worker("new"), worker("b", tokens_per_second=50.0)]
    assert picks(balancer, workers, 30) == {"a": 10, "b": 10, "new": 10}
    all_full = [worker("a", load=8), worker("b", load=5)]
    assert balancer.pick(all_full, request()).id == "b"


def test_prefix_affinity_is_stable_per_prefix_and_spreads_new_prefixes() -> None:
    balancer = PrefixAffinity(prefix_chars=16)
    workers = [worker("a"), worker("b"), worker("c")]
    first = {i: balancer.pick(workers, request(prompt=f"system {i:02d} " + "x" * 40)).id for i in range(9)}
    assert Counter(first.values()) == {"a": 3, "b": 3, "c": 3}
    for i in range(9):  # same first 16 characters, different tails: same worker
        assert balancer.pick(workers, request(prompt=f"system {i:02d} " + "y" * 40)).id == first[i]
    assert (
        balancer.pick(workers, request(prompt="other", session_id="s1")).id
        == balancer.pick(workers, request(prompt="different", session_id="s1")).id
    )


def test_prefix_affinity_falls_back_when_overloaded_or_gone() -> None:
    balancer = PrefixAffinity()
    workers = [worker("a"), worker("b")]
    home = balancer.pick(workers, request("shared prefix")).id
    other = "b" if home == "a" else "a"
    overloaded = [worker(home, load=4), worker(other, load=1)]
    assert balancer.pick(overloaded, request("shared prefix")).id == other
    all_busy = [worker(home, load=4), worker(other, load=6)]
    assert balancer.pick(all_busy, request("shared prefix")).id == home  # nobody is free: keep the cache
    assert balancer.pick(workers, request("shared prefix")).id == home  # the key stayed with home
    assert balancer.pick([worker(other)], request("shared prefix")).id == other  # home gone: moves
    assert balancer.pick(workers, request("shared prefix")).id == other


def test_prefix_affinity_keys_chat_messages_and_memory_is_bounded() -> None:
    chat = InferenceRequest(
        request_id="r", model="m", messages=[ChatMessage(role="system", content="S" * 10), ChatMessage(role="user")]
    )
    same_start = InferenceRequest(
        request_id="r", model="m", messages=[ChatMessage(role="system", content="S" * 10 + "tail")]
    )
    assert affinity_key(chat, 8) == affinity_key(same_start, 8)
    assert affinity_key(chat, 100) != affinity_key(same_start, 100)
    assert affinity_key(InferenceRequest(request_id="r", model="m"), 8) is None
    balancer = PrefixAffinity(max_entries=50)
    picks(balancer, [worker("a"), worker("b")], 500)
    assert len(balancer.assignments) == 50
    lru = LruMap(2)
    lru.set(b"1", "a")
    lru.set(b"2", "b")
    lru.get(b"1")
    lru.set(b"3", "c")
    assert lru.get(b"2") is None and lru.get(b"1") == "a"


def test_sticky_sessions_wrap_any_strategy() -> None:
    sticky = StickySessions(RoundRobin(), max_sessions=100)
    workers = [worker("a"), worker("b"), worker("c")]
    homes = {s: sticky.pick(workers, request(session_id=s)).id for s in ("s1", "s2", "s3")}
    assert sorted(homes.values()) == ["a", "b", "c"]
    for _ in range(5):
        for session, home in homes.items():
            assert sticky.pick(workers, request(session_id=session)).id == home
    moved = sticky.pick([w for w in workers if w.id != homes["s1"]], request(session_id="s1")).id
    assert moved != homes["s1"]
    assert sticky.pick(workers, request(session_id="s1")).id == moved  # stays on the new worker
    assert picks(sticky, workers, 30) == {"a": 10, "b": 10, "c": 10}  # no session: inner strategy


def test_preferred_tier_online_before_degraded_then_priority_with_spillover() -> None:
    degraded = WorkerView(id="d", status="degraded", priority=9)
    high = worker("high", priority=5, load=2, max_concurrent=2)
    low = worker("low", priority=1)
    assert [w.id for w in preferred_tier([degraded, high, low])] == ["low"]  # high is full: spill over
    assert [w.id for w in preferred_tier([degraded, worker("high", priority=5), low])] == ["high"]
    assert [w.id for w in preferred_tier([high, worker("low", priority=1, load=9)])] == ["high"]  # all full
    assert [w.id for w in preferred_tier([degraded])] == ["d"]
    assert preferred_tier([]) == []


class Broken:
    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        raise RuntimeError("plugin bug")


class Foreign:
    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        return worker("not-eligible")


@pytest.mark.parametrize("strategy", [Broken(), Foreign()])
def test_broken_strategy_falls_back_to_least_loaded(strategy: Balancer) -> None:
    balancer = PreferredTier(strategy, name="bad")
    chosen = balancer.pick([worker("a", load=3), worker("b", load=1)], request())
    assert chosen is not None and chosen.id == "b"
    assert balancer.errors == 1


def test_build_balancer_by_name_with_sticky_and_unknown_name() -> None:
    pm = get_plugin_manager(env={})
    entries = collect_balancers(pm)
    assert set(entries) >= {"round_robin", "least_loaded", "hardware_aware", "random", "prefix_affinity"}
    balancer = build_balancer(pm, LoadBalancingSection(strategy="round_robin"))
    assert isinstance(balancer, PreferredTier) and isinstance(balancer.strategy, RoundRobin)
    sticky = balancer_from_entries(entries, LoadBalancingSection(strategy="random", sticky_sessions=True))
    assert isinstance(sticky, StickySessions)
    with pytest.raises(UnknownBalancerError, match="'nope'.*least_loaded"):
        build_balancer(pm, LoadBalancingSection(strategy="nope"))


def _registry_with_workers() -> WorkerRegistry:
    registry = WorkerRegistry(from_dict({}))
    for worker_id, models in (("w1", ["m"]), ("w2", ["m", "other"]), ("w3", ["other"]), ("w4", ["m"])):
        registry.on_registration(
            WorkerRegistration(worker_id=worker_id, capabilities=Capabilities(max_concurrent=4, models=models))
        )
    return registry


@pytest.mark.parametrize(
    "strategy", ["cache_aware", "round_robin", "least_loaded", "hardware_aware", "random", "prefix_affinity"]
)
def test_every_strategy_only_sees_eligible_workers(strategy: str) -> None:
    registry = _registry_with_workers()
    registry.on_heartbeat(WorkerHeartbeat(worker_id="w4", status="draining"))
    balancer = build_balancer(get_plugin_manager(env={}), LoadBalancingSection(strategy=strategy))
    chosen: set[str] = set()
    for i in range(200):
        view = pick_worker(registry, balancer, request(prompt=f"p{i}"), exclude={"w9"})
        assert view is not None
        chosen.add(view.id)
    assert chosen <= {"w1", "w2"}  # w3 lacks the model, w4 is draining
    assert pick_worker(registry, balancer, request(), exclude={"w1", "w2"}) is None
    assert pick_worker(registry, balancer, request(model="unknown")) is None


def test_least_loaded_through_registry_counts_local_inflight() -> None:
    registry = _registry_with_workers()
    balancer = build_balancer(get_plugin_manager(env={}), LoadBalancingSection())
    counts: Counter[str] = Counter()
    for _ in range(8):  # no heartbeats in between: only begin() tells the registry about load
        view = pick_worker(registry, balancer, request())
        assert view is not None
        registry.begin(view.id)
        counts[view.id] += 1
    assert set(counts) == {"w1", "w2", "w4"}
    assert max(counts.values()) - min(counts.values()) <= 1
