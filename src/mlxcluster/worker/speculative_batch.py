"""Speculative decoding inside mlx-lm's continuous batch: prompt-lookup drafts, verified per row in one forward.

:class:`SpeculativeBatchGenerator` is mlx-lm's ``BatchGenerator`` with a decode batch that can verify drafts
(:class:`SpeculativeGenerationBatch`). Each step, every greedy or sampled row without logits processors
(a grammar is allowed) looks up a draft in its own prompt and output
(:class:`~mlxcluster.worker.ngram_index.NGramIndex`); when the step cost model says drafting pays
(:func:`~mlxcluster.worker.speculation.best_length`), the batch runs one forward of ``L`` tokens per row: a
row's pending token, its draft (cut to ``L - 1``), padding for shorter drafts. A row accepts its drafted
tokens while each equals the model's choice at that position, emits its pending token and the accepted
drafts, and takes the model's choice after the last accepted one as its next pending token. A greedy row's
choice is the argmax (the output is the one plain greedy decoding gives); a sampled row's is a draw from
the same distribution with the key plain decoding would draw that token with
(:meth:`~mlxcluster.worker.sampling.KeyedSampler.draws`), so a drafted token is accepted with the
probability the model gives it and the tokens are those plain sampling gives with the same seed. The
positions a row did not accept leave its KV cache (:class:`~mlxcluster.worker.ragged_cache.RaggedKVCache`:
rows end where their own tokens end). Rows that do not draft (a penalty or other logits processors, paused
by back-off) decode their one token in the same forward.

Each emitted token goes through the stop checks one at a time, as in a plain step: a row that stops (end
of sequence, ``max_tokens``) in the middle of its accepted tokens ends there, and the tokens after the stop
leave its cache before the cache is handed out. Models whose caches are not all plain batch KV caches
(sliding-window layers, linear attention) never draft: their caches cannot drop positions per row.
"""

from __future__ import annotations

import time
from typing import Any, cast

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import greedy_sampler

from mlxcluster.worker.draft_model import DraftModel
from mlxcluster.worker.ragged_cache import RaggedKVCache
from mlxcluster.worker.speculation import (
    DEFAULT_DRAFT_TOKENS,
    RowDrafts,
    SpeculationStats,
    StepCostModel,
    best_length,
)

TIMED_PLAIN_EVERY = 16
"""While rows could draft, every this many plain steps one is timed (synchronously) for the cost model."""


