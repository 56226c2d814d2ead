"""Cache-aware routing end to end: echo workers with the simulated prompt cache, the real nats-server,
the controller app from its factory and the openai client.

A conversation's later turns must go to the worker whose cache holds its prefix; the controller's index
must be bounded, soft (rebuilt after a controller restart, dropped for a restarted worker) and refuse
malformed events. Every wait is on an observable condition, never on a sleep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster_harness import Cluster, RunningController, wait_until, with_sections

from mlxcluster.cli.status import format_status
from mlxcluster.config import Config
from mlxcluster.controller.routing.cache_index import CacheIndex
from mlxcluster.prefix_digest import canonical_text, prefix_digests
from mlxcluster.protocol import CacheEvent, ChatMessage, encode
from mlxcluster.worker.echo import EchoEngine

MODEL = "echo"


def cached_engine(entries: int = 256, token_delay_ms: float = 0.0) -> EchoEngine:
    return EchoEngine(models=[MODEL], prompt_cache_entries=entries, token_delay_ms=token_delay_ms)


@dataclass
class Conversation:
    """An agent-style chat: a long system prompt of its own, then short user turns."""

    number: int
    messages: list[dict[str, str]] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        system = f"Agent {self.number}: you are a meticulous assistant for project {self.number}. " * 12
        self.messages = [{"role": "system", "content": system}, {"role": "user", "content": self.question(0)}]

    def question(self, turn: int) -> str:
        return f"question {turn} of conversation {self.number} about the plan"

    def digests(self, reply: str) -> list[int]:
        """What the serving worker publishes after this turn (computed here, on the controller's side)."""
        messages = [ChatMessage(role=m["role"], content=m["content"]) for m in self.messages]
        return prefix_digests(canonical_text(messages, None, reply=reply))


def served_by(controller: RunningController, before: dict[str, int]) -> str:
    """The one worker whose request count grew since ``before``."""
    after = controller.served()
    grown = [w for w, n in after.items() if n > before.get(w, 0)]
    assert len(grown) == 1, (before, after)
    return grown[0]


async def turn(controller: RunningController, conversation: Conversation, index: CacheIndex, number: int) -> str:
    """Send the conversation's next turn; wait until the index holds what the serving worker cached."""
    before = controller.served()
    response = await controller.client().chat.completions.create(
        model=MODEL,
        messages=conversation.messages,
        max_tokens=32,  # type: ignore[arg-type]
    )
    worker = served_by(controller, before)
    reply = response.choices[0].message.content or ""
    digests = conversation.digests(reply)
    await wait_until(
        lambda: all(index.holds(worker, MODEL, d) for d in digests), what=f"index holds {worker}'s new digests"
    )
    conversation.workers.append(worker)
    conversation.messages += [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": conversation.question(number)},
    ]
    return worker


async def two_cached_workers(cluster: Cluster, config: Config | None = None, **engine: Any) -> RunningController:
    for worker_id in ("w1", "w2"):
        await cluster.start_worker(worker_id, engine=cached_engine(**engine))
    controller = await cluster.start_controller(config)
    await controller.wait_online("w1", "w2")
    return controller


async def test_later_turns_go_to_the_worker_holding_the_prefix(cluster_config: Config, nats_server: Any) -> None:
    async with Cluster(cluster_config) as cluster:
        controller = await two_cached_workers(cluster)
        assert controller.ctx.balancer_name == "cache_aware"  # the default
        index = controller.ctx.cache_index
        assert index is not None
        conversations = [Conversation(i) for i in range(4)]
        for number in range(1, 4):  # interleaved: turn n of every conversation, then turn n + 1
            for conversation in conversations:
                await turn(controller, conversation, index, number)
        first = {c.workers[0] for c in conversations}
        assert first == {"w1", "w2"}  # turn 1 spread by load
        for conversation in conversations:
            assert conversation.workers == [conversation.workers[0]] * 3, conversation.workers
        engines = {w: cluster.workers[w].engine.prompt_cache for w in ("w1", "w2")}
        hits = sum(e.hits for e in engines.values() if e is not None)
        assert hits == 8  # every later turn reused its prefix
        for worker_id, engine in engines.items():  # the worker's digests are the ones the controller computed
            assert engine is not None
            assert all(index.holds(worker_id, MODEL, d) for d in engine.digests())

        async def reported() -> list[dict[str, Any]]:
            workers = await controller.workers()
            return [w for w in workers if w["prompt_cache"] and w["prompt_cache"]["hits"] > 0]

        shown = await wait_until(reported, what="cache stats in /api/cluster/workers")
        for worker in shown:
            cache = worker["prompt_cache"]
            assert 0 < cache["hit_rate"] <= 1 and 0 < cache["token_hit_rate"] < 1
            assert cache["entries"] > 0 and cache["indexed_digests"] > 0
        async with controller.session().get(f"{controller.url}/api/cluster/status") as resp:
            status = await resp.json()
        assert status["cache_index"]["entries"] == len(index) > 0
        assert status["cache_index"]["max_entries"] == 200_000
        assert f"{len(index):,} of 200,000 entries, 2 workers" in format_status(status)  # mlxcluster status


async def test_saturated_holder_falls_back_to_the_least_loaded(cluster_config: Config, nats_server: Any) -> None:
    config = with_sections(cluster_config, worker={"max_concurrent": 2})
    async with Cluster(config) as cluster:
        controller = await two_cached_workers(cluster, token_delay_ms=50)
        index = controller.ctx.cache_index
        assert index is not None
        conversation = Conversation(7)
        holder = await turn(controller, conversation, index, 1)
        other = "w2" if holder == "w1" else "w1"
        client = controller.client()
        streams = []
        long_turn = conversation.messages[:-1] + [{"role": "user", "content": " ".join(["word"] * 200)}]
        for _ in range(2):  # two long streams (200 tokens, 10 s) fill the holder's two slots
            before = controller.served()
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=long_turn,  # type: ignore[arg-type]
                max_tokens=200,
                stream=True,
            )
            await stream.__anext__()
            assert served_by(controller, before) == holder
            streams.append(stream)
        before = controller.served()
        await client.chat.completions.create(model=MODEL, messages=conversation.messages, max_tokens=4)  # type: ignore[arg-type]
        assert served_by(controller, before) == other
        for stream in streams:
            await stream.close()


