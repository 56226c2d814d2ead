"""The balancer interface: what a load-balancing plugin receives and returns.

A balancer is built by its registered factory and answers
``pick(workers, request) -> WorkerView | None``. ``workers`` holds only *eligible* workers (online or
degraded, serving ``request.model``, not excluded by a retry), already narrowed to the preferred priority
tier; a balancer never sees offline workers. It returns one of them, or ``None`` to refuse (the
controller then answers "no capacity"). The controller calls it from its event loop, one pick at a time,
so a balancer may keep plain mutable state without locks. It must be quick and must not block, and it must
not change ``workers`` (the registry lends its own list, read-only: see :class:`EligibleWorkers`).

A factory is called with no arguments, unless it has a parameter named ``context``: then it gets a
:class:`BalancerContext` as ``context=`` (the ``[load_balancing]`` settings and
:meth:`BalancerContext.prefix_match`, what each worker's prompt cache holds of a request). Factories
written before the context existed keep working unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Literal, NoReturn, Protocol, runtime_checkable

from msgspec import Struct

from mlxcluster.config import LoadBalancingSection
from mlxcluster.prefix_digest import canonical_text
from mlxcluster.protocol import (
    AcceleratorStats,
    GroupInfo,
    InferenceRequest,
    MemoryParts,
    PromptCacheStats,
    SpeculationCounts,
)

WorkerState = Literal["online", "degraded", "draining", "offline"]
ELIGIBLE_STATES: frozenset[WorkerState] = frozenset({"online", "degraded"})


class WorkerView(Struct, frozen=True, kw_only=True):
    """A read-only snapshot of one worker, as the registry saw it when the view was made.

    ``active``/``queued`` are what the worker last reported, ``inflight`` is what this controller has sent
    it and not yet seen finish, and ``load`` is the registry's best estimate of requests on the worker
    now (see :meth:`mlxcluster.controller.routing.registry.WorkerRegistry.begin`). Balancers should use ``load``.
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
    prompt_cache: PromptCacheStats | None = None
    """The worker's prompt cache as its last heartbeat reported it (``None``: it has none)."""
    speculation: SpeculationCounts | None = None
    """The worker's speculative decoding (verify steps, drafted and accepted tokens, counted since it started) as
    its last heartbeat reported it (``None``: no engine of it speculates)."""
    group: GroupInfo | None = None
    """Set when the worker is a worker group's rank 0 (the group's name, size, parallelism and members)."""
    memory: MemoryParts | None = None
    """Its memory budget and what takes it (weights, prompt cache, running requests' KV), as last reported."""
    accelerator: AcceleratorStats | None = None
    """Its MLX memory and GPU load as its last heartbeat reported them (``None``: not reported)."""

    @property
    def gpu_utilization(self) -> float | None:
        """The GPU's busy share last reported, 0.0-1.0 (``None``: not known for this worker)."""
        accelerator = self.accelerator
        if accelerator is None or accelerator.gpu_utilization is None:
            return None
        return min(1.0, max(0.0, accelerator.gpu_utilization / 100))

    @property
    def memory_full(self) -> bool:
        """True when loaded weights and the running requests' KV fill the memory budget: a new request would
        wait for memory there (the prompt cache does not count: it gives way)."""
        memory = self.memory
        return (
            memory is not None
            and memory.budget_bytes > 0
            and memory.weights_bytes + memory.kv_bytes >= memory.budget_bytes
        )

    @property
    def free_slots(self) -> int:
        """Requests the worker can start now without queueing."""
        return max(0, self.max_concurrent - self.load)

    @property
    def utilization(self) -> float:
        """``load`` relative to capacity: 0.0 idle, 1.0 every slot busy, above 1.0 queueing."""
        return self.load / max(1, self.max_concurrent)


class LoadBuckets(dict[int, set[str]]):
    """Worker ids grouped by ``load`` (only loads some worker has): the few distinct loads of a fleet are
    its keys, so the lowest and highest load, and the least loaded of any set of ids, cost a handful of
    C-level set operations instead of a pass over the fleet."""

    __slots__ = ()

    def add(self, worker_id: str, load: int) -> None:
        """Count ``worker_id`` at ``load``."""
        bucket = self.get(load)
        if bucket is None:
            self[load] = {worker_id}
        else:
            bucket.add(worker_id)

    def move(self, worker_id: str, old: int, new: int) -> None:
        """``worker_id``'s load went from ``old`` to ``new``."""
        bucket = self.get(old)
        if bucket is not None:
            bucket.discard(worker_id)
            if not bucket:
                del self[old]
        self.add(worker_id, new)


