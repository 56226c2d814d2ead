"""The balancer interface: what a load-balancing plugin receives and returns.

A balancer is built by its registered factory with no arguments and answers
``pick(workers, request) -> WorkerView | None``. ``workers`` holds only *eligible* workers (online or
degraded, serving ``request.model``, not excluded by a retry), already narrowed to the preferred priority
tier; a balancer never sees offline workers. It returns one of them, or ``None`` to refuse (the
controller then answers "no capacity"). The controller calls it from its event loop, one pick at a time,
so a balancer may keep plain mutable state without locks. It must be quick and must not block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from msgspec import Struct

from mlxcluster.protocol import GroupInfo, InferenceRequest

WorkerState = Literal["online", "degraded", "draining", "offline"]
ELIGIBLE_STATES: frozenset[WorkerState] = frozenset({"online", "degraded"})


class WorkerView(Struct, frozen=True, kw_only=True):
    """A read-only snapshot of one worker, as the registry saw it when the view was made.

    ``active``/``queued`` are what the worker last reported, ``inflight`` is what this controller has sent
    it and not yet seen finish, and ``load`` is the registry's best estimate of requests on the worker
    now (see :meth:`mlxcluster.controller.registry.WorkerRegistry.begin`). Balancers should use ``load``.
    """

    id: str
    status: WorkerState
    priority: int = 0
    tags: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    active: int = 0
    queued: int = 0
    inflight: int = 0
    load: int = 0
    max_concurrent: int = 1
    max_queue: int = 0
    tokens_per_second: float = 0.0
    """Measured generation speed last reported (0: not measured yet)."""
    available_memory_gb: float = 0.0
    """Free memory last reported (0: not reported)."""
    memory_gb: float = 0.0
    hostname: str = ""
    address: str = ""
    engine: str = ""
    version: str = ""
    static: bool = False
    registered: bool = False
    """False for a static entry that has not registered yet, or a worker known only from heartbeats."""
    seen_ago_s: float | None = None
    """Seconds since the last message from the worker when the view was made (``None``: never heard)."""
    requests_total: int = 0
    errors_total: int = 0
    group: GroupInfo | None = None
    """Set when the worker is a worker group's rank 0 (the group's name, size, parallelism and members)."""

    @property
    def free_slots(self) -> int:
        """Requests the worker can start now without queueing."""
        return max(0, self.max_concurrent - self.load)

    @property
    def utilization(self) -> float:
        """``load`` relative to capacity: 0.0 idle, 1.0 every slot busy, above 1.0 queueing."""
        return self.load / max(1, self.max_concurrent)


@runtime_checkable
class Balancer(Protocol):
    """A load-balancing strategy."""

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """Choose one of ``workers`` for ``request``, or ``None`` to refuse."""
        ...
