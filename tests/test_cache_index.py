"""The controller's cache index, the echo engine's simulated prompt cache and the cache_aware balancer,
without a bus: digests in, matches and picks out."""

from __future__ import annotations

import pytest

from mlxcluster.api import NO_MATCH, BalancerContext, WorkerView
from mlxcluster.builtin.cache_aware import CacheAware
from mlxcluster.config import LoadBalancingSection
from mlxcluster.controller.routing.balancing import build_balancer, wants_context
from mlxcluster.controller.routing.cache_index import CacheIndex
from mlxcluster.plugins import get_plugin_manager
from mlxcluster.prefix_digest import BLOCK_CHARS, canonical_text, iter_prefix_digests, prefix_digests
from mlxcluster.protocol import CacheEvent, ChatMessage, Done, InferenceRequest, Token
from mlxcluster.worker.echo import EchoEngine
from mlxcluster.worker.echo_cache import covered_words

SYSTEM = "You are a careful assistant. " * 40  # about 1,100 characters: four blocks


def event(worker: str, stored: list[int] = (), removed: list[int] = (), **fields) -> CacheEvent:  # type: ignore[assignment]
    return CacheEvent(
        worker_id=worker, model=fields.pop("model", "m"), stored=list(stored), removed=list(removed), **fields
    )


def chat(*contents: str, system: str = SYSTEM) -> InferenceRequest:
    messages = [ChatMessage(role="system", content=system)]
    for i, content in enumerate(contents):
        messages.append(ChatMessage(role="user" if i % 2 == 0 else "assistant", content=content))
    return InferenceRequest(request_id=f"r{len(contents)}", model="m", messages=messages)


def digests_of(request: InferenceRequest, reply: str | None = None) -> list[int]:
    return prefix_digests(canonical_text(request.messages, request.prompt, reply=reply))


def view(worker_id: str, load: int = 0, max_concurrent: int = 8) -> WorkerView:
    return WorkerView(id=worker_id, status="online", load=load, max_concurrent=max_concurrent, models=("m",))


def test_iter_prefix_digests_equals_prefix_digests() -> None:
    text = "x" * (BLOCK_CHARS * 5 + 17) + "é" * 300
    assert list(iter_prefix_digests(text)) == prefix_digests(text)
    ascii_only = "y" * (BLOCK_CHARS * 3 + 5)  # the encode-once path
    assert list(iter_prefix_digests(ascii_only)) == prefix_digests(ascii_only) != prefix_digests("z" + ascii_only)


def test_match_is_the_longest_held_prefix_per_worker_and_per_model() -> None:
    index = CacheIndex()
    request = chat("first question " * 30)
    digests = digests_of(request)
    assert len(digests) >= 5
    index.apply(event("a", digests[:2], seq=1))
    index.apply(event("b", digests, seq=1))
    index.apply(event("c", digests, model="other", seq=1))
    text = canonical_text(request.messages, None)
    assert index.match("m", text) == {"a": 2, "b": len(digests)}
    assert index.match("other", text) == {"c": len(digests)}
    assert index.match("m", "unrelated " * 100) == {}
    index.apply(event("b", removed=digests[3:], seq=2))
    assert index.match("m", text) == {"a": 2, "b": 3}


def test_reset_replaces_a_workers_set_and_a_new_instance_drops_the_old() -> None:
    index = CacheIndex()
    one, two = digests_of(chat("alpha " * 60)), digests_of(chat("beta " * 60))
    index.apply(event("a", one, instance=1.0, seq=1, reset=True))
    index.apply(event("a", two, instance=1.0, seq=2, reset=True))
    assert not index.holds("a", "m", one[-1]) and index.holds("a", "m", two[-1])
    index.apply(event("a", one, instance=2.0, seq=1))  # restarted worker: a delta of the new instance
    assert index.holds("a", "m", one[-1]) and not index.holds("a", "m", two[-1])
    index.apply(event("a", two, instance=1.5, seq=9))  # late event of an old instance: ignored
    assert not index.holds("a", "m", two[-1]) and index.stats().stale_events == 1
    assert len(index) == len(one)


def test_seq_gap_is_counted_and_the_delta_kept() -> None:
    index = CacheIndex()
    digests = digests_of(chat("gamma " * 60))
    index.apply(event("a", digests[:1], seq=1))
    index.apply(event("a", digests[1:], seq=5))
    assert index.stats().seq_gaps == 1
    assert index.holds("a", "m", digests[-1])