class EligibleWorkers(list[WorkerView]):
    """The list of workers a pick starts from (a list to any balancer, read-only), with hints the registry
    knows for free: ``uniform`` (every worker online and of one priority, so there is no tier to narrow to),
    ``positions`` (worker id → index in this list; ``None`` when the list was filtered), ``loads``,
    ``by_load`` and ``capacity``. Balancers that ignore them lose nothing but speed.

    The registry lends its own list for a pick (copying a thousand views costs more than the rest of a
    pick), so changing it raises :class:`TypeError`: a balancer that wants to reorder copies it first
    (``sorted(workers, ...)``, ``list(workers)``). It and its hints are current while the pick runs, not
    after; read the hints, never change them."""

    __slots__ = ("by_load", "capacity", "loads", "positions", "uniform")

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("the eligible workers are the registry's, read-only: copy them first (list(workers))")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = sort = reverse = clear = _read_only

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.positions: dict[str, int] | None = None
        self.uniform = False
        self.capacity = 0
        """The ``max_concurrent`` every worker here shares (0: they differ, or unknown)."""
        self.loads: list[int] | None = None
        """``load`` of each worker, in list order (``None`` when the list was filtered)."""
        self.by_load: LoadBuckets | None = None
        """The ids of this list's workers by ``load`` (``None`` when the list was filtered). The registry's own,
        kept current as loads change: read it during the pick, never change it."""


@runtime_checkable
class Balancer(Protocol):
    """A load-balancing strategy."""

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """Choose one of ``workers`` for ``request``, or ``None`` to refuse."""
        ...


BalancerFactory = Callable[..., Balancer]
"""What ``mlxcluster_register_balancers`` registers: called with no arguments, or with ``context=`` a
:class:`BalancerContext` when it has a parameter named ``context``; it returns a :class:`Balancer`."""


class PrefixMatch:
    """What the workers' prompt caches hold of one request's prompt, as the controller's index knows it.

    The prompt is counted in blocks of :data:`mlxcluster.prefix_digest.BLOCK_CHARS` characters of its
    canonical text. ``levels`` are ``(blocks held, worker ids)`` pairs, deepest first (a worker in two
    counts at the deeper); ``held`` is the same as a mapping worker id → blocks (workers holding nothing are absent). An
    estimate: the worker's own cache decides reuse token by token.
    """

    __slots__ = ("_held", "blocks", "levels")

    def __init__(self, blocks: int = 0, levels: Sequence[tuple[int, Collection[str]]] = ()) -> None:
        self.blocks = blocks
        self.levels = levels
        self._held: dict[str, int] | None = None

    @property
    def held(self) -> dict[str, int]:
        """Worker id → leading blocks of the prompt it holds."""
        if self._held is None:
            self._held = {worker: depth for depth, workers in reversed(self.levels) for worker in workers}
        return self._held

    def fraction(self, worker_id: str) -> float:
        """Share of the prompt's blocks ``worker_id`` holds (0.0 to 1.0)."""
        return self.held.get(worker_id, 0) / self.blocks if self.blocks else 0.0


NO_MATCH = PrefixMatch()


class CacheLookup(Protocol):
    """The controller's cache index as a balancer sees it (``controller/routing/cache_index.py``'s ``CacheIndex``)."""

    def match_levels(self, model: str, text: str) -> Sequence[tuple[int, Collection[str]]]: ...
    def blocks(self, text: str) -> int: ...
    def __len__(self) -> int:
        """Entries held: with none, no prompt needs hashing."""
        ...


class BalancerContext:
    """What the controller offers a balancer factory that asks for it (a ``context`` parameter).

    :param settings: the ``[load_balancing]`` section.
    :param cache: the cache index; ``None`` where there is none (a balancer built outside a controller).
    """

    def __init__(self, settings: LoadBalancingSection | None = None, cache: CacheLookup | None = None) -> None:
        self.settings = settings or LoadBalancingSection()
        self.cache = cache
        self._last: tuple[InferenceRequest, PrefixMatch] | None = None

    def prefix_match(self, request: InferenceRequest) -> PrefixMatch:
        """What each worker holds of ``request``'s prompt. Computed once per request (a retry's second
        pick reuses it); ``NO_MATCH`` without an index or for an empty prompt."""
        last = self._last
        if last is not None and last[0] is request:
            return last[1]
        cache = self.cache
        if cache is None or len(cache) == 0:  # nothing cached anywhere (yet): skip hashing the prompt
            return NO_MATCH
        text = canonical_text(request.messages, request.prompt)
        blocks = cache.blocks(text)
        found = PrefixMatch(blocks, cache.match_levels(request.model, text)) if blocks else NO_MATCH
        self._last = (request, found)
        return found
