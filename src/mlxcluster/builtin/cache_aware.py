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

Ties go to the lower load, then to the lower id (the next pick sees the chosen one's load go up). On the
registry's list (its ``by_load`` hints) a pick costs one lookup plus a few set operations per level of the
match: no pass over the fleet, in Python or in C.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from operator import attrgetter

from mlxcluster.api import (
    BalancerContext,
    CacheAwareSection,
    Cursor,
    InferenceRequest,
    LoadBuckets,
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
        by_load: LoadBuckets | None = getattr(workers, "by_load", None)
        positions: dict[str, int] | None = getattr(workers, "positions", None)
        capacity: int = getattr(workers, "capacity", 0)
        fast = by_load is not None and positions is not None and capacity > 0
        if fast:
            assert by_load is not None  # for mypy: ``fast`` says so
            lowest, highest = min(by_load), max(by_load)  # a handful of distinct loads
        else:
            loads = list(map(_load, workers))
            lowest, highest = min(loads), max(loads)
        if highest - lowest > self.balance_abs_threshold and highest > self.balance_rel_threshold * lowest:
            return least_utilized(workers, self._cursor)
        if fast:
            assert by_load is not None and positions is not None
            best, depth = self._best_by_level(workers, match, by_load, positions, capacity)
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
        by_load: LoadBuckets,
        positions: dict[str, int],
        capacity: int,
    ) -> tuple[WorkerView | None, int]:
        """:meth:`_best_by_worker` on the registry's list, one capacity for all, without a pass over the fleet:
        per level of the match (deepest first), its least loaded holder is the level's best, found by
        intersecting the level with the load buckets from the lowest load up (a system prompt that all of a
        large fleet holds costs a few set operations). Ties between equally loaded holders go to the lower
        position in the list (the registry's list is in id order)."""
        blocks, weight = match.blocks, self.load_weight
        best_index, best_score, best_load, best_depth = -1, 0.0, 0, 0
        ascending: list[int] | None = None
        for depth, members in match.levels:  # deepest first
            share = depth / blocks
            if best_index >= 0 and share < best_score:
                break  # even an idle holder of a shallower level cannot score as much
            if len(members) <= SMALL_LEVEL:
                holders = [(workers[i].load, i) for i in map(positions.get, members) if i is not None]
                if not holders:
                    continue
                load, index = min(holders)
            else:
                if ascending is None:
                    ascending = sorted(by_load)
                found = _least_loaded_member(members, by_load, ascending, positions)
                if found is None:
                    continue
                load, index = found
            if load >= capacity:  # the whole level is saturated: queueing there costs more than prefill
                continue
            score = share - weight * load / capacity
            if (
                best_index < 0
                or score > best_score
                or (score == best_score and (load, index) < (best_load, best_index))
            ):
                best_index, best_score, best_load, best_depth = index, score, load, depth
        return (workers[best_index], best_depth) if best_index >= 0 else (None, 0)

    def _best_by_worker(self, workers: Sequence[WorkerView], match: PrefixMatch) -> tuple[WorkerView | None, int]:
        """Any list of workers, the straightforward definition: the holder with a free slot and the highest
        score (ties: lower load, then lower id)."""
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


SMALL_LEVEL = 8
"""A level with at most this many holders is scored holder by holder; a larger one through the load buckets."""


def _least_loaded_member(
    members: Collection[str], by_load: LoadBuckets, ascending: list[int], positions: dict[str, int]
) -> tuple[int, int] | None:
    """The lowest load among ``members`` that are in the list, and the lowest position at that load."""
    for load in ascending:
        bucket = by_load[load]
        tied = bucket & members if isinstance(members, (set, frozenset)) else bucket.intersection(members)
        if tied:
            return load, min(map(positions.__getitem__, tied))
    return None
