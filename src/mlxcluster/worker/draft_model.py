"""A draft model for speculative decoding in the batch: a small model with the served model's tokenizer.

:class:`DraftModel` keeps the draft model's own batched KV cache, one row per row of the target's decode
batch, in the same order. A row that joins the batch has its whole token sequence prefilled into the draft
cache (the target may have had a prompt-cache hit; the draft model has none). A row that leaves is
dropped. Each row's draft cache holds a prefix of the row's sequence (its committed tokens, then its
pending token): ``seen`` tokens of it.

Rows that join together are prefilled together (:func:`prefill_groups`): left-padded to their group's longest
row in one mlx-lm ``BatchKVCache(left_padding)`` per layer, one batched forward per :data:`PREFILL_CHUNK`
positions, each evaluated (memory stays bounded), as mlx-lm's batch generator prefills prompts. Rows of
very unequal lengths are not padded to the longest: sorted by length, rows share a group while its padding
stays within :data:`PADDING_WASTE` of its real tokens plus :data:`PADDING_FREE` positions (one 2,000-token
row and seven of 40 are two groups; eight chats of 30 to 50 tokens are one). The groups' caches are joined
and put back in the rows' order.

Drafting ``k`` tokens feeds every row's tokens not yet seen (the tokens accepted since its last draft and its
pending token; ragged lengths right-padded, the padding dropped per row at once, the logits read at each
row's last real token), then ``k - 1`` single-token greedy steps: one batched forward per drafted token,
chained on the device and evaluated once. After the target verified the drafts, :meth:`DraftModel.settle`
keeps in the draft cache the drafted tokens the row accepted (they are the row's next tokens, at the same
positions) and drops the rest, so the next draft feeds only what the target chose after them.

Drafts are greedy (deterministic given the tokens), so the target's exact-match acceptance keeps its output
exactly: a greedy row emits its own argmax, a sampled row its own seeded draw (see
:mod:`~mlxcluster.worker.speculative_batch`).
"""

from __future__ import annotations

import time
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from mlxcluster.worker.ragged_cache import RaggedKVCache
from mlxcluster.worker.speculation import PRIOR_ACCEPTANCE, RowDrafts, StepCostModel

PREFILL_CHUNK = 512
"""Positions of each joining row prefilled into the draft cache per forward."""
PADDING_WASTE = 0.5
"""Left padding a prefill group may add, as a share of its rows' tokens (beyond :data:`PADDING_FREE`)."""
PADDING_FREE = 64
"""Padding positions a prefill group may add regardless (short rows cost little more padded)."""
IDLE_RECOVERY = 0.97
"""Weight an idle step leaves on the draft model's measured acceptance (the rest goes to the prior): a model
whose drafts all failed is priced hopefully again after a few dozen steps without it."""
DRAFT_KEY = "worker.draft_model"
TOKEN_PROBES = ("Hello, world!", "def f(x):\n    return x + 1\n", " The quick brown fox 0123456789")
"""Texts that both tokenizers must encode alike (beyond an equal vocabulary)."""


class DraftModelError(ValueError):
    """The draft model cannot draft for the served model (another tokenizer, a cache that cannot batch)."""


def check_draft_model(target_tokenizer: Any, draft: Any, draft_tokenizer: Any, *, name: str) -> None:
    """Refuse a draft model that cannot draft for the served model (its tokenizer ``target_tokenizer``): another
    vocabulary, fewer logits than tokens, or caches other than plain KV.

    :raises DraftModelError: naming ``worker.draft_model`` and what differs.
    """
    why = _tokenizer_difference(target_tokenizer, draft_tokenizer)
    if why is None:
        width = _output_width(draft)
        vocab = len(target_tokenizer)
        if width is not None and width < vocab:
            why = f"its output has {width} logits, fewer than the tokenizer's {vocab} tokens"
    if why is None:
        kinds = sorted({type(layer).__name__ for layer in make_prompt_cache(draft)})
        if kinds != ["KVCache"]:
            why = f"its caches ({', '.join(kinds)}) are not all plain KV caches, which drafting needs"
    if why is not None:
        raise DraftModelError(f"{DRAFT_KEY} {name}: {why}; a draft model must share the served model's tokenizer")