async def test_index_stays_bounded_under_a_flood_of_distinct_prompts(cluster_config: Config, nats_server: Any) -> None:
    config = with_sections(cluster_config, load_balancing={"cache_index_max_entries": 40})
    async with Cluster(config) as cluster:
        controller = await two_cached_workers(cluster, config)
        index = controller.ctx.cache_index
        assert index is not None and index.max_entries == 40
        for i in range(30):
            conversation = Conversation(100 + i)
            await turn(controller, conversation, index, 1)  # waits until its digests are indexed
            assert len(index) <= 40
        stats = index.stats()
        assert stats.evictions > 0 and stats.entries <= 40
        workers_digests = sum(len(w.engine.cache_digests()) for w in cluster.workers.values())
        assert workers_digests > 40  # the workers hold more than the controller indexes


async def test_controller_restart_starts_empty_and_refills_from_snapshots(
    cluster_config: Config, nats_server: Any
) -> None:
    async with Cluster(cluster_config) as cluster:
        controller = await two_cached_workers(cluster)
        index = controller.ctx.cache_index
        assert index is not None
        conversation = Conversation(3)
        holder = await turn(controller, conversation, index, 1)
        held = cluster.workers[holder].engine.cache_digests()
        await controller.stop()
        restarted = await cluster.start_controller()
        fresh = restarted.ctx.cache_index
        assert fresh is not None and fresh is not index
        await restarted.wait_online("w1", "w2")
        await wait_until(lambda: all(fresh.holds(holder, MODEL, d) for d in held), what="index refilled")
        assert fresh.stats().resets >= 2  # both workers answered the announce with a snapshot
        assert await turn(restarted, conversation, fresh, 2) == holder


async def test_restarted_worker_loses_its_old_entries(cluster_config: Config, nats_server: Any) -> None:
    async with Cluster(cluster_config) as cluster:
        controller = await two_cached_workers(cluster)
        index = controller.ctx.cache_index
        assert index is not None
        conversation = Conversation(5)
        holder = await turn(controller, conversation, index, 1)
        old = cluster.workers[holder].engine.cache_digests()
        await cluster.workers[holder].stop(drain=False)  # crashes: no deregister
        restarted = await cluster.start_worker(holder, engine=cached_engine())  # same id, a new instance
        assert restarted.service.started_at > 0
        await wait_until(lambda: not any(index.holds(holder, MODEL, d) for d in old), what="old entries dropped")
        await controller.wait_online(holder)
        assert index.worker_entries(holder) == 0


