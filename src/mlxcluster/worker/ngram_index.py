"""Prompt lookup: draft tokens for a sequence from its own earlier text (n-gram matching).

An agent re-emits much of its prompt (a code block with one change, a tool result echoed as JSON, a
quoted document): where the last few tokens occurred before, the tokens that followed then are a good guess
for what follows now. :class:`NGramIndex` keeps, for each n-gram size, where each n-gram was last followed
by a token, updated as the sequence grows (O(sizes) per token), so a lookup costs a dict access per size.
"""

from __future__ import annotations

from collections.abc import Sequence

NGRAM_SIZES = (4, 3, 2)
"""The n-gram sizes tried, longest (most specific) first."""


class NGramIndex:
    """Where each n-gram of a growing token sequence was last followed by a token.

    Not thread safe: one generation thread owns it.
    """

    def __init__(self, sizes: Sequence[int] = NGRAM_SIZES) -> None:
        self.sizes = tuple(sorted(sizes, reverse=True))
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}
        """An n-gram (any size; sizes never collide, a key's length is its size) → the position of the token
        that followed its latest occurrence."""

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the indexed sequence."""
        seq, index = self.tokens, self._next
        for token in tokens:
            position = len(seq)
            for n in self.sizes:
                if position >= n:
                    index[tuple(seq[position - n : position])] = position
            seq.append(token)

    def sync(self, tokens: Sequence[int]) -> None:
        """Catch up with ``tokens``, a sequence this index holds a prefix of (the batch row's tokens)."""
        if len(tokens) > len(self.tokens):
            self.extend(tokens[len(self.tokens) :])

    def continuation(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest earlier occurrence of the sequence's tail (its first
        one a guess of the token about to be appended, when that token is not known yet); [] when none
        occurred."""
        if limit <= 0:
            return []
        seq = self.tokens
        for n in self.sizes:
            if len(seq) >= n:
                position = self._next.get(tuple(seq[len(seq) - n :]))
                if position is not None:
                    return seq[position : position + limit]
        return []

    def propose(self, last: int, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest earlier occurrence of the sequence's tail + ``last``
        (the token about to be appended); [] when none occurred."""
        if limit <= 0:
            return []
        seq = self.tokens
        for n in self.sizes:
            if len(seq) < n - 1:
                continue
            key = (*seq[len(seq) - (n - 1) :], last) if n > 1 else (last,)
            position = self._next.get(key)
            if position is not None:
                return seq[position : position + limit]
        return []
