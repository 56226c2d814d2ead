"""Where a model would load: each worker's catalogue and memory budget against the model's bytes.

The same answer serves the placement preview (``GET /api/cluster/placement``), the admin load route and load
on demand. Per worker, from its last heartbeat:

* a worker that already serves the model (or is loading it) is the answer, no load needed;
* otherwise the model must be in its catalogue, the worker online or degraded (not drained), and the model's
  weights must fit ``budget − loaded weights − running requests' KV`` (the prompt cache gives way), after
  unloading idle, unpinned models, least recently used first;
* the best fit needs no eviction, then the most memory left, then the lightest load.

``force`` takes the worker with the most room among those that have the model in their catalogue even when
none fits, with a warning.
"""

from __future__ import annotations

from collections.abc import Iterable

from msgspec import Struct

from mlxcluster.api import ELIGIBLE_STATES
from mlxcluster.controller.routing.registry import FleetWorker


class Candidate(Struct, kw_only=True):
    """One worker judged for a model."""

    worker: str
    fits: bool
    reason: str = ""
    """Why it is excluded (or, when it fits, what it takes: already loaded, unloads...)."""
    loaded: bool = False
    budget_bytes: int = 0
    free_bytes: int = 0
    """Budget left for weights now: budget − loaded weights − running requests' KV (0: not reported)."""
    evict: list[str] = []
    """Idle models it would unload to make room."""
    free_after_bytes: int = 0
    load: int = 0


class Placement(Struct, kw_only=True):
    """Where ``model`` would load and why (``worker`` None: nowhere)."""

    model: str
    worker: str | None
    weights_bytes: int = 0
    kv_bytes_per_token: int = 0
    context_length: int = 0
    loaded_on: list[str] = []
    candidates: list[Candidate] = []
    forced: bool = False
    warning: str = ""

    def roomiest(self) -> str | None:
        """The worker to ask anyway when the controller's view says nothing fits for lack of memory alone: the one
        with the most room. Its view may be a heartbeat old (a model it still counts in flight may be idle now);
        the worker, which knows, unloads idle models for the load or refuses it with the real reason."""
        short = [c for c in self.candidates if not c.fits and c.reason.startswith("needs")]
        return max(short, key=lambda c: (c.free_after_bytes, -c.load)).worker if short else None

    def reason(self) -> str:
        """Why no worker can load it (every candidate's reason, or that no catalogue has it)."""
        if not self.candidates:
            return f"no worker has model {self.model!r} in its catalogue"
        return "; ".join(f"{c.worker}: {c.reason}" for c in self.candidates if not c.fits)


def place(model: str, fleet: Iterable[FleetWorker], *, force: bool = False, worker: str | None = None) -> Placement:
    """Judge every worker for ``model`` (``worker``: only that one) and choose one."""
    candidates: list[Candidate] = []
    weights = kv_per_token = context = 0
    loaded_on: list[str] = []
    for member in fleet:
        entry = member.catalogue.get(model)
        if model in member.models and member.status in ELIGIBLE_STATES:
            loaded_on.append(member.id)
        if entry is not None:
            weights = weights or entry.weights_bytes
            kv_per_token = kv_per_token or entry.kv_bytes_per_token
            context = context or entry.context_length
        if worker is not None and member.id != worker:
            continue
        if entry is None and model not in member.models:
            if worker is not None:
                candidates.append(Candidate(worker=member.id, fits=False, reason="the model is not in its catalogue"))
            continue
        candidates.append(_judge(model, member, entry.weights_bytes if entry is not None else 0))
    fitting = [c for c in candidates if c.fits]
    placement = Placement(
        model=model,
        worker=None,
        weights_bytes=weights,
        kv_bytes_per_token=kv_per_token,
        context_length=context,
        loaded_on=loaded_on,
        candidates=candidates,
    )
    if fitting:
        best = min(fitting, key=lambda c: (not c.loaded, bool(c.evict), -c.free_after_bytes, c.load, c.worker))
        placement.worker = best.worker
    elif force:
        eligible = [c for c in candidates if c.reason.startswith("needs")]
        if eligible:
            best = max(eligible, key=lambda c: (c.free_after_bytes, -c.load))
            placement.worker, placement.forced = best.worker, True
            placement.warning = f"forced past the memory budget of {best.worker}: {best.reason}"
    return placement


def _judge(model: str, member: FleetWorker, weights: int) -> Candidate:
    state = member.states.get(model)
    base = Candidate(worker=member.id, fits=False, load=member.load)
    memory = member.memory
    if memory is not None:
        base.budget_bytes = memory.budget_bytes
        base.free_bytes = max(0, memory.budget_bytes - memory.weights_bytes - memory.kv_bytes)
    if member.status not in ELIGIBLE_STATES:
        base.reason = f"it is {member.status}"
        return base
    if model in member.models or (state is not None and state.state == "loading"):
        base.fits, base.loaded = True, True
        base.reason = "already loaded" if model in member.models else "loading it now"
        base.free_after_bytes = base.free_bytes
        return base
    if state is not None and state.state == "unloading":
        base.reason = "it is unloading the model"
        return base
    if memory is None or memory.budget_bytes == 0:
        base.fits, base.reason = True, "no memory budget reported"
        return base
    free = base.free_bytes
    if weights <= free:
        base.fits, base.free_after_bytes = True, free - weights
        base.reason = "fits"
        return base
    idle = sorted(
        (s for s in member.states.values() if s.state == "loaded" and not s.pinned and s.in_flight == 0),
        key=lambda s: s.last_used,
    )
    evict: list[str] = []
    for victim in idle:
        if free >= weights:
            break
        evict.append(victim.name)
        free += victim.weights_bytes
    if free >= weights:
        base.fits, base.evict, base.free_after_bytes = True, evict, free - weights
        base.reason = f"fits after unloading {', '.join(evict)}"
        return base
    base.free_after_bytes = free - weights
    base.reason = (
        f"needs {_gib(weights)} for weights; {_gib(max(0, free))} of its {_gib(memory.budget_bytes)} budget would be "
        f"free after unloading every idle unpinned model"
    )
    return base


def _gib(count: int) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    if count >= 1024**3:
        return f"{count / 1024**3:.2f} GiB"
    return f"{count / 1024**2:.1f} MiB"
