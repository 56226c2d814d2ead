"""When speculation pays: the per-row draft policy and the step cost model behind each step's draft length.

A speculative step feeds every row of the batch ``L`` tokens (its pending token and up to ``L - 1``
drafted ones) in one forward; a row gains the drafts it gets accepted, the whole batch pays for the
longer forward. Whether that pays depends on the machine (on a GPU a forward of a few tokens costs about
what one costs; on this CPU each extra token of the batch costs about a tenth of a step) and on how often
each row's drafts are right. So each step picks ``L`` to maximise the expected tokens per second:

- the expected tokens of a row with ``k`` drafted tokens and acceptance rate ``a`` is ``1 + a + ... + a^k``
  (a draft stops at its first wrong token); ``a`` is learned per row from its verified drafts;
- the time of a forward of ``n`` tokens is ``c0 + c1 * n``, fitted from the steps' own measured times;
- with a draft model (``worker.draft_model``), drafting ``k`` tokens adds ``k`` of its forwards, each timed the
  same way (:class:`~mlxcluster.worker.draft_model.DraftModel`).

A row whose drafts keep failing pauses drafting (exponential back-off), so a workload with nothing to look
up runs plain steps, pipelined as mlx-lm runs them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mlxcluster.worker.ngram_index import NGramIndex

DEFAULT_DRAFT_TOKENS = 8
"""The most tokens drafted per row and step (``worker.speculative_tokens``)."""
PRIOR_ACCEPTANCE = 0.8
"""A row's acceptance rate before any of its drafts was verified (hopeful: drafting must start to be measured)."""
DECAY = 0.9
"""Weight of a row's past in its acceptance rate, per verified draft."""
MISSES_BEFORE_PAUSE = 2
"""Drafts with nothing accepted, in a row, before drafting pauses."""
MAX_PAUSE_STEPS = 64


@dataclass
class SpeculationStats:
    """Counters of one engine's speculative decoding (read by the heartbeat from other threads: ints only)."""

    steps: int = 0
    """Speculative steps (a forward verifying at least one draft)."""
    drafted: int = 0
    """Draft tokens verified."""
    accepted: int = 0
    """Draft tokens accepted (each one a token generated without a forward of its own)."""
    model_drafted: int = 0
    """Of ``drafted``, those the draft model drafted (the rest: prompt lookup)."""
    model_accepted: int = 0
    """Of ``accepted``, those the draft model drafted."""


@dataclass
class RowDrafts:
    """One row's drafting state: its n-gram index, acceptance rate and back-off."""

    index: NGramIndex = field(default_factory=NGramIndex)
    hits: float = PRIOR_ACCEPTANCE
    trials: float = 1.0
    """Verified draft tokens (decayed), with the prior counted as one."""
    misses: int = 0
    pause: int = 0
    """Steps left without drafting."""
    next_pause: int = 4

    @property
    def acceptance(self) -> float:
        return self.hits / self.trials

    def expected(self, drafted: int) -> float:
        """Expected accepted tokens of a draft of ``drafted`` tokens."""
        rate, total, term = self.acceptance, 0.0, 1.0
        for _ in range(drafted):
            term *= rate
            total += term
        return total

    def verified(self, drafted: int, accepted: int) -> None:
        """Learn from one verified draft."""
        rejected = 1 if accepted < drafted else 0
        self.hits = self.hits * DECAY**drafted + accepted
        self.trials = self.trials * DECAY**drafted + accepted + rejected
        if accepted:
            self.misses, self.next_pause = 0, 4
            return
        self.misses += 1
        if self.misses >= MISSES_BEFORE_PAUSE:
            self.pause, self.misses = self.next_pause, 0
            self.next_pause = min(self.next_pause * 2, MAX_PAUSE_STEPS)

    def ready(self) -> bool:
        """Whether this row drafts in this step (counts a paused step down)."""
        if self.pause > 0:
            self.pause -= 1
            return False
        return True


class StepCostModel:
    """``ms = c0 + c1 * tokens`` for one forward of the decode batch, fitted to recent measured steps.

    Until two different sizes were measured, an extra token is taken to cost ``prior_ratio`` of a step: a
    guess that lets speculation start and measure.
    """

    def __init__(self, *, window: int = 64, prior_ratio: float = 0.1) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.prior_ratio = prior_ratio
        self._fit: tuple[float, float] | None = None

    def observe(self, tokens: int, ms: float) -> None:
        if ms > 0 and tokens > 0:
            self.samples.append((tokens, ms))
            self._fit = None

    def coefficients(self) -> tuple[float, float]:
        """``(c0, c1)``, both at least 0."""
        if self._fit is None:
            self._fit = self._least_squares()
        return self._fit

    def _least_squares(self) -> tuple[float, float]:
        samples = self.samples
        if not samples:
            return 1.0, self.prior_ratio
        n = len(samples)
        mean_x = sum(x for x, _ in samples) / n
        mean_y = sum(y for _, y in samples) / n
        var = sum((x - mean_x) ** 2 for x, _ in samples)
        if var < 1e-9:  # one size only: the prior's slope through the measured mean
            c0 = mean_y / (1 + self.prior_ratio * mean_x)
            return c0, c0 * self.prior_ratio
        c1 = max(sum((x - mean_x) * (y - mean_y) for x, y in samples) / var, 0.0)
        c0 = max(mean_y - c1 * mean_x, 1e-6)
        return c0, c1

    def ms(self, tokens: int) -> float:
        c0, c1 = self.coefficients()
        return c0 + c1 * tokens


def best_length(
    proposed: list[int],
    rows: list[RowDrafts | None],
    cost: StepCostModel,
    longest: int,
    *,
    draft_ms: Callable[[int], float] | None = None,
) -> int:
    """The forward length per row (1: a plain step) with the most expected tokens per second.

    :param proposed: tokens drafted for each row (0: none).
    :param rows: each row's drafting state (None: it does not draft).
    :param longest: the most tokens a row may draft.
    :param draft_ms: what drafting ``n`` tokens a row costs besides the forward (a draft model's forwards).
    """
    batch = len(proposed)
    best, best_rate = 1, batch / cost.ms(batch)
    top = min(longest, max(proposed, default=0))
    for drafted in range(1, top + 1):
        tokens = float(batch)
        for count, row in zip(proposed, rows, strict=True):
            if count and row is not None:
                tokens += row.expected(min(count, drafted))
        ms = cost.ms(batch * (1 + drafted)) + (draft_ms(drafted) if draft_ms is not None else 0.0)
        rate = tokens / ms
        if rate > best_rate:
            best, best_rate = 1 + drafted, rate
    return best