def _tokenizer_difference(target: Any, draft: Any) -> str | None:
    """What differs between the two tokenizers (None: they are the same as far as drafting can tell)."""
    if len(target) != len(draft):
        return f"its tokenizer has {len(draft)} tokens, the model's {len(target)}"
    target_vocab, draft_vocab = target.get_vocab(), draft.get_vocab()
    if target_vocab != draft_vocab:
        differing = (
            sorted(k for k in target_vocab.keys() ^ draft_vocab.keys())[:3]
            or [k for k, v in target_vocab.items() if draft_vocab.get(k) != v][:3]
        )
        return f"its tokenizer's vocabulary differs from the model's (e.g. {differing!r})"
    for text in TOKEN_PROBES:
        if target.encode(text) != draft.encode(text):
            return f"its tokenizer encodes {text!r} differently"
    if sorted(target.eos_token_ids) != sorted(draft.eos_token_ids):
        return "its end-of-sequence tokens differ from the model's"
    return None


def _output_width(model: Any) -> int | None:
    args = getattr(model, "args", None)
    width = getattr(args, "vocab_size", None)
    return int(width) if isinstance(width, int) else None


class DraftModel:
    """The draft model and its KV cache mirroring the rows of a decode batch (see the module)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: list[RaggedKVCache] = []
        self.seen: list[int] = []
        """Per row: tokens of its sequence (committed tokens, then the pending one) in the draft cache."""
        self.drafted: list[list[int]] = []
        """Per row: the drafted tokens the last draft left in the cache after ``seen`` (until :meth:`settle`)."""
        self.cost = StepCostModel()
        """Milliseconds of one draft forward by batch size (the time of a whole draft over its forwards)."""
        self.quality = RowDrafts()
        """The draft model's own acceptance rate and back-off, learned from its verified drafts (a poor draft
        model, such as an untrained early exit, is run on few steps; prompt lookup drafts on)."""

    def __len__(self) -> int:
        return len(self.seen)

    def extend(self, sequences: list[list[int]]) -> None:
        """Rows join (after the present ones): their tokens prefilled together, in groups of similar lengths
        (see the module), the groups' caches joined in the rows' order."""
        if not sequences:
            return
        groups = prefill_groups([len(tokens) for tokens in sequences])
        joined = self._prefill([sequences[i] for i in groups[0]])
        for group in groups[1:]:
            for own, more in zip(joined, self._prefill([sequences[i] for i in group]), strict=True):
                own.extend(more)  # type: ignore[no-untyped-call]
        order = [i for group in groups for i in group]
        if order != sorted(order):
            where = {row: at for at, row in enumerate(order)}
            for layer in joined:
                layer.filter([where[row] for row in range(len(order))])  # type: ignore[no-untyped-call]
        if not self.seen:
            self.cache = [RaggedKVCache.adopt(layer) for layer in joined]
        else:
            for own, joining in zip(self.cache, joined, strict=True):
                own.extend(joining)
        self.seen.extend(len(tokens) for tokens in sequences)
        self.drafted.extend([] for _ in sequences)

    def _prefill(self, rows: list[list[int]]) -> list[BatchKVCache]:
        """One cache per layer holding ``rows`` left-padded to the longest, in batched chunked forwards."""
        width = max(len(tokens) for tokens in rows)
        padding = [width - len(tokens) for tokens in rows]
        cache = [BatchKVCache(padding) for _ in make_prompt_cache(self.model)]
        inputs = mx.array([[0] * pad + tokens for pad, tokens in zip(padding, rows, strict=True)], dtype=mx.uint32)
        for start in range(0, width, PREFILL_CHUNK):
            self.model(inputs[:, start : start + PREFILL_CHUNK], cache=cache)
            mx.eval([layer.state for layer in cache])
        return cache

    def filter(self, keep: list[int]) -> None:
        """Keep only rows ``keep``, in that order (rows left the batch)."""
        self.seen = [self.seen[i] for i in keep]
        self.drafted = [self.drafted[i] for i in keep]
        if not keep:
            self.cache = []
            return
        for layer in self.cache:
            layer.filter(keep)

    def draft(self, tokens: list[list[int]], pending: list[int], count: int) -> list[list[int]]:
        """``count`` greedy tokens after each row's sequence: its committed tokens ``tokens[i]`` (those in the
        target's cache), then its pending token ``pending[i]``.

        The cache then holds each sequence and the first ``count - 1`` drafted tokens (:meth:`settle` keeps
        the accepted ones).
        """
        assert len(tokens) == len(pending) == len(self.seen) and count > 0
        started = time.perf_counter()
        self.settle([[] for _ in tokens])  # a draft not verified (none is pending normally)
        unseen = [[*row[seen:], last] for row, seen, last in zip(tokens, self.seen, pending, strict=True)]
        width = max(len(fed) for fed in unseen)
        inputs = mx.array([[*fed, *([0] * (width - len(fed)))] for fed in unseen], dtype=mx.uint32)
        logits = self.model(inputs, cache=self.cache)
        for layer in self.cache:  # the padding leaves at once: each row's next position follows its last token
            layer.trim_rows([width - len(fed) for fed in unseen])
        last = mx.array([len(fed) - 1 for fed in unseen])
        token = mx.argmax(logits[mx.arange(len(unseen)), last], axis=-1)
        chosen = [token]
        for _ in range(count - 1):
            token = mx.argmax(self.model(token[:, None], cache=self.cache)[:, -1], axis=-1)
            chosen.append(token)
        drafts = cast(list[list[int]], mx.stack(chosen, axis=1).tolist())
        self.seen = [len(row) + 1 for row in tokens]
        self.drafted = [row[: count - 1] for row in drafts]
        self.cost.observe(len(tokens), (time.perf_counter() - started) * 1000 / count)
        return drafts

    def settle(self, accepted: list[list[int]]) -> None:
        """After verification: row ``i`` accepted the tokens ``accepted[i]`` after its pending token; the drafted
        tokens that match them stay in the cache (they are its next tokens), the others leave it."""
        if not any(self.drafted):
            return
        kept = [_common_prefix(drafted, tokens) for drafted, tokens in zip(self.drafted, accepted, strict=True)]
        trims = [len(drafted) - keep for drafted, keep in zip(self.drafted, kept, strict=True)]
        for layer in self.cache:
            layer.trim_rows(trims)
        self.seen = [seen + keep for seen, keep in zip(self.seen, kept, strict=True)]
        self.drafted = [[] for _ in self.drafted]

    def lengths(self) -> list[int]:
        """Each row's positions in the draft cache (its ``seen`` tokens and unsettled drafts)."""
        if not self.cache:
            return []
        return cast(list[int], self.cache[0].offset.tolist())

    def idle(self) -> None:
        """A step without the draft model: its acceptance estimate drifts back toward the prior
        (:data:`IDLE_RECOVERY` a step), so a model judged poor is tried again now and then (the text may
        have changed) rather than never."""
        quality = self.quality
        quality.hits = quality.hits * IDLE_RECOVERY + PRIOR_ACCEPTANCE * (1 - IDLE_RECOVERY)
        quality.trials = quality.trials * IDLE_RECOVERY + (1 - IDLE_RECOVERY)

    def draft_ms(self, batch: int, count: int) -> float:
        """What drafting ``count`` tokens for a batch of ``batch`` rows costs, from measured drafts."""
        return count * self.cost.ms(batch)


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """The joining rows (by index) prefilled together: longest rows first, each group in the rows' order.

    Sorted by length, a row joins the group before it while the group's padding (its rows padded to its longest)
    stays within ``PADDING_WASTE`` of its real tokens plus ``PADDING_FREE``.
    """
    groups: list[list[int]] = []
    longest = real = 0
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[row]
        count = len(groups[-1]) + 1 if groups else 0
        if groups and count * longest - (real + length) <= PADDING_WASTE * (real + length) + PADDING_FREE:
            groups[-1].append(row)
            real += length
        else:
            groups.append([row])
            longest = real = length
    return [sorted(group) for group in groups]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n
