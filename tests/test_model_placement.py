"""Where a model would load, judged from workers' last heartbeats (``model_placement.place``): loaded first, then
no eviction, then the most room; idle unpinned models unloaded least recently used first; the reasons a worker
is excluded; force; and the worker asked anyway when the view is short of memory alone (it may be stale)."""

from __future__ import annotations

from mlxcluster.controller.routing.model_placement import place
from mlxcluster.controller.routing.registry import FleetWorker
from mlxcluster.protocol import CatalogueModel, MemoryParts, ModelState

MIB = 1024**2


def worker(
    name: str,
    *,
    budget: int = 100 * MIB,
    loaded: dict[str, tuple[int, float, bool, int]] | None = None,
    catalogue: dict[str, int] | None = None,
    status: str = "online",
    kv: int = 0,
    load: int = 0,
) -> FleetWorker:
    """``loaded``: name → (weights, last_used, pinned, in_flight); ``catalogue``: name → weights."""
    loaded = loaded or {}
    entries = {n: CatalogueModel(name=n, weights_bytes=w) for n, w in (catalogue or {}).items()}
    for n, (w, *_rest) in loaded.items():
        entries.setdefault(n, CatalogueModel(name=n, weights_bytes=w))
    states = {
        n: ModelState(name=n, weights_bytes=w, last_used=used, pinned=pinned, in_flight=flight)
        for n, (w, used, pinned, flight) in loaded.items()
    }
    return FleetWorker(
        id=name,
        status=status,  # type: ignore[arg-type]
        models=tuple(loaded),
        catalogue=entries,
        states=states,
        memory=MemoryParts(budget_bytes=budget, weights_bytes=sum(w for w, *_ in loaded.values()), kv_bytes=kv),
        load=load,
        max_concurrent=8,
    )


def test_loaded_beats_room_and_room_beats_eviction() -> None:
    fleet = [
        worker("w-evict", loaded={"x": (60 * MIB, 1.0, False, 0)}, catalogue={"m": 50 * MIB}),
        worker("w-room", catalogue={"m": 50 * MIB}),
        worker("w-busy-room", catalogue={"m": 50 * MIB}, load=5),
    ]
    chosen = place("m", fleet)
    assert chosen.worker == "w-room" and chosen.weights_bytes == 50 * MIB
    reasons = {c.worker: c.reason for c in chosen.candidates}
    assert reasons == {"w-evict": "fits after unloading x", "w-room": "fits", "w-busy-room": "fits"}
    fleet.append(worker("w-has-it", loaded={"m": (50 * MIB, 1.0, False, 3)}))
    assert place("m", fleet).worker == "w-has-it" and place("m", fleet).loaded_on == ["w-has-it"]


def test_least_recently_used_idle_unpinned_models_go_first() -> None:
    loaded = {
        "old": (30 * MIB, 1.0, False, 0),
        "pinned": (30 * MIB, 0.5, True, 0),
        "busy": (20 * MIB, 0.1, False, 1),
        "new": (15 * MIB, 9.0, False, 0),
    }
    (candidate,) = place("m", [worker("w", loaded=loaded, catalogue={"m": 30 * MIB})]).candidates
    assert candidate.fits and candidate.evict == ["old"] and candidate.free_bytes == 5 * MIB
    (candidate,) = place("m", [worker("w", loaded=loaded, catalogue={"m": 40 * MIB})]).candidates
    assert candidate.fits and candidate.evict == ["old", "new"]


def test_exclusions_force_and_the_worker_asked_anyway() -> None:
    fleet = [
        worker("w-full", loaded={"x": (80 * MIB, 1.0, False, 1)}, catalogue={"m": 50 * MIB}),
        worker("w-drain", catalogue={"m": 50 * MIB}, status="draining"),
        worker("w-other", catalogue={"z": MIB}),
    ]
    chosen = place("m", fleet)
    assert chosen.worker is None
    reasons = {c.worker: c.reason for c in chosen.candidates}
    assert reasons["w-drain"] == "it is draining" and "w-other" not in reasons
    assert reasons["w-full"] == (
        "needs 50.0 MiB for weights; 20.0 MiB of its 100.0 MiB budget would be free after unloading every idle "
        "unpinned model"
    )
    # x may have finished since the last heartbeat: the worker, which knows, is asked anyway
    assert chosen.roomiest() == "w-full"
    forced = place("m", fleet, force=True)
    assert forced.worker == "w-full" and forced.forced and forced.warning.startswith("forced past the memory budget")
    only = place("m", fleet, worker="w-other")
    assert only.worker is None and only.candidates[0].reason == "the model is not in its catalogue"
    assert place("m", [fleet[1]]).roomiest() is None  # draining: not asked


def test_running_kv_counts_against_room() -> None:
    (candidate,) = place("m", [worker("w", catalogue={"m": 50 * MIB}, kv=60 * MIB)]).candidates
    assert not candidate.fits and candidate.free_bytes == 40 * MIB
