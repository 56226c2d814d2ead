"""The controller's index of worker prompt caches: which workers hold which prefix digests, per model.

Fed by :class:`~mlxcluster.protocol.CacheEvent` messages (see :mod:`mlxcluster.prefix_digest` for what a
digest names). It is soft state: it starts empty, a ``reset`` event replaces what is known of a worker
for one model, a new ``instance`` of a worker id (a restart) drops the old instance's entries, and a
worker that goes offline or is forgotten loses its entries. A gap in an instance's ``seq`` is counted
and otherwise accepted: deltas after it are still true, and the worker's periodic reset heals what
was missed.

The index is bounded: at most ``max_entries`` (digest, worker) pairs in all. When full, the digests
stored least recently are dropped first (vLLM production-stack #687 is what an unbounded prefix index
does to a router). A digest is keyed by ``digest ^ salt(model)`` so models never share entries, and
holds either one worker id (the common case) or a set of them.

Used from the controller's event loop only; not thread-safe.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

from msgspec import Struct

from mlxcluster.prefix_digest import BLOCK_CHARS, iter_prefix_digests
from mlxcluster.protocol import CacheEvent

DEFAULT_MAX_ENTRIES = 200_000
MAX_DIGESTS_PER_EVENT = 100_000
"""An event with more digests than this is malformed (a worker chunks its snapshots far below it)."""
DIGEST_LIMIT = 2**63
MAX_MODELS = 1024
"""Distinct model names remembered for their salts before the salt cache starts over."""


class CacheIndexStats(Struct, frozen=True, kw_only=True):
    """The index's size and what it has been fed (shown in cluster status and exported)."""

    digests: int = 0
    """Distinct (model, digest) keys held."""
    entries: int = 0
    """(digest, worker) pairs held: what ``max_entries`` bounds."""
    max_entries: int = 0
    workers: int = 0
    events: int = 0
    resets: int = 0
    evictions: int = 0
    """Entries dropped because the index was full."""
    stale_events: int = 0
    """Events of an earlier instance of a worker, ignored."""
    seq_gaps: int = 0
    """Deltas that did not follow the previous event of their instance (events lost on the bus)."""
    invalid_events: int = 0


@dataclass(slots=True)
class _Holder:
    """What the index knows of one worker instance."""

    worker_id: str
    instance: float
    seq: int | None = None
    keys: dict[str, set[int]] = field(default_factory=dict)
    """model → keys (``digest ^ salt``) this worker holds for it."""