async def test_malformed_cache_events_are_dropped_and_counted(cluster_config: Config, nats_server: Any) -> None:
    async with Cluster(cluster_config) as cluster:
        controller = await two_cached_workers(cluster)
        index = controller.ctx.cache_index
        assert index is not None
        bus = controller.bus
        subject = bus.subjects.cache
        before = bus.invalid_messages[subject]
        await bus.nc.publish(subject, b"{not json")
        await bus.nc.publish(subject, b'{"worker_id": "w1", "model": "echo", "stored": ["x"]}')
        await bus.nc.publish(subject, encode(CacheEvent(worker_id="w1", model="", stored=[1, 2])))
        await bus.nc.publish(subject, b'{"worker_id": "w1", "model": "echo", "stored": [-5]}')
        await wait_until(lambda: bus.invalid_messages[subject] - before >= 4, what="4 invalid cache events counted")
        assert bus.invalid_messages[subject] - before == 4
        conversation = Conversation(9)
        await turn(controller, conversation, index, 1)  # the controller still routes and indexes


async def test_prompt_cache_series_in_prometheus(cluster_config: Config, nats_server: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    config = with_sections(cluster_config, metrics={"exporters": ["prometheus"], "snapshot_interval_s": 0.05})
    async with Cluster(config) as cluster:
        controller = await two_cached_workers(cluster)
        index = controller.ctx.cache_index
        assert index is not None
        conversation = Conversation(11)
        holder = await turn(controller, conversation, index, 1)
        await turn(controller, conversation, index, 2)

        async def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            async with controller.session().get(f"{controller.url}/metrics") as resp:
                text = await resp.text()
            values = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            hits = values.get(("mlxcluster_worker_prompt_cache_hits_total", (("worker", holder),)), 0)
            entries = values.get(("mlxcluster_worker_prompt_cache_entries", (("worker", holder),)), 0)
            return values if hits >= 1 and entries >= 1 else None

        values = await wait_until(scraped, what="the holder's cache hit in /metrics")
        assert values[("mlxcluster_tokens_total", (("kind", "cached"),))] > 0
        assert 0 < values[("mlxcluster_worker_prompt_cache_token_hit_rate", (("worker", holder),))] < 1
        assert values[("mlxcluster_cache_index_entries", ())] > 0
        assert values[("mlxcluster_cache_index_max_entries", ())] == 200_000


async def test_publisher_coalesces_deltas_and_chunks_snapshots(bus: Any) -> None:
    from cluster_harness import barrier

    from mlxcluster.protocol import InferenceRequest
    from mlxcluster.worker.cache_events import CacheEventPublisher

    engine = cached_engine()
    publisher = CacheEventPublisher(
        bus=bus, engine=engine, worker_id="pw", instance=5.0, models=[MODEL], flush_interval_s=0.05
    )
    publisher.max_digests = 3
    events: list[CacheEvent] = []

    async def collect(event: CacheEvent, _msg: Any) -> None:
        events.append(event)

    subscription = await bus.subscribe(bus.subjects.cache, CacheEvent, collect)
    await barrier(bus)
    try:
        await publisher.start()
        await wait_until(lambda: len(events) == 1, what="the first (empty) snapshot")
        assert events[0].reset and events[0].stored == [] and events[0].instance == 5.0
        publisher._on_change([11, 12], [])  # the engine's listener, as from its own thread
        publisher._on_change([], [12])  # stored and dropped within one window: never sent
        await wait_until(lambda: len(events) == 2, what="one coalesced delta")
        assert (events[1].stored, events[1].removed, events[1].reset) == ([11], [], False)
        request = InferenceRequest(request_id="r", model=MODEL, messages=[ChatMessage(role="user", content="z " * 600)])
        _ = [frame async for frame in engine.generate(request)]  # the simulated cache stores ~6 digests
        await wait_until(lambda: len(events) >= 3 and not publisher._stored, what="the delta of that request")
        held = sorted(engine.cache_digests())
        assert len(held) > 3  # more than one message of 3
        before = len(events)
        await publisher.snapshot()
        await wait_until(lambda: len(events) == before + -(-len(held) // 3), what="a snapshot in chunks of 3")
        snapshot = events[before:]
        assert snapshot[0].reset and not any(e.reset for e in snapshot[1:])
        assert all(len(e.stored) <= 3 for e in snapshot)
        assert sorted(d for e in snapshot for d in e.stored) == held
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        index = CacheIndex()
        for event in events:
            assert index.apply(event)
        assert index.stats().seq_gaps == 0 and index.worker_entries("pw", MODEL) == len(held)
    finally:
        await publisher.stop()
        await subscription.unsubscribe()
