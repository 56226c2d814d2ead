"""``power_of_two``: sample two eligible workers at random, pick the less loaded one.

The "power of two choices" policy (Mitzenmacher), as the SGLang and vLLM routers use it: nearly the queue
lengths of always choosing the least loaded worker, without herding a burst of requests onto the one
worker that looked idle when they arrived.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mlxcluster.api import InferenceRequest, Register, WorkerView, hookimpl

__version__ = "0.1.0"


class PowerOfTwo:
    """Two distinct workers drawn uniformly at random; the one with the lower utilization wins.

    Utilization is ``load / max_concurrent`` (so a big worker with a few requests beats a small one with
    the same number); equal utilization goes to the lower ``load``, then to the first one drawn.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """The less loaded of two random workers (the only one when there is one, ``None`` when none)."""
        if len(workers) < 2:
            return workers[0] if workers else None
        first, second = self._random.sample(list(workers), 2)
        return second if (second.utilization, second.load) < (first.utilization, first.load) else first


@hookimpl
def mlxcluster_register_balancers(register: Register) -> None:
    """Register ``power_of_two``."""
    register("power_of_two", PowerOfTwo, "Two random eligible workers, the less loaded one wins.")
