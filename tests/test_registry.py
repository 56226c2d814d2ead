"""WorkerRegistry: status from heartbeats and timeouts (fake clock), static workers, load, stats, queries."""

from __future__ import annotations

import asyncio

import pytest
from cluster_harness import wait_until

from mlxcluster.config import Config, from_dict
from mlxcluster.controller.routing.registry import WorkerEvent, WorkerRegistry, speculation_fields
from mlxcluster.protocol import (
    Capabilities,
    Deregister,
    Hardware,
    SpeculationCounts,
    WorkerHeartbeat,
    WorkerRegistration,
)


class FakeClock:
    """Monotonic seconds that only move when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def registration(worker_id: str, models: tuple[str, ...] = ("m",), max_concurrent: int = 4) -> WorkerRegistration:
    return WorkerRegistration(
        worker_id=worker_id,
        hostname=f"{worker_id}.local",
        address="10.0.0.1",
        hardware=Hardware(memory_gb=64.0),
        capabilities=Capabilities(max_concurrent=max_concurrent, max_queue=8, models=list(models), engine="echo"),
    )


def heartbeat(worker_id: str, **fields: object) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker_id, **fields)  # type: ignore[arg-type]


def make_config(**sections: object) -> Config:
    return from_dict({"discovery": {"heartbeat_interval_ms": 1000, "offline_timeout_ms": 3000}, **sections})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> WorkerRegistry:
    return WorkerRegistry(make_config(), clock=clock)


def test_registration_makes_worker_online_with_capabilities(registry: WorkerRegistry) -> None:
    view = registry.on_registration(registration("w1", models=("a", "b"), max_concurrent=3))
    assert view.status == "online" and view.registered
    assert view.models == ("a", "b") and view.max_concurrent == 3 and view.max_queue == 8
    assert view.hostname == "w1.local" and view.memory_gb == 64.0 and view.engine == "echo"
    assert registry.get("w1") == view
    assert registry.get("nope") is None
    assert "w1" in registry and len(registry) == 1


def test_offline_after_timeout_and_back_on_heartbeat(registry: WorkerRegistry, clock: FakeClock) -> None:
    registry.on_registration(registration("w1"))
    clock.advance(2.9)
    assert registry.sweep() == []
    registry.on_heartbeat(heartbeat("w1"))
    clock.advance(2.9)
    registry.sweep()
    assert registry.get("w1").status == "online"
    clock.advance(0.2)
    events = registry.sweep()
    assert events == [WorkerEvent(worker_id="w1", previous="online", current="offline")]
    assert registry.get("w1").status == "offline"
    assert registry.eligible("m") == []
    assert registry.on_heartbeat(heartbeat("w1", status="degraded")) is False
    assert registry.get("w1").status == "degraded"
    assert [w.id for w in registry.eligible("m")] == ["w1"]


def test_heartbeat_status_draining_is_not_eligible(registry: WorkerRegistry) -> None:
    registry.on_registration(registration("w1"))
    registry.on_heartbeat(heartbeat("w1", status="draining"))
    assert registry.get("w1").status == "draining"
    assert registry.eligible("m") == []


def test_unknown_heartbeat_creates_entry_that_asks_to_register(registry: WorkerRegistry, clock: FakeClock) -> None:
    assert registry.on_heartbeat(heartbeat("ghost", models_loaded=["m"], active=1)) is True
    view = registry.get("ghost")
    assert view is not None and not view.registered and view.status == "online"
    assert view.models == ("m",) and view.max_concurrent == 1
    assert [w.id for w in registry.eligible("m")] == ["ghost"]
    clock.advance(1)
    assert registry.on_heartbeat(heartbeat("ghost", models_loaded=["m"])) is False  # asked recently
    clock.advance(3)
    assert registry.on_heartbeat(heartbeat("ghost", models_loaded=["m"])) is True  # ask again
    registry.on_registration(registration("ghost", max_concurrent=6))
    assert registry.on_heartbeat(heartbeat("ghost")) is False
    view = registry.get("ghost")
    assert view.registered and view.max_concurrent == 6 and view.models == ("m",)


def test_deregister_removes_and_ignores_late_heartbeat(registry: WorkerRegistry, clock: FakeClock) -> None:
    registry.on_registration(registration("w1"))
    assert registry.on_deregister(Deregister(worker_id="w1", reason="bye")) is True
    assert "w1" not in registry
    assert registry.on_heartbeat(heartbeat("w1")) is False  # a heartbeat that was already on the wire
    assert "w1" not in registry
    assert registry.on_deregister(Deregister(worker_id="w1")) is False
    clock.advance(3.5)
    registry.sweep()
    assert registry.on_heartbeat(heartbeat("w1")) is True  # a new life: known again, asked to register


def test_static_workers_known_offline_keep_priority_and_tags(clock: FakeClock) -> None:
    config = make_config(
        workers={"static": [{"name": "big", "host": "10.0.0.9", "port": 9000, "priority": 5, "tags": ["gpu"]}]}
    )
    registry = WorkerRegistry(config, clock=clock)
    view = registry.get("big")
    assert view is not None and view.status == "offline" and view.static and not view.registered
    assert view.address == "10.0.0.9:9000" and view.seen_ago_s is None
    assert registry.on_heartbeat(heartbeat("big", models_loaded=["m"])) is True  # known but never registered
    registry.on_registration(registration("big"))
    view = registry.get("big")
    assert view.status == "online" and view.priority == 5 and view.tags == ("gpu",) and view.registered
    registry.on_deregister(Deregister(worker_id="big"))
    assert registry.get("big").status == "offline"
    clock.advance(1000)
    registry.sweep()
    assert "big" in registry  # static workers are never forgotten


def test_long_offline_workers_are_forgotten(registry: WorkerRegistry, clock: FakeClock) -> None:
    registry.on_registration(registration("w1"))
    clock.advance(3.1)
    registry.sweep()
    clock.advance(29)
    registry.sweep()
    assert "w1" in registry
    clock.advance(2)
    assert registry.sweep() == [WorkerEvent(worker_id="w1", previous="offline", current=None)]
    assert "w1" not in registry


def test_queries_by_status_tag_and_model(clock: FakeClock) -> None:
    config = make_config(workers={"static": [{"name": "s1", "tags": ["edge"]}, {"name": "s2", "priority": 2}]})
    registry = WorkerRegistry(config, clock=clock)
    registry.on_registration(registration("s2", models=("a",)))
    registry.on_registration(registration("w1", models=("a", "b")))
    registry.on_registration(registration("w2", models=("b",)))
    registry.on_heartbeat(heartbeat("w2", status="degraded"))
    assert [w.id for w in registry.query()] == ["s2", "s1", "w1", "w2"]  # priority first, then id
    assert [w.id for w in registry.query(status="offline")] == ["s1"]
    assert [w.id for w in registry.query(status=("online", "degraded"))] == ["s2", "w1", "w2"]
    assert [w.id for w in registry.query(tag="edge")] == ["s1"]
    assert [w.id for w in registry.query(model="b")] == ["w1", "w2"]
    assert [w.id for w in registry.eligible("a")] == ["s2", "w1"]
    assert [w.id for w in registry.eligible("a", exclude={"s2"})] == ["w1"]
    assert registry.eligible("missing") == []
    assert registry.models() == ["a", "b"]
    assert registry.has_model("a") and not registry.has_model("missing")
    assert registry.has_model("b")
    assert registry.is_offline("s1") and not registry.is_offline("w1") and registry.is_offline("missing")


def test_stats(registry: WorkerRegistry) -> None:
    registry.on_registration(registration("w1", max_concurrent=4))
    registry.on_registration(registration("w2", max_concurrent=2))
    registry.on_registration(registration("w3", max_concurrent=8))
    registry.on_heartbeat(heartbeat("w1", active=3, queued=1))
    registry.on_heartbeat(heartbeat("w2", status="degraded", active=1))
    registry.on_heartbeat(heartbeat("w3", status="draining", active=5))
    registry.begin("w1")
    stats = registry.stats()
    assert (stats.total, stats.online, stats.degraded, stats.draining, stats.offline) == (3, 1, 1, 1, 0)
    assert (stats.capacity, stats.active, stats.queued, stats.inflight) == (6, 4, 1, 1)


def test_load_combines_heartbeat_and_local_inflight(registry: WorkerRegistry) -> None:
    registry.on_registration(registration("w1", max_concurrent=4))
    registry.begin("w1")
    registry.begin("w1")
    view = registry.get("w1")
    assert (view.inflight, view.load, view.free_slots) == (2, 2, 2)
    registry.on_heartbeat(heartbeat("w1", active=5, queued=1))  # other controllers' requests too
    assert registry.get("w1").load == 6
    registry.begin("w1")
    assert registry.get("w1").load == 7
    for _ in range(3):
        registry.end("w1")
    view = registry.get("w1")
    assert view.inflight == 0 and view.load == 4 and view.utilization == 1.0
    registry.end("w1")  # an extra end never goes negative
    assert registry.get("w1").inflight == 0
    registry.begin("unknown")  # ignored
    registry.on_heartbeat(heartbeat("w1", active=0))
    assert registry.get("w1").load == 0


def test_heartbeat_updates_speed_memory_and_models(registry: WorkerRegistry) -> None:
    registry.on_registration(registration("w1", models=("a",)))
    registry.on_heartbeat(heartbeat("w1", tokens_per_second=42.0, available_memory_gb=7.5, models_loaded=["a", "c"]))
    view = registry.get("w1")
    assert view.tokens_per_second == 42.0 and view.available_memory_gb == 7.5 and view.models == ("a", "c")


def test_heartbeat_speculation_reaches_the_view(registry: WorkerRegistry) -> None:
    registry.on_registration(registration("w1"))
    assert registry.get("w1").speculation is None  # no heartbeat yet
    registry.on_heartbeat(heartbeat("w1", speculation=SpeculationCounts(steps=3, drafted=8, accepted=6)))
    assert registry.get("w1").speculation == SpeculationCounts(steps=3, drafted=8, accepted=6)
    registry.on_heartbeat(heartbeat("w1"))  # an engine that stopped speculating (or an older worker)
    assert registry.get("w1").speculation is None


def test_speculation_fields_keep_zeros_and_compute_the_acceptance_rate() -> None:
    fields = speculation_fields(SpeculationCounts(steps=3, drafted=8, accepted=6))
    assert fields == {
        "steps": 3,
        "drafted": 8,
        "accepted": 6,
        "model_drafted": 0,
        "model_accepted": 0,
        "acceptance_rate": 0.75,
        "model_acceptance_rate": 0.0,
    }
    assert speculation_fields(SpeculationCounts()) == {
        "steps": 0,
        "drafted": 0,
        "accepted": 0,
        "model_drafted": 0,
        "model_accepted": 0,
        "acceptance_rate": 0.0,
        "model_acceptance_rate": 0.0,
    }
    split = speculation_fields(SpeculationCounts(steps=2, drafted=8, accepted=6, model_drafted=4, model_accepted=1))
    assert split["model_acceptance_rate"] == 0.25
    assert speculation_fields(SpeculationCounts(steps=3, drafted=3, accepted=1))["acceptance_rate"] == 0.3333


def test_listeners_see_changes_and_errors_are_contained(registry: WorkerRegistry, clock: FakeClock) -> None:
    seen: list[WorkerEvent] = []

    def broken(event: WorkerEvent) -> None:
        raise RuntimeError("exporter bug")

    registry.add_listener(broken)
    registry.add_listener(seen.append)
    registry.on_registration(registration("w1"))
    registry.on_heartbeat(heartbeat("w1"))  # no change, no event
    registry.on_heartbeat(heartbeat("w1", status="degraded"))
    clock.advance(4)
    registry.sweep()
    registry.on_deregister(Deregister(worker_id="w1"))
    registry.remove_listener(seen.append)
    registry.on_registration(registration("w2"))
    assert [(e.previous, e.current) for e in seen] == [
        (None, "online"),
        ("online", "degraded"),
        ("degraded", "offline"),
        ("offline", None),
    ]


async def test_run_sweeper_marks_offline_and_stops() -> None:
    registry = WorkerRegistry(from_dict({"discovery": {"heartbeat_interval_ms": 10, "offline_timeout_ms": 40}}))
    registry.on_registration(registration("w1"))
    stop = asyncio.Event()
    task = asyncio.create_task(registry.run_sweeper(stop))
    await wait_until(lambda: registry.get("w1").status == "offline", what="the sweeper to mark w1 offline")
    stop.set()
    await asyncio.wait_for(task, 1)