class SpeculativeGenerationBatch(GenerationBatch):
    """mlx-lm's decode batch, with prompt-lookup drafts verified in the batch's own forward."""

    # mlx-lm's untyped attributes, as this class uses them
    samplers: Any
    logits_processors: Any
    prompt_cache: Any
    _next_tokens: Any
    _next_logprobs: Any
    _current_tokens: Any
    _current_logprobs: Any
    _token_context: Any

    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    stats: SpeculationStats
    cost: StepCostModel

    def setup(
        self, draft_tokens: int, stats: SpeculationStats, cost: StepCostModel, draft: DraftModel | None = None
    ) -> None:
        self.draft_tokens = draft_tokens
        self.draft = draft
        """The draft model, its cache mirroring this batch's rows (None: prompt-lookup drafts only)."""
        self.stats = stats
        self.cost = cost
        self.rows: dict[int, RowDrafts] = {}
        self._plain_steps = 0
        self._known_pending: list[int] | None = None
        """The pending tokens when a speculative step computed them (None after a plain step: not known yet)."""
        self._emitted: list[list[int]] = []
        self._emitted_logprobs: list[list[Any]] = []
        self._modelled: set[int] = set()
        """Rows whose draft in this step is the draft model's."""

    # --- drafting -----------------------------------------------------------------------------

    def _can_draft(self) -> bool:
        return bool(self.uids) and all(isinstance(c, BatchKVCache) for c in self.prompt_cache)

    def _drafter(self, i: int) -> RowDrafts | None:
        """Row ``i``'s drafting state, or None when it does not draft (a sampler that cannot replay its draws;
        a logits processor that cannot judge drafts, such as a penalty or a thinking budget; a grammar can)."""
        sampler = self.samplers[i] if self.samplers else None
        if sampler not in (None, greedy_sampler) and not getattr(sampler, "draftable", False):
            return None
        processors = self.logits_processors[i] if self.logits_processors else ()
        if not all(getattr(processor, "draftable", False) for processor in processors or ()):
            return None
        uid = self.uids[i]
        row = self.rows.get(uid)
        if row is None:
            row = self.rows[uid] = RowDrafts()
        return row

    def _proposals(self) -> tuple[list[list[int]], list[RowDrafts | None]] | None:
        """Each row's draft (the tokens after its pending token) and its drafting state; None: no drafts.

        Right after a speculative step the pending tokens are known and a row looks up its tail plus its
        pending token. After a plain step they are still being computed, and waiting for them would stall
        mlx-lm's pipeline on every step: a row then looks up its tail alone, whose continuation starts with
        a guess of its pending token, and drafts what follows the guess (a wrong guess only wastes that
        row's draft: verification compares each drafted token with the model's choice).
        """
        if not self._can_draft():
            return None
        known = self._known_pending
        drafts: list[list[int]] = []
        drafters: list[RowDrafts | None] = []
        for i in range(len(self.uids)):
            row = self._drafter(i)
            drafters.append(row)
            room = min(self.draft_tokens, self.max_tokens[i] - self._num_tokens[i] - 2)  # pending + the next
            if row is None or room <= 0 or not row.ready():
                drafts.append([])
                continue
            drafts.append(self._lookup(i, row, room, known))
        if not any(drafts):
            return None
        return drafts, drafters

    def _lookup(self, i: int, row: RowDrafts, room: int, known: list[int] | None) -> list[int]:
        """Row ``i``'s prompt-lookup draft of at most ``room`` tokens (after a guess of its pending token when
        the pending tokens are not known)."""
        row.index.sync(self.tokens[i])
        if known is not None:
            return row.index.propose(known[i], room)
        return row.index.continuation(room + 1)[1:]

    def _lookups(self, drafters: list[RowDrafts | None], rooms: list[int], known: list[int] | None) -> list[list[int]]:
        """Every row's prompt-lookup draft (empty for a row that does not draft or has no room)."""
        return [
            self._lookup(i, row, room, known) if row and room else []
            for i, (row, room) in enumerate(zip(drafters, rooms, strict=True))
        ]

    # --- steps --------------------------------------------------------------------------------

    def _plan_with_draft_model(self) -> tuple[list[list[int]], list[RowDrafts | None], int] | None:
        """Each row's draft, its drafting state and the forward length, drafting with the draft model; None: no
        row drafts.

        The length is chosen before drafting, the draft model's measured forwards counted in its cost and its
        drafts expected to be accepted at the draft model's own measured rate (:attr:`DraftModel.quality`, with
        its back-off), not at the rows' (which prompt-lookup drafts may hold high). When the draft model does
        not pay, prompt lookup alone drafts, as without a draft model (the pending tokens not waited for).
        Else the pending tokens must be known to draft after them (after a plain step this waits for them); a
        row's prompt-lookup draft is taken when it covers the step's draft length (free and, where the text
        repeats, right more often than a small model), else the draft model's; the draft model runs only when
        some row needs it.
        """
        assert self.draft is not None
        if not self._can_draft():
            return None
        batch = len(self.uids)
        drafters: list[RowDrafts | None] = []
        rooms: list[int] = []
        for i in range(batch):
            row = self._drafter(i)
            drafters.append(row)
            room = min(self.draft_tokens, self.max_tokens[i] - self._num_tokens[i] - 2)  # pending + the next
            rooms.append(room if row is not None and room > 0 and row.ready() else 0)
        if not any(rooms):
            return None
        draft = self.draft
        known = self._known_pending
        length = 1
        if draft.quality.ready():
            modelled_rows = [draft.quality if row is not None else None for row in drafters]
            length = best_length(
                rooms, modelled_rows, self.cost, self.draft_tokens, draft_ms=lambda count: draft.draft_ms(batch, count)
            )
        if length <= 1:
            draft.idle()
            drafts = self._lookups(drafters, rooms, known)
            length = best_length([len(d) for d in drafts], drafters, self.cost, self.draft_tokens)
            return [d[: length - 1] for d in drafts], drafters, length
        if known is None:
            known = cast(list[int], self._next_tokens.tolist())
        lookups = self._lookups(drafters, rooms, known)

        def model_needed(count: int) -> bool:
            return any(room and len(lookup) < min(count, room) for lookup, room in zip(lookups, rooms, strict=True))

        def draft_ms(count: int) -> float:
            return draft.draft_ms(batch, count) if model_needed(count) else 0.0

        priced = [  # a row whose lookup covers its room drafts at its own rate, else at the draft model's
            row if row is None or len(lookup) >= room else draft.quality
            for row, lookup, room in zip(drafters, lookups, rooms, strict=True)
        ]
        length = best_length(rooms, priced, self.cost, self.draft_tokens, draft_ms=draft_ms)
        if length <= 1:  # drafting does not pay after all: a plain step (the pending tokens were waited for)
            draft.idle()
            return [[] for _ in rooms], drafters, 1
        count = length - 1
        drafts = [lookup[:count] for lookup in lookups]
        if not model_needed(count):
            draft.idle()
        else:
            modelled = draft.draft(self.tokens, known, count)
            for i, room in enumerate(rooms):
                if room and len(drafts[i]) < min(count, room):
                    drafts[i] = modelled[i][:room]
                    self._modelled.add(i)
        return drafts, drafters, length

    def _step(self) -> tuple[list[int], list[Any]]:
        if self.draft is not None:
            planned = self._plan_with_draft_model()
        else:
            proposals = self._proposals()
            planned = None
            if proposals is not None:
                drafts, drafters = proposals
                length = best_length([len(d) for d in drafts], drafters, self.cost, self.draft_tokens)
                planned = [d[: length - 1] for d in drafts], drafters, length
        self._known_pending = None
        if planned is not None:
            drafts, drafters, length = planned
            if length > 1:
                return self._speculative_step(drafts, drafters, length)
            self._plain_steps += 1
            if self._plain_steps % TIMED_PLAIN_EVERY == 1:
                return self._timed_plain_step()
        tokens, logprobs = super()._step()
        self._emitted = [[t] for t in tokens]
        self._emitted_logprobs = [[lp] for lp in logprobs]
        return tokens, logprobs

    def _timed_plain_step(self) -> tuple[list[int], list[Any]]:
        """A plain step, waited for, so the cost model learns what one forward of the batch costs."""
        started = time.perf_counter()
        tokens, logprobs = super()._step()
        mx.eval(self._next_tokens)
        self.cost.observe(len(self.uids), (time.perf_counter() - started) * 1000)
        self._emitted = [[t] for t in tokens]
        self._emitted_logprobs = [[lp] for lp in logprobs]
        return tokens, logprobs

    def _speculative_step(
        self, drafts: list[list[int]], drafters: list[RowDrafts | None], length: int
    ) -> tuple[list[int], list[Any]]:
        started = time.perf_counter()
        self.prompt_cache = [c if isinstance(c, RaggedKVCache) else RaggedKVCache.adopt(c) for c in self.prompt_cache]
        batch = len(self.uids)
        inputs = self._next_tokens
        self._current_tokens, self._current_logprobs = inputs, self._next_logprobs
        drafted = mx.array([[*d, *([0] * (length - 1 - len(d)))] for d in drafts], dtype=inputs.dtype)
        logits = self.model(mx.concatenate([inputs[:, None], drafted], axis=1), cache=self.prompt_cache)

        first = logits[:, 0, :]  # the plain step's logits: the processors and samplers see only these
        token_context = []
        guided: dict[int, mx.array] = {}
        """Rows with processors and a draft: their drafted positions' logits, as the processors left them."""
        if any(self.logits_processors):
            processed = []
            for e in range(batch):
                row_logits = first[e : e + 1]
                processors = self.logits_processors[e] or ()
                if processors:
                    context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                    token_context.append(context)
                    for processor in processors:
                        row_logits = processor(context, row_logits)
                    if drafts[e]:
                        drafts[e], positions = self._guide_draft(drafts[e], processors, context, logits[e])
                        if drafts[e]:  # else the grammar allows none of it: a plain step for this row
                            guided[e] = positions
                processed.append(row_logits)
            first = mx.concatenate(processed, axis=0)
        first_logprobs = first - mx.logsumexp(first, axis=-1, keepdims=True)
        samplers: list[Any] = [self.fallback_sampler if s is None else s for s in (self.samplers or [None] * batch)]
        if all(s is samplers[0] for s in samplers):
            sampled = samplers[0](first_logprobs)
        else:
            sampled = mx.concatenate([s(first_logprobs[e : e + 1]) for e, s in enumerate(samplers)], axis=0)
        rest = logits[:, 1:, :]
        rest_logprobs = rest - mx.logsumexp(rest, axis=-1, keepdims=True)
        choices = mx.argmax(rest_logprobs, axis=-1)
        guided_logprobs = {e: g - mx.logsumexp(g, axis=-1, keepdims=True) for e, g in guided.items()}
        guided_choices = {e: mx.argmax(g, axis=-1) for e, g in guided_logprobs.items()}
        drawn: dict[int, tuple[mx.array, list[mx.array]]] = {}
        """Sampled rows with a draft: a draw at each drafted position, and the sampler's key after each."""
        for e, draft in enumerate(drafts):
            sampler = samplers[e]
            if draft and getattr(sampler, "draftable", False):
                draws, keys = sampler.draws(guided_logprobs.get(e, rest_logprobs[e])[: len(draft)])
                drawn[e] = mx.concatenate(draws), keys
        mx.eval(sampled, choices, first_logprobs, rest_logprobs, self._current_logprobs, token_context)
        mx.eval(guided_logprobs, guided_choices, [row_draws for row_draws, _ in drawn.values()])
        pending = cast(list[int], inputs.tolist())
        sampled_list = cast(list[int], sampled.tolist())
        choice_rows = cast(list[list[int]], choices.tolist())
        for e, row_choices in guided_choices.items():
            choice_rows[e] = cast(list[int], row_choices.tolist())
        for e, (row_draws, _) in drawn.items():
            choice_rows[e] = cast(list[int], row_draws.tolist())

        next_tokens: list[int] = []
        next_logprobs: list[Any] = []
        self._emitted, self._emitted_logprobs = [], []
        rejected: list[int] = []
        accepted_tokens: list[list[int]] = []
        stats = self.stats
        for i in range(batch):
            draft = drafts[i]
            targets = [sampled_list[i], *choice_rows[i]]
            accepted = 0
            while accepted < len(draft) and draft[accepted] == targets[accepted]:
                accepted += 1
            if accepted and i in drawn:  # its key moves past the draws of the tokens kept, as plain decoding's
                samplers[i].commit(drawn[i][1][accepted - 1])
            row = drafters[i]
            if draft and row is not None:
                row.verified(len(draft), accepted)
                stats.drafted += len(draft)
                stats.accepted += accepted
                if i in self._modelled and self.draft is not None:
                    stats.model_drafted += len(draft)
                    stats.model_accepted += accepted
                    self.draft.quality.verified(len(draft), accepted)
            if i in guided:
                for processor in self.logits_processors[i]:
                    processor.rollback(len(draft) - accepted)
                if accepted:
                    self._token_context[i].update_and_fetch(mx.array(draft[:accepted], dtype=mx.int32))
            row_rest = guided_logprobs.get(i, rest_logprobs[i])
            emitted = [pending[i], *draft[:accepted]]
            logprobs = [
                self._current_logprobs[i],
                *(self._row_logprobs(first_logprobs, row_rest, i, j) for j in range(accepted)),
            ]
            self._emitted.append(emitted)
            self._emitted_logprobs.append(logprobs)
            self.tokens[i].extend(emitted)
            next_tokens.append(targets[accepted])
            next_logprobs.append(self._row_logprobs(first_logprobs, row_rest, i, accepted))
            rejected.append(length - 1 - accepted)
            accepted_tokens.append(draft[:accepted])
        for cache in self.prompt_cache:
            cache.trim_rows(rejected)
        if self.draft is not None:
            self.draft.settle(accepted_tokens)
        self._modelled.clear()
        self._next_tokens = mx.array(next_tokens, dtype=inputs.dtype)
        self._known_pending = next_tokens
        self._next_logprobs = next_logprobs
        stats.steps += 1
        self.cost.observe(batch * length, (time.perf_counter() - started) * 1000)
        return [e[0] for e in self._emitted], [lp[0] for lp in self._emitted_logprobs]

    @staticmethod
    def _row_logprobs(first: mx.array, row_rest: mx.array, row: int, position: int) -> mx.array:
        """The logprobs row ``row`` had at ``position`` of the forward (0: its pending token's step)."""
        return first[row] if position == 0 else row_rest[position - 1]

    @staticmethod
    def _guide_draft(
        draft: list[int], processors: Any, context: mx.array, row_logits: mx.array
    ) -> tuple[list[int], mx.array]:
        """Cut a row's draft to what its processors (a grammar) allow, and run them over each drafted position.

        They have just seen the pending token; they consume each drafted token as they would have in plain
        steps, so each position's logits are masked as plain decoding would mask them. The caller rolls them
        back past the tokens not accepted.
        """
        allowed = min(processor.valid_prefix(draft) for processor in processors)
        draft = draft[:allowed]
        positions = []
        for j in range(1, len(draft) + 1):
            seen = mx.concatenate([context, mx.array(draft[:j], dtype=context.dtype)])
            logits = row_logits[j : j + 1]
            for processor in processors:
                logits = processor(seen, logits)
            positions.append(logits)
        return draft, mx.concatenate(positions, axis=0) if positions else row_logits[:0]

    def next(self) -> list[Any]:
        """Like mlx-lm's, with every token a row emitted this step, in order, each through the stop checks."""
        if not self.uids:
            return []
        self._step()
        keep: list[int] = []
        responses: list[Any] = []
        for i in range(len(self.uids)):
            emitted, logprobs = self._emitted[i], self._emitted_logprobs[i]
            finish_reason = None
            for n, token in enumerate(emitted):
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish_reason = "length"
                if self._matchers[i].advance(token):
                    finish_reason = "stop"
                if finish_reason is not None:
                    self._drop_after(i, len(emitted) - n - 1)
                    responses.append(
                        self.Response(
                            uid=self.uids[i],
                            token=token,
                            logprobs=logprobs[n],
                            finish_reason=finish_reason,
                            prompt_cache=self.extract_cache(i),
                            all_tokens=self.tokens[i],
                        )
                    )
                    break
                responses.append(self.Response(self.uids[i], token, logprobs[n], None, None, None))
            if finish_reason is None:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses

    def _drop_after(self, i: int, count: int) -> None:
        """Take a row's last ``count`` emitted tokens back out of its cache (it stopped before them)."""
        if count <= 0:
            return
        del self.tokens[i][-count:]
        counts = [0] * len(self.uids)
        counts[i] = count
        for cache in self.prompt_cache:
            cache.trim_rows(counts)

    def extend(self, batch: Any) -> None:
        super().extend(batch)  # type: ignore[no-untyped-call]
        self._known_pending = None  # the new rows' pending tokens are being computed
        if self.draft is not None:
            self.draft.extend(batch.tokens)  # each row's tokens in the target's cache (all but its pending one)

    def filter(self, keep: list[int]) -> None:
        known = self._known_pending
        self._known_pending = [known[i] for i in keep] if known is not None else None
        if self.draft is not None:
            self.draft.filter(keep)
        super().filter(keep)
        alive = set(self.uids)
        self.rows = {uid: row for uid, row in self.rows.items() if uid in alive}


class SpeculativeBatchGenerator(BatchGenerator):
    """mlx-lm's ``BatchGenerator`` whose decode batch drafts and verifies (see the module)."""

    def __init__(
        self,
        model: Any,
        *,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        stats: SpeculationStats | None = None,
        draft_model: Any = None,
        **kwargs: Any,
    ) -> None:
        """:param draft_model: a model with ``model``'s tokenizer that drafts (None: prompt lookup only)."""
        super().__init__(model, **kwargs)
        self.speculation = stats if stats is not None else SpeculationStats()
        batch = SpeculativeGenerationBatch.empty(self.model, self.sampler)
        draft = DraftModel(draft_model) if draft_model is not None else None
        batch.setup(draft_tokens, self.speculation, StepCostModel(), draft)
        self._generation_batch = batch
