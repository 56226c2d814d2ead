"""One worker's memory budget: loaded weights, prompt caches and the running requests' projected KV.

The budget admits requests by bytes. A request reserves what its KV cache may grow to
(:meth:`~mlxcluster.worker.kv_size.KvSize.projected`) before it runs and gives it back when it ends. Weights
and reservations are firm; the prompt caches are not: they are asked to shrink (the largest first) whenever
firm bytes need their room, so a request waits only for other requests, never for a cache.

Admission is first come, first served: while a request waits, later ones queue behind it even when they
would fit, so a big request is not starved by a stream of small ones. A request that could not fit even
alone (its bytes above the budget less its model's weights) is refused at once with :class:`NeverFits`.

Everything here runs on the worker's asyncio event loop (the engines' ``generate`` and the model host call
it there); the cache callbacks it is given must be safe to call from that loop (an engine reads its cache's
byte count, and posts a shrink target to its generation thread).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from mlxcluster.protocol import MemoryParts

log = logging.getLogger(__name__)

WAITING_PING_S = 1.0
"""How often a waiting request's ``waiting`` callback is called."""


class NeverFits(Exception):
    """A request whose projected KV exceeds the budget less its model's weights: it cannot run here."""

    def __init__(self, model: str, nbytes: int, limit_bytes: int, weights_bytes: int) -> None:
        super().__init__(
            f"this request's KV cache may take {_mb(nbytes)}, more than this worker's memory budget of "
            f"{_mb(limit_bytes)} leaves beside the weights of {model} ({_mb(weights_bytes)}); "
            "lower max_tokens or shorten the prompt"
        )
        self.model = model
        self.nbytes = nbytes
        self.limit_bytes = limit_bytes
        self.weights_bytes = weights_bytes


@dataclass(eq=False)
class _Model:
    weights_bytes: int
    cache_bytes: Callable[[], int]
    shrink_cache: Callable[[int], None]
    target: int | None = None
    """The bytes its prompt cache was last asked to shrink to, until it has."""