class CacheIndex:
    """Prefix digests held per worker and model, bounded by ``max_entries``."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, block_chars: int = BLOCK_CHARS) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.block_chars = block_chars
        self._entries: OrderedDict[int, str | set[str]] = OrderedDict()
        self._count = 0
        self._holders: dict[str, _Holder] = {}
        self._salts: dict[str, int] = {}
        self.events = self.resets = self.evictions = self.stale_events = self.seq_gaps = self.invalid_events = 0

    # --- feeding ---------------------------------------------------------------------------------

    def apply(self, event: CacheEvent) -> bool:
        """Apply one event; ``False`` (and counted) when it is malformed and was dropped."""
        if not _valid(event):
            self.invalid_events += 1
            return False
        self.events += 1
        holder = self._holders.get(event.worker_id)
        if holder is not None and event.instance < holder.instance:
            self.stale_events += 1
            return True
        if holder is None or event.instance > holder.instance:
            if holder is not None:
                self.drop_worker(event.worker_id)
            holder = self._holders[event.worker_id] = _Holder(worker_id=event.worker_id, instance=event.instance)
        if event.reset:
            self.resets += 1
        elif holder.seq is not None and event.seq != holder.seq + 1:
            self.seq_gaps += 1
        holder.seq = event.seq
        salt = self._salt(event.model)
        keys = holder.keys.setdefault(event.model, set())
        if event.reset:
            for key in keys:
                self._unhold(key, holder.worker_id)
            keys.clear()
        for digest in event.removed:
            key = digest ^ salt
            if key in keys:
                keys.discard(key)
                self._unhold(key, holder.worker_id)
        for digest in reversed(event.stored):  # shallow prefixes last: the most recent, evicted last
            self._hold(digest ^ salt, holder, keys)
        self._evict()
        return True

    def drop_worker(self, worker_id: str) -> bool:
        """Forget everything a worker holds (offline, forgotten, deregistered, restarted)."""
        holder = self._holders.pop(worker_id, None)
        if holder is None:
            return False
        for keys in holder.keys.values():
            for key in keys:
                self._unhold(key, worker_id)
        return True

    def _hold(self, key: int, holder: _Holder, keys: set[int]) -> None:
        worker_id = holder.worker_id
        entries = self._entries
        found = entries.get(key)
        if found is None:
            entries[key] = worker_id
            self._count += 1
        elif isinstance(found, str):
            if found != worker_id:
                entries[key] = {found, worker_id}
                self._count += 1
            entries.move_to_end(key)
        else:
            if worker_id not in found:
                found.add(worker_id)
                self._count += 1
            entries.move_to_end(key)
        keys.add(key)

    def _unhold(self, key: int, worker_id: str) -> None:
        entries = self._entries
        found = entries.get(key)
        if found is None:
            return
        if isinstance(found, str):
            if found == worker_id:
                del entries[key]
                self._count -= 1
        elif worker_id in found:
            found.discard(worker_id)
            self._count -= 1
            if len(found) == 1:
                entries[key] = next(iter(found))

    def _evict(self) -> None:
        entries = self._entries
        while self._count > self.max_entries:
            key, found = entries.popitem(last=False)
            workers = (found,) if isinstance(found, str) else tuple(found)
            self._count -= len(workers)
            self.evictions += len(workers)
            for worker_id in workers:
                holder = self._holders.get(worker_id)
                if holder is not None:
                    for keys in holder.keys.values():
                        keys.discard(key)

    def _salt(self, model: str) -> int:
        salt = self._salts.get(model)
        if salt is None:
            if len(self._salts) >= MAX_MODELS:
                self._salts.clear()
            digest = hashlib.blake2b(model.encode("utf-8", "surrogatepass"), digest_size=8, person=b"mlxc-model")
            salt = self._salts[model] = int.from_bytes(digest.digest(), "big") >> 1
        return salt

    # --- lookup ----------------------------------------------------------------------------------

    def match(self, model: str, text: str) -> dict[str, int]:
        """Per worker, the number of leading ``block_chars`` blocks of ``text`` it holds (absent: none)."""
        levels = self.match_levels(model, text)
        return {worker: depth for depth, workers in reversed(levels) for worker in workers}  # deepest wins

    def match_levels(self, model: str, text: str) -> list[tuple[int, Collection[str]]]:
        """The same as :meth:`match`, grouped: ``(blocks, workers)`` pairs, deepest first.

        Digests are computed only while some worker holds the previous one. A worker that holds a prefix
        holds its shorter prefixes too (its cache stored them together, and the index evicts deep blocks
        first), so going from the deepest match back, each level adds the holders of its block minus
        those of the next deeper block: one set difference in C, and none where the two have as many
        holders. A worker the index lost a middle block of may appear at two levels; the deeper counts.
        """
        entries = self._entries
        if not entries:
            return []
        salt = self._salt(model)
        found_at: list[str | set[str]] = []
        for digest in iter_prefix_digests(text, self.block_chars):
            found = entries.get(digest ^ salt)
            if found is None:
                break
            found_at.append(found)
        levels: list[tuple[int, Collection[str]]] = []
        deeper: str | set[str] | None = None  # holders of the next deeper block: a subset of these, usually
        for depth in range(len(found_at), 0, -1):
            found = found_at[depth - 1]
            if deeper is None:
                levels.append((depth, (found,) if isinstance(found, str) else found))
            elif isinstance(found, str):
                if found != deeper and not (isinstance(deeper, set) and found in deeper):
                    levels.append((depth, (found,)))
            else:
                deeper_size = 1 if isinstance(deeper, str) else len(deeper)
                if len(found) > deeper_size:  # someone holds this block but not the next: set difference in C
                    new = found - ({deeper} if isinstance(deeper, str) else deeper)
                    if new:
                        levels.append((depth, new))
            deeper = found
        return levels

    def blocks(self, text: str) -> int:
        """Complete blocks in ``text`` (the denominator of a match fraction)."""
        return len(text) // self.block_chars

    # --- queries ---------------------------------------------------------------------------------

    def worker_entries(self, worker_id: str, model: str | None = None) -> int:
        """Digests held for one worker (one model, or all)."""
        holder = self._holders.get(worker_id)
        if holder is None:
            return 0
        if model is not None:
            return len(holder.keys.get(model, ()))
        return sum(len(keys) for keys in holder.keys.values())

    def holds(self, worker_id: str, model: str, digest: int) -> bool:
        """Whether ``worker_id`` is indexed as holding ``digest`` for ``model``."""
        found = self._entries.get(digest ^ self._salt(model))
        return found == worker_id if isinstance(found, str) else found is not None and worker_id in found

    def stats(self) -> CacheIndexStats:
        """Size and counters."""
        return CacheIndexStats(
            digests=len(self._entries),
            entries=self._count,
            max_entries=self.max_entries,
            workers=len(self._holders),
            events=self.events,
            resets=self.resets,
            evictions=self.evictions,
            stale_events=self.stale_events,
            seq_gaps=self.seq_gaps,
            invalid_events=self.invalid_events,
        )

    def __len__(self) -> int:
        return self._count


def prompt_cache_rates(cache: dict[str, int]) -> dict[str, float]:
    """For a worker's :class:`~mlxcluster.protocol.PromptCacheStats` as a dict: ``hit_rate`` (requests that
    reused a prefix) and ``token_hit_rate`` (prompt tokens served from the cache)."""
    lookups = cache.get("hits", 0) + cache.get("misses", 0)
    prompt_tokens = cache.get("prompt_tokens", 0)
    return {
        "hit_rate": round(cache.get("hits", 0) / lookups, 4) if lookups else 0.0,
        "token_hit_rate": round(cache.get("hit_tokens", 0) / prompt_tokens, 4) if prompt_tokens else 0.0,
    }


def _valid(event: CacheEvent) -> bool:
    """An event the index can use: a model named, digest counts bounded, every digest a 63-bit value."""
    if not event.model or len(event.stored) + len(event.removed) > MAX_DIGESTS_PER_EVENT:
        return False
    return all(0 <= d < DIGEST_LIMIT for d in event.stored) and all(0 <= d < DIGEST_LIMIT for d in event.removed)
