"""Helpers the built-in balancers share, and plugins may use: round-robin tie-breaks, least utilized, a bounded LRU."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from operator import attrgetter

from mlxcluster.api.balancer import LoadBuckets, WorkerView

DEFAULT_MAX_ENTRIES = 10_000
"""Default bound of the LRU maps balancers keep (keys of sessions or prompt prefixes)."""


class Cursor:
    """Round-robin over a changing set of workers: the next id after the last one picked, wrapping."""

    def __init__(self) -> None:
        self._last: str | None = None

    def next(self, workers: Sequence[WorkerView]) -> WorkerView:
        """The first worker (by id) after the previous pick; stable when workers come and go."""
        last = self._last
        chosen = None
        if last is not None:
            chosen = min((w for w in workers if w.id > last), key=_id, default=None)
        if chosen is None:
            chosen = min(workers, key=_id)
        self._last = chosen.id
        return chosen

    def next_id(self, ids: Collection[str]) -> str:
        """:meth:`next` given the workers' ids (not empty): the first id after the previous pick, wrapping."""
        last = self._last
        chosen = None if last is None else min((i for i in ids if i > last), default=None)
        self._last = chosen = chosen if chosen is not None else min(ids)
        return chosen

    def mark(self, worker: WorkerView) -> WorkerView:
        """Count ``worker`` as picked (chosen without a tie-break); returns it."""
        self._last = worker.id
        return worker


def best(
    workers: Sequence[WorkerView], key: Callable[[WorkerView], float | tuple[float, ...]], cursor: Cursor
) -> WorkerView:
    """The worker with the highest ``key``; ties are broken round-robin with ``cursor``."""
    keyed = [(key(w), w) for w in workers]  # one key call per worker: this runs on every pick
    top = max(k for k, _ in keyed)
    return cursor.next([w for k, w in keyed if k == top])


_id = attrgetter("id")
_load = attrgetter("load")
_capacity = attrgetter("max_concurrent")


def least_utilized(workers: Sequence[WorkerView], cursor: Cursor) -> WorkerView:
    """The worker with the lowest ``load / max_concurrent``; ties round-robin.

    Runs on every pick over every candidate, so it works on C-level maps: with one capacity for all (the
    usual fleet) the lowest load is the lowest utilization, and a unique minimum needs no tie-break. On the
    registry's list (its ``by_load`` and ``positions`` hints) only the least loaded workers are looked at."""
    loads: list[int] | None = getattr(workers, "loads", None)  # the registry's hints (EligibleWorkers)
    uniform = loads is not None and getattr(workers, "capacity", 0) > 0
    by_load: LoadBuckets | None = getattr(workers, "by_load", None)
    positions: dict[str, int] | None = getattr(workers, "positions", None)
    if uniform and by_load and positions is not None:
        tied = by_load[min(by_load)]
        chosen = next(iter(tied)) if len(tied) == 1 else cursor.next_id(tied)
        return cursor.mark(workers[positions[chosen]])
    if uniform:
        keys: list[float] = loads  # type: ignore[assignment]
    elif len(set(map(_capacity, workers))) == 1:
        keys = list(map(_load, workers))
    else:
        keys = [w.load / (w.max_concurrent or 1) for w in workers]
    lowest = min(keys)
    if keys.count(lowest) == 1:
        return cursor.mark(workers[keys.index(lowest)])
    return cursor.next([w for k, w in zip(keys, workers, strict=True) if k == lowest])


class LruMap:
    """A bounded mapping key → worker id that forgets the least recently used key first."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[bytes, str] = OrderedDict()

    def get(self, key: bytes) -> str | None:
        """The worker id for ``key`` (marking it recently used), or ``None``."""
        found = self._data.get(key)
        if found is not None:
            self._data.move_to_end(key)
        return found

    def set(self, key: bytes, worker_id: str) -> None:
        """Remember ``key`` → ``worker_id``, evicting the oldest key when full."""
        self._data[key] = worker_id
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
