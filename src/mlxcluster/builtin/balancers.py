"""Built-in load-balancing strategies, registered through the same hook as third-party plugins.

Every strategy receives only eligible workers (see :mod:`mlxcluster.api.balancer`) and keeps its state
bounded: a cursor, or an LRU of at most ``max_entries`` keys (the helpers in :mod:`mlxcluster.api.helpers`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from mlxcluster.api import (
    DEFAULT_MAX_ENTRIES,
    Cursor,
    InferenceRequest,
    LruMap,
    Register,
    WorkerView,
    best,
    hookimpl,
    least_utilized,
)
from mlxcluster.builtin.cache_aware import CacheAware

MIN_GPU_HEADROOM = 0.05
"""The least share of a GPU ``hardware_aware`` counts on: a saturated GPU still serves, only slower."""
GPU_WEIGHT = 1.0
"""How much of an idle worker's reported GPU utilization ``hardware_aware`` takes off its score
(headroom ``1 - GPU_WEIGHT * utilization``)."""


class RoundRobin:
    """Each worker in turn, by id."""

    def __init__(self) -> None:
        self._cursor = Cursor()

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """The next worker after the previous pick."""
        return self._cursor.next(workers) if workers else None


class LeastLoaded:
    """Lowest (active + queued) relative to capacity; ties round-robin."""

    def __init__(self) -> None:
        self._cursor = Cursor()

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """The least utilized worker."""
        return least_utilized(workers, self._cursor) if workers else None


class RandomChoice:
    """Uniformly random among the eligible workers."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """Any worker, each equally likely."""
        return self._random.choice(workers) if workers else None


class HardwareAware:
    """Measured speed times free capacity times GPU headroom, among workers with memory to spare.

    A worker that reports free memory (``available_memory_gb > 0``) below ``min_free_memory_gb`` is left
    out: having the model loaded is not enough if there is no room for its KV cache. Model sizes are never
    guessed from names. Among workers with a free slot the score is ``tokens_per_second * free_slots /
    max_concurrent * headroom``. The GPU utilization a heartbeat reports is the whole GPU's, this worker's own
    decoding included (one stream keeps a Mac's GPU near 100%), so it counts only for a worker serving nothing
    (``active`` and ``load`` both 0): there it is load the worker cannot explain, something else on the machine,
    and ``headroom`` is ``1 - GPU_WEIGHT * gpu_utilization`` (at least :data:`MIN_GPU_HEADROOM`). A busy worker's
    headroom is 1: its load is already in ``free_slots``. A worker that has not measured its speed yet counts at
    the mean of those that have, and an idle one that does not report its GPU at the mean headroom of the idle
    ones that do. When every slot is busy, the least utilized worker wins. Ties go round-robin.
    """

    def __init__(self, min_free_memory_gb: float = 0.5) -> None:
        self.min_free_memory_gb = min_free_memory_gb
        self._cursor = Cursor()

    @staticmethod
    def headroom(gpu_utilization: float) -> float:
        """The share of a GPU at ``gpu_utilization`` (0-1) that a new request can expect."""
        return max(MIN_GPU_HEADROOM, 1.0 - GPU_WEIGHT * gpu_utilization)

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """The worker with the best speed × free-capacity × GPU-headroom score."""
        roomy = [w for w in workers if w.available_memory_gb <= 0 or w.available_memory_gb >= self.min_free_memory_gb]
        if not roomy:
            return None
        measured = [w.tokens_per_second for w in roomy if w.tokens_per_second > 0]
        default_speed = sum(measured) / len(measured) if measured else 1.0
        known = [self.headroom(u) for w in roomy if _idle(w) and (u := w.gpu_utilization) is not None]
        default_headroom = sum(known) / len(known) if known else 1.0

        def score(w: WorkerView) -> tuple[float, float]:
            if w.free_slots:
                speed = w.tokens_per_second if w.tokens_per_second > 0 else default_speed
                headroom = 1.0
                if _idle(w):
                    gpu = w.gpu_utilization
                    headroom = self.headroom(gpu) if gpu is not None else default_headroom
                return (1.0, speed * w.free_slots / max(1, w.max_concurrent) * headroom)
            return (0.0, -w.utilization)

        return best(roomy, score, self._cursor)


def _idle(worker: WorkerView) -> bool:
    """Serving nothing, as the worker reported and as this controller counts: its GPU load is someone else's."""
    return worker.active == 0 and worker.load == 0


def affinity_key(request: InferenceRequest, prefix_chars: int) -> bytes | None:
    """A 16-byte digest of the session id, else of the first ``prefix_chars`` characters of the prompt.

    Chat messages are flattened as ``role\\0content\\0`` so that conversations sharing a system prompt and
    first turns share a key. Returns ``None`` when the request has neither.
    """
    if request.session_id:
        text = "session\0" + request.session_id
    elif request.prompt:
        text = "prompt\0" + request.prompt[:prefix_chars]
    elif request.messages:
        parts: list[str] = []
        size = 0
        for message in request.messages:
            parts.append(f"{message.role}\0{message.content}\0")
            size += len(parts[-1])
            if size >= prefix_chars:
                break
        text = "chat\0" + "".join(parts)[:prefix_chars]
    else:
        return None
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class PrefixAffinity:
    """Same session id or prompt prefix → same worker (its KV/prefix cache is warm), else least loaded.

    The remembered worker is used while it is eligible and has a free slot, or while no other worker has
    one. When it is busy and another is free, the request goes to the least loaded worker but the key
    stays with the remembered worker; when it is gone, the key moves to the new pick.
    """

    def __init__(self, prefix_chars: int = 256, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.prefix_chars = prefix_chars
        self.assignments = LruMap(max_entries)
        self._cursor = Cursor()

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """The remembered worker for this request's key when healthy and not overloaded."""
        if not workers:
            return None
        key = affinity_key(request, self.prefix_chars)
        if key is None:
            return least_utilized(workers, self._cursor)
        remembered = self.assignments.get(key)
        preferred = next((w for w in workers if w.id == remembered), None)
        if preferred is not None:
            if preferred.free_slots or not any(w.free_slots for w in workers):
                return preferred
            return least_utilized(workers, self._cursor)
        chosen = least_utilized(workers, self._cursor)
        self.assignments.set(key, chosen.id)
        return chosen


@hookimpl
def mlxcluster_register_balancers(register: Register) -> None:
    """Register the built-in strategies."""
    register(
        "cache_aware",
        CacheAware,
        "Workers whose prompt cache holds the prompt's prefix, weighed against load; else least loaded.",
    )
    register("round_robin", RoundRobin, "Each eligible worker in turn.")
    register("least_loaded", LeastLoaded, "Lowest (active + queued) / capacity; ties round-robin.")
    register(
        "hardware_aware",
        HardwareAware,
        "Measured tokens/s × free capacity × GPU headroom of idle workers, among workers with memory to spare.",
    )
    register("random", RandomChoice, "Uniformly random among eligible workers.")
    register(
        "prefix_affinity",
        PrefixAffinity,
        "Same session or prompt prefix → same worker while healthy and not overloaded; else least loaded.",
    )
