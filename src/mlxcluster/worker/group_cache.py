"""The prompt cache of a worker group: rank 0 decides, every rank holds its own shard of each entry.

A KV cache entry is sharded like the model (each rank keeps its own attention heads), so entries never
travel. Rank 0 runs the ordinary :class:`~mlxcluster.worker.prompt_cache.PromptCache` and reports each
decision as it makes it (:class:`MirroredPromptCache`): which entry a new prompt starts from and how far
it is trimmed, which finished sequence's cache is stored, which entries are dropped. The other ranks'
:class:`FollowerCache` applies exactly those decisions to their own shards, so the entries line up
across ranks although their sizes differ (rank 0's byte bound decides for all).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from mlxcluster.worker.group_ops import DropOp, Op, StoreOp
from mlxcluster.worker.prompt_cache import PromptCache


class MirroredPromptCache(PromptCache):
    """Rank 0's prompt cache: a :class:`PromptCache` that records every decision for the followers.

    :param record: called with each :class:`StoreOp` / :class:`DropOp`, in the order they happen.
    """

    def __init__(self, *args: Any, record: Callable[[Op], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._record = record
        self._uses: dict[int, tuple[list[int], int]] = {}

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        cache, cached = super().fetch(tokens)
        self._uses.clear()
        if cache is not None and self.last_use is not None:
            self._uses[id(cache)] = (list(self.last_use.key), cached)
        return cache, cached

    def use_of(self, cache: Any) -> tuple[list[int], int] | None:
        """The entry (its tokens) a cache returned by :meth:`fetch` was copied from, and its kept length."""
        return self._uses.pop(id(cache), None)

    def store(self, tokens: list[int], cache: list[Any], digests: list[int]) -> None:
        if tokens and cache:
            self._record(StoreOp(tokens=list(tokens)))
        super().store(tokens, cache, digests)

    def dropped(self, key: tuple[int, ...], evicted: bool) -> None:
        self._record(DropOp(tokens=list(key)))


class FollowerCache:
    """A follower's shards of rank 0's prompt-cache entries, keyed by their tokens."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, ...], list[Any]] = {}
        self._finished: dict[tuple[int, ...], list[Any]] = {}

    def new_step(self) -> None:
        """Forget the caches of sequences that finished before the last step (rank 0 stored what it wanted)."""
        self._finished.clear()

    def finished(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        """A sequence finished (or was removed with its cache): rank 0 may store it next."""
        if tokens and cache:
            self._finished[tuple(tokens)] = cache

    def store(self, tokens: list[int]) -> None:
        cache = self._finished.pop(tuple(tokens), None)
        if cache is None:
            raise KeyError(f"no finished sequence of {len(tokens)} tokens to store")
        self.entries[tuple(tokens)] = cache

    def drop(self, tokens: list[int]) -> None:
        self.entries.pop(tuple(tokens), None)

    def take(self, key: list[int], cached: int) -> list[Any]:
        """A private copy of the entry ``key``, trimmed to its first ``cached`` tokens."""
        from mlx_lm.models.cache import trim_prompt_cache

        cache = copy.deepcopy(self.entries[tuple(key)])
        extra = len(key) - cached
        if extra > 0:
            trim_prompt_cache(cache, extra)
        return cache
