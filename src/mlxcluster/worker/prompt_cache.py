"""The mlx engine's prompt (KV) cache: earlier prompts' KV caches in a token trie, bounded by bytes and observed.

A new prompt reuses the entry that shares the longest prefix with it, and only the rest is prefilled.
The trie is mlx-lm's public :class:`~mlx_lm.models.cache.PromptTrie`; the entries, their LRU order and
byte bound are ours (mlx-lm's ``LRUPromptCache`` keeps them in private attributes), which is what a
cluster needs on top:

- **Every cache type.** A trimmable cache (plain KV) serves any prefix of an entry: an entry longer than
  the prompt is copied and trimmed back, an exact hit is trimmed by one token (the last prompt token must
  be computed to get logits). A cache that cannot be trimmed (a sliding window that has rolled, the
  recurrent state of linear-attention layers) serves only prompts that *extend* its tokens exactly, so the
  engine also stores checkpoints on prefix boundaries the next turn will share (the end of the
  conversation before the generation prompt), as ``mlx_lm.server`` does with prompt segments.
- A byte bound with LRU eviction, where a hit refreshes the entry it used.
- Counters for the heartbeat (:class:`~mlxcluster.protocol.PromptCacheStats`).
- The prefix digests (:mod:`mlxcluster.prefix_digest`) of what is held, reference-counted over entries,
  reported to a listener as they appear and disappear, so controllers can route to the holder.

It is used from the engine's generation thread only; :meth:`stats` and :meth:`digests` may be read from
any thread.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxcluster.protocol import PromptCacheStats

Listener = Callable[[list[int], list[int]], None]
ENTRY_LIMIT = 4096
"""Most entries kept whatever their size (a trie walk per request stays cheap)."""


def default_cache_bytes(total_memory_bytes: int) -> int:
    """The prompt-cache bound when none is configured: an eighth of the machine's memory, at most 16 GiB."""
    return min(total_memory_bytes // 8, 16 << 30)


def cache_nbytes(cache: list[Any]) -> int:
    """Bytes held by one sequence's cache (its layers summed)."""
    return sum(int(layer.nbytes) for layer in cache)


def trimmable(cache: list[Any]) -> bool:
    """Whether every layer of ``cache`` can drop tokens from its end."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    return bool(can_trim_prompt_cache(cache))


@dataclass(eq=False)
class _Entry:
    tokens: tuple[int, ...]
    cache: list[Any]
    nbytes: int
    trimmable: bool
    digests: list[int]


@dataclass(frozen=True)
class CacheUse:
    """Which entry a :meth:`PromptCache.fetch` copied (its tokens) and how many of its tokens it kept."""

    key: tuple[int, ...]
    cached: int


class PromptCache:
    """Reusable KV caches of earlier prompts for one model, at most ``limit_bytes`` in all.

    :param model_key: what the entries belong to (the model path): a cache never serves another model.
    :param limit_bytes: the bound on the bytes of all entries (> 0).
    :param listener: called with ``(stored, removed)`` digests when the set of held digests changes.
    """

    def __init__(self, model_key: str, limit_bytes: int, listener: Listener | None = None) -> None:
        from mlx_lm.models.cache import PromptTrie

        if limit_bytes <= 0:
            raise ValueError("limit_bytes must be positive")
        self.model_key = model_key
        self.limit_bytes = limit_bytes
        self.listener = listener
        self._trie = PromptTrie()  # type: ignore[no-untyped-call]
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._held: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._changes: tuple[list[int], list[int]] = ([], [])
        self.last_use: CacheUse | None = None
        """The entry the latest :meth:`fetch` used (None: a miss)."""
        self.hits = self.misses = self.hit_tokens = self.prompt_tokens = self.evictions = 0

    # --- generation thread ----------------------------------------------------------------------

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the cache of the longest usable held prefix of ``tokens``, and its length.

        At least one token is always left to prefill. ``(None, 0)`` is a miss. The entry used becomes the
        most recently used one.
        """
        found = self._nearest(tokens)
        self.prompt_tokens += len(tokens)
        self.last_use = None
        if found is None:
            self.misses += 1
            return None, 0
        entry, cached = found
        cache = copy.deepcopy(entry.cache)
        extra = len(entry.tokens) - cached
        if extra > 0:
            from mlx_lm.models.cache import trim_prompt_cache

            trim_prompt_cache(cache, extra)
        self.hits += 1
        self.hit_tokens += cached
        self._entries.move_to_end(entry.tokens)
        self.last_use = CacheUse(entry.tokens, cached)
        return cache, cached

    def cached_length(self, tokens: list[int]) -> int:
        """How many of ``tokens`` :meth:`fetch` would take from the cache now (nothing is copied or counted)."""
        found = self._nearest(tokens)
        return found[1] if found is not None else 0

    def _nearest(self, tokens: list[int]) -> tuple[_Entry, int] | None:
        """The entry to start ``tokens`` from and how many of its tokens to keep (< ``len(tokens)``)."""
        limit = len(tokens) - 1  # the last prompt token is always computed
        if limit <= 0:
            return None
        result = self._trie.search(self.model_key, tokens)
        if result.exact is not None:
            entry = self._entries[tuple(result.exact)]
            if entry.trimmable:
                return entry, limit
        shorter = self._shorter(tokens, result)
        if result.longer is not None and result.common_prefix > (len(shorter.tokens) if shorter else 0):
            entry = self._entries[tuple(result.longer)]
            if entry.trimmable:
                return entry, min(limit, result.common_prefix)
        return (shorter, len(shorter.tokens)) if shorter is not None else None

    def _shorter(self, tokens: list[int], result: Any) -> _Entry | None:
        """The longest entry that is a proper prefix of ``tokens`` (usable whatever its cache type)."""
        if result.exact is not None:  # an exact entry that cannot be trimmed: look below it
            result = self._trie.search(self.model_key, tokens[:-1])
            if result.exact is not None:
                return self._entries[tuple(result.exact)]
        if result.shorter is None:
            return None
        return self._entries[tuple(result.shorter)]

    def store(self, tokens: list[int], cache: list[Any], digests: list[int]) -> None:
        """Keep ``cache`` (the KV state of exactly ``tokens``) for later prompts; ``digests`` name its text.

        A trimmable entry subsumes the entries of its prefixes (it can serve them all), which are dropped;
        an entry that cannot be trimmed leaves them (they serve prompts that diverge before its end)."""
        if not tokens or not cache:
            return
        key = tuple(tokens)
        if key in self._entries:  # replaced: not a drop
            self._trie.pop(self.model_key, list(key))
            self._forget(key, evicted=False, replaced=True)
        entry = _Entry(key, cache, cache_nbytes(cache), trimmable(cache), list(digests))
        self._entries[key] = entry
        self._trie.add(self.model_key, list(key), entry)
        self._bytes += entry.nbytes
        stored = [d for d in entry.digests if self._held[d] == 0]
        with self._lock:
            self._held.update(entry.digests)
        self._note(stored, [])
        if entry.trimmable:
            for length, _value in self._trie.pop_prefixes(self.model_key, list(key)):
                self._forget(key[:length], evicted=False)
        self._bound()
        self._flush()

    def shrink_to(self, target_bytes: int) -> None:
        """Evict the least recently used entries until at most ``target_bytes`` are held (a memory budget's
        call for room)."""
        self._bound(max(0, target_bytes))
        self._flush()

    def clear(self) -> None:
        """Drop every entry (counted as evictions)."""
        for key in list(self._entries):
            self._drop(key, evicted=True)
        self._flush()

    # --- any thread -----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(
            hits=self.hits,
            misses=self.misses,
            hit_tokens=self.hit_tokens,
            prompt_tokens=self.prompt_tokens,
            bytes=self._bytes,
            limit_bytes=self.limit_bytes,
            entries=len(self._entries),
            evictions=self.evictions,
        )

    def digests(self) -> list[int]:
        """Every digest held now."""
        with self._lock:
            return [d for d, n in self._held.items() if n > 0]

    # --- internals ------------------------------------------------------------------------------

    def _bound(self, limit_bytes: int | None = None) -> None:
        limit = self.limit_bytes if limit_bytes is None else min(limit_bytes, self.limit_bytes)
        while self._entries and (self._bytes > limit or len(self._entries) > ENTRY_LIMIT):
            oldest = next(iter(self._entries))
            self._drop(oldest, evicted=True)

    def _drop(self, key: tuple[int, ...], *, evicted: bool) -> None:
        """Remove one entry from the trie and the index."""
        self._trie.pop(self.model_key, list(key))
        self._forget(key, evicted=evicted)

    def _forget(self, key: tuple[int, ...], *, evicted: bool, replaced: bool = False) -> None:
        """Account for an entry gone from the trie (``replaced``: a new cache of the same tokens takes its place)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._bytes -= entry.nbytes
        if evicted:
            self.evictions += 1
        if not replaced:
            self.dropped(key, evicted)
        if not entry.digests:
            return
        with self._lock:
            self._held.subtract(entry.digests)
            removed = [d for d in set(entry.digests) if self._held[d] <= 0]
            for d in removed:
                del self._held[d]
        self._note([], removed)

    def dropped(self, key: tuple[int, ...], evicted: bool) -> None:
        """Called for every entry that leaves the cache (a subclass records it)."""

    def _note(self, stored: list[int], removed: list[int]) -> None:
        self._changes[0].extend(stored)
        self._changes[1].extend(removed)

    def _flush(self) -> None:
        stored, removed = self._changes
        self._changes = ([], [])
        # a digest both stored and removed in one operation nets out
        both = set(stored) & set(removed)
        if both:
            held = set(self.digests())
            stored = [d for d in stored if d not in both or d in held]
            removed = [d for d in removed if d not in both or d not in held]
        if (stored or removed) and self.listener is not None:
            self.listener(stored, removed)
