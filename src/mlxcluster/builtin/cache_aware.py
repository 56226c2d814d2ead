"""The ``cache_aware`` balancer: send a prompt where its prefix is already cached, unless load says no.

Per pick, from the controller's cache index (:meth:`BalancerContext.prefix_match`), each candidate's
share of the prompt's blocks held in its prompt cache. Then, in order:

1. nobody holds anything of the prompt → the least loaded worker (exactly ``least_loaded``);
2. the cluster is imbalanced — the busiest candidate has more than ``balance_abs_threshold`` requests
   more than the idlest *and* more than ``balance_rel_threshold`` times its load (SGLang's rule) →
   the least loaded worker;
3. among holders with a free slot (a saturated holder is passed over), the best
   ``score = share held − load_weight × utilization`` (Dynamo's overlap-minus-load, in shares);
4. the best holder's share is below ``cache_threshold``, or every holder is saturated → least loaded.

Ties go to the lower load; between equally loaded holders of the same prefix, any one of them (the
next pick sees its load go up). On the registry's list a pick costs one lookup plus C-level passes
over the loads and the holders, no Python loop over the fleet.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from mlxcluster.api import (
    BalancerContext,
    CacheAwareSection,
    Cursor,
    InferenceRequest,
    PrefixMatch,
    WorkerView,
    least_utilized,
)

_load = attrgetter("load")


class CacheAware:
    """Prompt-cache holders first, weighed against load; least loaded when it matters more.

    :param context: given by the controller (the cache index and ``[load_balancing.cache_aware]``);
        without one (a balancer built outside a controller) it behaves as ``least_loaded``.
    """

    def __init__(self, context: BalancerContext | None = None) -> None:
        self.context = context or BalancerContext()
        settings: CacheAwareSection = self.context.settings.cache_aware
        self.cache_threshold = settings.cache_threshold
        self.balance_abs_threshold = settings.balance_abs_threshold
        self.balance_rel_threshold = settings.balance_rel_threshold
        self.load_weight = settings.load_weight
        self._cursor = Cursor()
        self.cache_picks = 0
        """Picks that followed the cache (the rest went to the least loaded worker)."""

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """The best holder of the prompt's prefix, or the least loaded worker."""
        if not workers:
            return None
        match = self.context.prefix_match(request)
        if not match.levels:
            return least_utilized(workers, self._cursor)
        loads: list[int] = getattr(workers, "loads", None) or list(map(_load, workers))
        lowest, highest = min(loads), max(loads)
        if highest - lowest > self.balance_abs_threshold and highest > self.balance_rel_threshold * lowest:
            return least_utilized(workers, self._cursor)
        positions: dict[str, int] | None = getattr(workers, "positions", None)
        capacity: int = getattr(workers, "capacity", 0)
        if positions is not None and capacity > 0:
            best, depth = self._best_by_level(workers, match, loads, positions, capacity)
        else:
            best, depth = self._best_by_worker(workers, match)
        if best is None or depth / match.blocks < self.cache_threshold:
            return least_utilized(workers, self._cursor)
        self.cache_picks += 1
        return best

    def _best_by_level(
        self,
        workers: Sequence[WorkerView],
        match: PrefixMatch,
        loads: list[int],
        positions: dict[str, int],
        capacity: int,
    ) -> tuple[WorkerView | None, int]:
        """The registry's list, one capacity for all: per level of the match, the least loaded holder is
        the level's best, found with C-level set and map operations (a system prompt that all of a large
        fleet holds costs no Python loop over the fleet)."""
        blocks, weight = match.blocks, self.load_weight
        best_index, best_score, best_depth = -1, 0.0, 0
        for depth, members in match.levels:  # deepest first
            share = depth / blocks
            if best_index >= 0 and share <= best_score:
                break  # even an idle holder of a shallower level cannot score more
            indices = (
                [positions[w] for w in members if w in positions]
                if len(members) < 8
                else list(map(positions.__getitem__, positions.keys() & members))
            )
            if not indices:
                continue
            index = min(indices, key=loads.__getitem__)
            load = loads[index]
            if load >= capacity:  # the whole level is saturated: queueing there costs more than prefill
                continue
            score = share - weight * load / capacity
            if best_index < 0 or score > best_score:
                best_index, best_score, best_depth = index, score, depth
        return (workers[best_index], best_depth) if best_index >= 0 else (None, 0)

    def _best_by_worker(self, workers: Sequence[WorkerView], match: PrefixMatch) -> tuple[WorkerView | None, int]:
        """Any list of workers: score each holder (ties: lower load, then lower id)."""
        held, blocks, weight = match.held, match.blocks, self.load_weight
        best: WorkerView | None = None
        best_key: tuple[float, int] | None = None
        best_depth = 0
        for worker in workers:
            depth = held.get(worker.id)
            if depth is None or worker.load >= worker.max_concurrent:  # not a holder, or saturated
                continue
            key = (depth / blocks - weight * worker.load / worker.max_concurrent, -worker.load)
            if best_key is None or key > best_key or (key == best_key and best is not None and worker.id < best.id):
                best, best_key, best_depth = worker, key, depth
        return best, best_depth