def test_index_is_bounded_under_a_flood_of_distinct_prompts() -> None:
    index = CacheIndex(max_entries=1000)
    for i in range(300):
        index.apply(event(f"w{i % 7}", digests_of(chat(f"prompt {i} " * 80)), seq=i // 7 + 1))
        assert len(index) <= 1000
    stats = index.stats()
    assert stats.entries == len(index) <= 1000 and stats.evictions > 0
    assert stats.digests <= stats.entries
    recent = chat("prompt 299 " * 80)
    assert index.match("m", canonical_text(recent.messages, None)).get("w5", 0) >= 1  # recent ones survive
    for i in range(7):
        index.drop_worker(f"w{i}")
    assert len(index) == 0 and index.stats().digests == 0


def test_eviction_drops_deep_blocks_before_the_shared_prefix() -> None:
    index = CacheIndex(max_entries=10)
    shared = chat("shared question " * 40)
    digests = digests_of(shared)
    index.apply(event("a", digests, seq=1))
    index.apply(event("b", digests_of(chat("other " * 80, system="S" * 900)), seq=1))
    held = index.match("m", canonical_text(shared.messages, None))
    assert 0 < held.get("a", 0) < len(digests)  # the conversation's tail went first, its head is still held


def test_shared_prefix_held_by_many_workers() -> None:
    index = CacheIndex()
    base = chat("common " * 40)
    longer = chat("common " * 40, "reply " * 40, "next " * 40)
    for i in range(50):
        index.apply(event(f"w{i}", digests_of(base), seq=1))
    index.apply(event("w7", digests_of(longer), seq=2))
    held = index.match("m", canonical_text(longer.messages, None))
    assert len(held) == 50 and held["w7"] == len(digests_of(longer))
    assert {held[f"w{i}"] for i in range(50) if i != 7} == {len(digests_of(base))}


@pytest.mark.parametrize(
    "bad",
    [
        CacheEvent(worker_id="a", model="", stored=[1]),
        CacheEvent(worker_id="a", model="m", stored=[2**63]),
        CacheEvent(worker_id="a", model="m", removed=[-1]),
        CacheEvent(worker_id="a", model="m", stored=list(range(100_001))),
    ],
)
def test_malformed_events_are_refused_and_counted(bad: CacheEvent) -> None:
    index = CacheIndex()
    assert index.apply(bad) is False
    assert index.stats().invalid_events == 1 and len(index) == 0


def test_covered_words_counts_only_content_inside_the_prefix() -> None:
    messages = [ChatMessage(role="system", content="a b c"), ChatMessage(role="user", content="d e f g")]
    text = canonical_text(messages, None)
    assert covered_words(messages, None, len(text)) == 7
    assert covered_words(messages, None, 0) == 0
    assert covered_words(messages, None, text.index("d") + 3) == 5  # "a b c" and "d e"
    assert covered_words(None, "one two three", 1 + len("one two")) == 2


async def test_echo_simulated_cache_hits_on_the_next_turn_and_output_is_unchanged() -> None:
    changes: list[tuple[list[int], list[int]]] = []
    cached = EchoEngine(models=["m"], prompt_cache_entries=2)
    plain = EchoEngine(models=["m"])
    cached.set_cache_listener(lambda stored, removed: changes.append((stored, removed)))
    assert "simulated" in cached.info().details["prompt_cache"]
    assert plain.prompt_cache_stats() is None and plain.cache_digests() == []

    async def run(engine: EchoEngine, request: InferenceRequest) -> tuple[str, Done]:
        frames = [f async for f in engine.generate(request)]
        return "".join(f.text for f in frames if isinstance(f, Token)), frames[-1]  # type: ignore[return-value]

    first = chat("what is the answer " * 20)
    text, done = await run(cached, first)
    assert text == (await run(plain, first))[0]
    assert done.usage.cached_tokens == 0
    expected = digests_of(first, reply=text)
    assert changes == [(expected, [])] and sorted(cached.cache_digests()) == sorted(expected)
    second = chat("what is the answer " * 20, text, "and why " * 10)
    text2, done2 = await run(cached, second)
    assert text2 == (await run(plain, second))[0]
    assert 0 < done2.usage.cached_tokens < done2.usage.prompt_tokens
    stats = cached.prompt_cache_stats()
    assert stats is not None and (stats.hits, stats.misses, stats.entries) == (1, 1, 2)
    await run(cached, chat("unrelated " * 80, system="Z" * 700))  # evicts the first turn: its digests
    assert changes[-1][1] == []  # are all still held by the second turn's entry
    await run(cached, chat("another " * 80, system="Y" * 700))  # evicts the second turn
    stats = cached.prompt_cache_stats()
    assert stats is not None and stats.entries == 2 and stats.evictions == 2
    assert sorted(changes[-1][1]) == sorted(digests_of(second, reply=text2))


def test_no_prompt_is_hashed_while_the_index_is_empty() -> None:
    index = CacheIndex()
    context = BalancerContext(LoadBalancingSection(), index)
    request = chat("long question " * 40)
    assert context.prefix_match(request) is NO_MATCH  # nothing cached anywhere: no digests computed
    index.apply(event("b", digests_of(request), seq=1))
    again = InferenceRequest(request_id="again", model="m", messages=request.messages)
    assert context.prefix_match(again).held == {"b": context.prefix_match(again).blocks}


def test_cache_aware_follows_the_holder_and_falls_back_when_saturated_or_imbalanced() -> None:
    index = CacheIndex()
    section = LoadBalancingSection()
    balancer = CacheAware(BalancerContext(section, index))
    request = chat("long question " * 40)
    index.apply(event("b", digests_of(request), seq=1))
    assert balancer.pick([view("a"), view("b", load=2)], request).id == "b"
    fresh = InferenceRequest(request_id="x", model="m", messages=request.messages)
    assert balancer.pick([view("a"), view("b", load=8)], fresh).id == "a"  # holder saturated
    imbalanced = InferenceRequest(request_id="y", model="m", messages=request.messages)
    assert balancer.pick([view("a", load=0), view("b", load=9, max_concurrent=16)], imbalanced).id == "a"
    nobody = chat("no one has this " * 30, system="Q" * 800)
    assert balancer.pick([view("a", load=1), view("b")], nobody).id == "b"  # least loaded
    short = InferenceRequest(request_id="z", model="m", prompt="hi")
    assert balancer.pick([view("a"), view("b", load=1)], short).id == "a"
    assert balancer.cache_picks == 1


def test_cache_aware_prefers_the_deeper_holder_among_equals() -> None:
    index = CacheIndex()
    balancer = CacheAware(BalancerContext(LoadBalancingSection(), index))
    base = chat("topic " * 60)
    longer = chat("topic " * 60, "answer " * 40, "more " * 40)
    index.apply(event("a", digests_of(base), seq=1))
    index.apply(event("b", digests_of(longer), seq=1))
    assert balancer.pick([view("a"), view("b")], longer).id == "b"


def test_factories_get_the_context_only_when_they_ask_for_it() -> None:
    class Bare:
        def pick(self, workers, request):  # type: ignore[no-untyped-def]
            return workers[0]

    class WithContext(Bare):
        def __init__(self, context: BalancerContext) -> None:
            self.context = context

    assert not wants_context(Bare) and wants_context(WithContext) and wants_context(CacheAware)
    index = CacheIndex()
    balancer = build_balancer(get_plugin_manager(env={}), LoadBalancingSection(), BalancerContext(cache=index))
    assert balancer.strategy.context.cache is index  # type: ignore[attr-defined]


def test_prefix_match_is_computed_once_per_request() -> None:
    index = CacheIndex()
    context = BalancerContext(cache=index)
    request = chat("again " * 60)
    index.apply(event("a", digests_of(request), seq=1))
    first = context.prefix_match(request)
    assert context.prefix_match(request) is first and first.fraction("a") == 1.0


def test_fast_and_plain_paths_of_cache_aware_agree_through_the_registry() -> None:
    from mlxcluster.config import from_dict
    from mlxcluster.controller.routing.registry import WorkerRegistry
    from mlxcluster.protocol import Capabilities, WorkerHeartbeat, WorkerRegistration

    registry = WorkerRegistry(from_dict({}))
    index = CacheIndex()
    balancer = CacheAware(BalancerContext(LoadBalancingSection(), index))
    shared = chat("shared question " * 40)
    deeper = chat("shared question " * 40, "an answer " * 40, "a follow-up " * 30)
    for i in range(40):
        worker_id = f"w{i:02d}"
        registry.on_registration(
            WorkerRegistration(worker_id=worker_id, capabilities=Capabilities(max_concurrent=4, models=["m"]))
        )
        registry.on_heartbeat(WorkerHeartbeat(worker_id=worker_id, active=i % 3, models_loaded=["m"]))
        index.apply(event(worker_id, digests_of(shared), seq=1))
    index.apply(event("w07", digests_of(deeper), seq=2))
    index.apply(event("w08", digests_of(deeper), seq=2))
    for request in (shared, deeper):
        fast = registry.eligible("m")
        assert fast.positions is not None and fast.capacity == 4 and fast.loads == [w.load for w in fast]
        plain = list(fast)
        a = balancer.pick(fast, InferenceRequest(request_id="a", model="m", messages=request.messages))
        b = balancer.pick(plain, InferenceRequest(request_id="b", model="m", messages=request.messages))
        assert a is not None and b is not None
        held = index.match("m", canonical_text(request.messages, None))
        assert (held[a.id], a.load) == (held[b.id], b.load)  # the same score (equal holders: any of them)
    assert {a.id, b.id} == {"w07"}  # of the deeper holders, w07 (load 1) is less loaded than w08 (load 2)