class Reservation:
    """Bytes a running request holds; :meth:`release` (or leaving the ``with`` block) gives them back once."""

    def __init__(self, budget: MemoryBudget, model: str, nbytes: int) -> None:
        self.budget = budget
        self.model = model
        self.nbytes = nbytes
        self.released = False

    def release(self) -> None:
        """Give the bytes back (again: nothing happens)."""
        if self.released:
            return
        self.released = True
        self.budget._give_back(self.nbytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


@dataclass(eq=False)
class _Waiter:
    model: str
    nbytes: int
    granted: asyncio.Future[Reservation]


class MemoryBudget:
    """A worker's memory budget of ``limit_bytes``, shared by the models it holds; event loop only.

    ``peak_bytes`` is the highest weights + reserved KV + prompt caches seen when a model was added or a
    request admitted.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError("limit_bytes must be positive")
        self.limit_bytes = limit_bytes
        self.peak_bytes = 0
        self._models: dict[str, _Model] = {}
        self._kv = 0
        self._queue: deque[_Waiter] = deque()

    # --- models ---------------------------------------------------------------------------------

    def add_model(
        self,
        name: str,
        weights_bytes: int,
        *,
        cache_bytes: Callable[[], int],
        shrink_cache: Callable[[int], None],
    ) -> None:
        """Count a loaded model's weights; its prompt cache is read with ``cache_bytes`` and shrunk to a byte
        target with ``shrink_cache``."""
        self._models[name] = _Model(weights_bytes, cache_bytes, shrink_cache)
        self._note_peak()

    def remove_model(self, name: str) -> None:
        """Forget an unloaded model (its reservations, if any, count until they are released)."""
        if self._models.pop(name, None) is not None:
            self._grant()

    # --- what takes the budget ------------------------------------------------------------------

    def weights_bytes(self) -> int:
        return sum(model.weights_bytes for model in self._models.values())

    def kv_bytes(self) -> int:
        """Bytes reserved by running requests."""
        return self._kv

    def cache_bytes(self) -> int:
        """The models' prompt caches now (one asked to shrink counts at most its target)."""
        return sum(self._cache_of(model) for model in self._models.values())

    def parts(self) -> MemoryParts:
        return MemoryParts(
            budget_bytes=self.limit_bytes,
            weights_bytes=self.weights_bytes(),
            prompt_cache_bytes=self.cache_bytes(),
            kv_bytes=self._kv,
        )

    def room_for_weights(self) -> int:
        """Bytes a model's weights may take now, the prompt caches evicted as needed (may be negative)."""
        return self.limit_bytes - self.weights_bytes() - self._kv

    def most_bytes(self, model: str) -> int:
        """The most one request of ``model`` may reserve: the budget less the model's weights."""
        known = self._models.get(model)
        return self.limit_bytes - (known.weights_bytes if known is not None else 0)

    def waiting_bytes(self) -> int:
        """Bytes the queued requests wait for (a model host may unload an idle model for them)."""
        return sum(waiter.nbytes for waiter in self._queue)

    def make_room(self, nbytes: int) -> None:
        """Shrink prompt caches, the largest first, until ``nbytes`` more fit beside everything else."""
        excess = self.weights_bytes() + self._kv + self.cache_bytes() + nbytes - self.limit_bytes
        if excess <= 0:
            return
        sized = sorted(((self._cache_of(m), name, m) for name, m in self._models.items()), key=lambda s: -s[0])
        for held, name, model in sized:
            if excess <= 0 or held <= 0:
                break
            target = held - min(excess, held)
            excess -= held - target
            model.target = target
            try:
                model.shrink_cache(target)
            except Exception:  # a cache that cannot shrink must not stop admission
                log.exception("shrinking the prompt cache of %s failed", name)

    # --- admission ------------------------------------------------------------------------------

    async def reserve(self, model: str, nbytes: int, *, waiting: Callable[[], None] | None = None) -> Reservation:
        """Reserve ``nbytes`` for a request of ``model``: at once when they fit and nobody waits, else in turn
        once released bytes make room. ``waiting`` is called about once a second meanwhile. Cancelled while
        waiting, it reserves nothing. Raises :class:`NeverFits` when the bytes could never fit."""
        if nbytes > self.most_bytes(model):
            raise NeverFits(model, nbytes, self.limit_bytes, self.limit_bytes - self.most_bytes(model))
        if not self._queue and self._fits(nbytes):
            return self._take(model, nbytes)
        waiter = _Waiter(model, nbytes, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        try:
            while True:
                done, _ = await asyncio.wait({waiter.granted}, timeout=WAITING_PING_S)
                if done:
                    return waiter.granted.result()
                if waiting is not None:
                    waiting()
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                waiter.granted.result().release()  # granted as it was cancelled: give it back
            else:
                waiter.granted.cancel()
                self._queue.remove(waiter)
                self._grant()  # it may have held up smaller requests behind it
            raise

    def _fits(self, nbytes: int) -> bool:
        return self.weights_bytes() + self._kv + nbytes <= self.limit_bytes

    def _take(self, model: str, nbytes: int) -> Reservation:
        self.make_room(nbytes)
        self._kv += nbytes
        self._note_peak()
        return Reservation(self, model, nbytes)

    def _give_back(self, nbytes: int) -> None:
        self._kv -= nbytes
        self._grant()

    def _grant(self) -> None:
        """Admit queued requests in order while the first one fits."""
        while self._queue and self._fits(self._queue[0].nbytes):
            waiter = self._queue.popleft()
            waiter.granted.set_result(self._take(waiter.model, waiter.nbytes))

    # --- internals ------------------------------------------------------------------------------

    def _cache_of(self, model: _Model) -> int:
        held = max(0, int(model.cache_bytes()))
        if model.target is None:
            return held
        if held <= model.target:
            model.target = None
            return held
        return model.target

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.weights_bytes() + self._kv + self.cache_bytes())


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
