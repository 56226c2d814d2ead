"""The mlx engine's prompt (KV) cache: mlx-lm's :class:`LRUPromptCache`, bounded by bytes and observed.

mlx-lm keeps KV caches in a token trie: a new prompt reuses the entry that shares the longest prefix
with it (an entry longer than the prompt is copied and trimmed back to the common prefix), and only the
rest is prefilled. This wrapper adds what a cluster needs on top:

- a byte bound with LRU eviction, where a hit refreshes the entry it used (mlx-lm only orders by insert);
- counters for the heartbeat (:class:`~mlxcluster.protocol.PromptCacheStats`);
- the prefix digests (:mod:`mlxcluster.prefix_digest`) of what is held, reference-counted over entries,
  reported to a listener as they appear and disappear, so controllers can route to the holder.

It is used from the engine's generation thread only; :meth:`stats` and :meth:`digests` may be read from
any thread.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from mlxcluster.protocol import PromptCacheStats

Listener = Callable[[list[int], list[int]], None]
ENTRY_LIMIT = 4096
"""Most entries kept whatever their size (a trie walk per request stays cheap)."""


def default_cache_bytes(total_memory_bytes: int) -> int:
    """The prompt-cache bound when none is configured: an eighth of the machine's memory, at most 16 GiB."""
    return min(total_memory_bytes // 8, 16 << 30)


class PromptCache:
    """Reusable KV caches of earlier prompts for one model, at most ``limit_bytes`` in all.

    :param model_key: what the entries belong to (the model path): a cache never serves another model.
    :param limit_bytes: the bound on the bytes of all entries (> 0).
    :param listener: called with ``(stored, removed)`` digests when the set of held digests changes.
    """

    def __init__(self, model_key: str, limit_bytes: int, listener: Listener | None = None) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        if limit_bytes <= 0:
            raise ValueError("limit_bytes must be positive")
        self.model_key = model_key
        self.limit_bytes = limit_bytes
        self.listener = listener
        self._cache = LRUPromptCache(max_size=ENTRY_LIMIT, max_bytes=limit_bytes)
        self._cache._trie = _ObservedTrie(self._cache._trie, self._on_popped)  # type: ignore[assignment]
        self._digests_of: dict[tuple[int, ...], list[int]] = {}
        self._held: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._changes: tuple[list[int], list[int]] = ([], [])
        self.hits = self.misses = self.hit_tokens = self.prompt_tokens = self.evictions = 0

    # --- generation thread ----------------------------------------------------------------------

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the cache of the longest held prefix of ``tokens``, and its length.

        At least one token is always left to prefill (an exact hit is trimmed by one). ``(None, 0)``
        is a miss. The entry used becomes the most recently used.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self._cache.fetch_nearest_cache(self.model_key, tokens)
        cached = len(tokens) - len(rest)
        if cache is not None and cached >= len(tokens):  # exact: leave the last token to compute logits
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                cached = len(tokens) - 1
            else:
                cache, cached = None, 0
        if cache is None or cached <= 0:
            cache, cached = None, 0
        self.prompt_tokens += len(tokens)
        if cached:
            self.hits += 1
            self.hit_tokens += cached
            self._touch(tokens)
        else:
            self.misses += 1
        return cache, cached

    def store(self, tokens: list[int], cache: list[Any], digests: list[int]) -> None:
        """Keep ``cache`` (the KV state of exactly ``tokens``) for later prompts; ``digests`` name its text."""
        if not tokens or not cache:
            return
        key = tuple(tokens)
        self._release(key)  # replaced, if already held
        self._digests_of[key] = digests
        stored = [d for d in digests if self._held[d] == 0]
        self._held.update(digests)
        self._note(stored, [])
        self._cache.insert_cache(self.model_key, list(tokens), cache)
        self._flush()

    def clear(self) -> None:
        """Drop every entry (counted as evictions)."""
        self._cache.trim_to(n_sequences=0)
        self._flush()

    # --- any thread -----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return int(self._cache.nbytes)

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(
            hits=self.hits,
            misses=self.misses,
            hit_tokens=self.hit_tokens,
            prompt_tokens=self.prompt_tokens,
            bytes=self.nbytes,
            limit_bytes=self.limit_bytes,
            entries=len(self._cache),
            evictions=self.evictions,
        )

    def digests(self) -> list[int]:
        """Every digest held now."""
        with self._lock:
            return [d for d, n in self._held.items() if n > 0]

    # --- internals ------------------------------------------------------------------------------

    def _touch(self, tokens: list[int]) -> None:
        """Make the entry a hit used the most recently used one."""
        result = self._cache._trie.search(self.model_key, tokens)
        used = result.exact if result.exact is not None else None
        if used is None:
            short = len(result.shorter) if result.shorter is not None else 0
            used = result.longer if result.longer is not None and result.common_prefix > short else result.shorter
        if used is None:
            return
        order = self._cache._lru
        order.remove(self.model_key, used)
        order.push(self.model_key, used)

    def _on_popped(self, tokens: list[int], evicted: bool) -> None:
        if evicted:
            self.evictions += 1
        self._release(tuple(tokens))

    def _release(self, key: tuple[int, ...]) -> None:
        digests = self._digests_of.pop(key, None)
        if not digests:
            return
        with self._lock:
            self._held.subtract(digests)
            removed = [d for d in set(digests) if self._held[d] <= 0]
            for d in removed:
                del self._held[d]
        self._note([], removed)

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


class _ObservedTrie:
    """mlx-lm's prompt trie, reporting every entry it drops (LRU evictions and subsumed prefixes)."""

    def __init__(self, trie: Any, on_popped: Callable[[list[int], bool], None]) -> None:
        self._trie = trie
        self._on_popped = on_popped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trie, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> _ObservedTrie:
        return _ObservedTrie(copy.deepcopy(self._trie, memo), self._on_popped)

    def pop(self, model: Any, tokens: list[int]) -> Any:
        value = self._trie.pop(model, tokens)
        self._on_popped(list(tokens), True)
        return value

    def pop_prefixes(self, model: Any, tokens: list[int]) -> list[tuple[int, Any]]:
        values: list[tuple[int, Any]] = self._trie.pop_prefixes(model, tokens)
        for length, _ in values:
            self._on_popped(list(tokens[:length]), False)
        return values
