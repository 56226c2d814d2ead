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

Ties go to the lower load, then the lower id. A pick is one pass over the candidates plus one lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlxcluster.builtin.balancers import Cursor, least_utilized
from mlxcluster.config import CacheAwareSection
from mlxcluster.controller.balancer_api import BalancerContext, WorkerView
from mlxcluster.protocol import InferenceRequest


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
        held = match.held
        if not held:
            return least_utilized(workers, self._cursor)
        holders = [w for w in workers if w.id in held]
        if not holders:
            return least_utilized(workers, self._cursor)
        lowest = min(w.load for w in workers)
        highest = max(w.load for w in workers)
        if highest - lowest > self.balance_abs_threshold and highest > self.balance_rel_threshold * lowest:
            return least_utilized(workers, self._cursor)
        blocks = match.blocks
        weight = self.load_weight
        best: WorkerView | None = None
        best_key: tuple[float, int, str] | None = None
        for worker in holders:
            if worker.load >= worker.max_concurrent:  # saturated: queueing behind others costs more than prefill
                continue
            key = (held[worker.id] / blocks - weight * worker.load / worker.max_concurrent, -worker.load, worker.id)
            if best_key is None or key[:2] > best_key[:2] or (key[:2] == best_key[:2] and key[2] < best_key[2]):
                best, best_key = worker, key
        if best is None or held[best.id] / blocks < self.cache_threshold:
            return least_utilized(workers, self._cursor)
        self.cache_picks += 1
        return best
