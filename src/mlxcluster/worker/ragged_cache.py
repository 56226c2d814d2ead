"""A batch KV cache whose rows may end at different positions (speculative decoding's per-row rollback).

mlx-lm's ``BatchKVCache`` keeps every row of the batch ending at one index (rows are left-padded to it).
Verifying drafts appends ``1 + k`` positions to every row in one forward, and each row keeps only the
positions its verification accepted; cutting the rest would mean shifting every row's whole cache back into
line, a copy of the cache per step. :class:`RaggedKVCache` instead lets each row end where its own tokens
end (``ends``): the positions past a row's end are garbage, masked out and overwritten by its next tokens.
Rows are brought back into line (one roll of the cache, as mlx-lm's own right-padded prefill does) only
when the batch is extended with new rows.

Invariants, per row ``b``: its tokens occupy ``[left_padding[b], ends[b])``; ``offset[b] = ends[b] -
left_padding[b]`` (its length, the position of its next token for RoPE); ``_idx = max(ends)``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, dynamic_roll


class RaggedKVCache(BatchKVCache):
    """``BatchKVCache`` with per-row ends; behaves exactly like it while the rows are aligned."""

    ends: list[int]
    keys: Any
    values: Any
    left_padding: Any
    offset: Any

    @classmethod
    def adopt(cls, cache: BatchKVCache) -> RaggedKVCache:
        """The same cache (its arrays shared, not copied) as a ragged one, rows aligned."""
        ragged = cls.__new__(cls)
        ragged.keys, ragged.values = cache.keys, cache.values
        ragged.left_padding, ragged.offset = cache.left_padding, cache.offset
        ragged._idx = cache._idx
        ragged._right_padding = None
        ragged.ends = [cache._idx] * int(cache.offset.shape[0])
        return ragged

    @property
    def aligned(self) -> bool:
        return all(end == self._idx for end in self.ends)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.aligned:
            result = super().update_and_fetch(keys, values)  # type: ignore[no-untyped-call]
            self.ends = [self._idx] * len(self.ends)
            return result  # type: ignore[no-any-return]
        n = keys.shape[2]
        self._reserve(self._idx + n, keys, values)
        positions = mx.array(self.ends)[:, None] + mx.arange(n)[None]
        index = positions[:, None, :, None]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(index, keys.shape), keys, axis=2)
        self.values = mx.put_along_axis(self.values, mx.broadcast_to(index, values.shape), values, axis=2)
        self.ends = [end + n for end in self.ends]
        self.offset = self.offset + n
        self._idx = max(self.ends)
        return self.keys[..., : self._idx, :], self.values[..., : self._idx, :]

    def _reserve(self, size: int, keys: mx.array, values: mx.array) -> None:
        """Grow the buffers (in steps of ``step`` positions) to hold ``size`` positions."""
        assert self.keys is not None  # a ragged cache has content: rows only diverge after a forward
        if size <= self.keys.shape[2]:
            return
        batch, heads, _, k_dim = keys.shape
        grow = (size - self.keys.shape[2] + self.step - 1) // self.step * self.step
        self.keys = mx.concatenate([self.keys, mx.zeros((batch, heads, grow, k_dim), keys.dtype)], axis=2)
        v_dim = values.shape[3]
        self.values = mx.concatenate([self.values, mx.zeros((batch, heads, grow, v_dim), values.dtype)], axis=2)

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> Any:  # noqa: N803 (mlx-lm's name)
        if self.aligned:
            return super().make_mask(N, return_array=return_array, **kwargs)
        columns = mx.arange(self._idx + N)[None, None, None, :]
        queries = (mx.array(self.ends)[:, None] + mx.arange(N)[None])[:, None, :, None]
        mask = (columns <= queries) & (columns >= self.left_padding[:, None, None, None])
        window = kwargs.get("window_size")
        if window is not None:
            mask = mask & (columns > queries - window)
        return mask

    def trim_rows(self, counts: list[int]) -> None:
        """Drop the last ``counts[b]`` positions of each row ``b`` (rejected drafts)."""
        if not any(counts):
            return
        self.ends = [end - count for end, count in zip(self.ends, counts, strict=True)]
        self.offset = self.offset - mx.array(counts)
        self._idx = max(self.ends)

    def align(self) -> None:
        """Shift each row right so that every row ends at ``_idx`` (its tokens unchanged, more left padding)."""
        if self.aligned or self.keys is None:
            return
        shifts = mx.array([self._idx - end for end in self.ends])
        self.keys = dynamic_roll(self.keys, shifts[:, None], axis=2)  # type: ignore[no-untyped-call]
        self.values = dynamic_roll(self.values, shifts[:, None], axis=2)  # type: ignore[no-untyped-call]
        self.left_padding = self.left_padding + shifts
        self.ends = [self._idx] * len(self.ends)

    def trim(self, n: int) -> int:
        self.align()
        trimmed = int(super().trim(n))  # type: ignore[no-untyped-call]
        self.ends = [self._idx] * len(self.ends)
        return trimmed

    def filter(self, batch_indices: Any) -> None:
        indices = [int(i) for i in batch_indices]
        ends = [self.ends[i] for i in indices]
        if self.keys is not None:
            self.keys = self.keys[indices]
            self.values = self.values[indices]
        self.offset = self.offset[indices]
        self.left_padding = self.left_padding[indices]
        shift = int(self.left_padding.min().item()) if indices else 0
        if shift > 0:
            if self.keys is not None:
                self.keys = self.keys[..., shift:, :]
                self.values = self.values[..., shift:, :]
            self.left_padding = self.left_padding - shift
            ends = [end - shift for end in ends]
        self.ends = ends
        self._idx = max(ends, default=0)

    def extend(self, other: Any) -> None:
        self.align()
        if isinstance(other, RaggedKVCache):
            other.align()
        super().extend(other)  # type: ignore[no-untyped-call]
        self.ends = [self._idx] * int(self.offset.shape[0])

    def extract(self, idx: int) -> KVCache:
        cache = KVCache()  # type: ignore[no-untyped-call]
        padding = int(self.left_padding[idx].item())
        cache.keys = mx.contiguous(self.keys[idx : idx + 1, :, padding : self.ends[idx]])
        cache.values = mx.contiguous(self.values[idx : idx + 1, :, padding : self.ends[idx]])
        cache.offset = cache.keys.shape[2]
        return cache
