"""The step budget: how many prompt tokens each step of the batch may prefill while other streams decode.

mlx-lm's ``BatchGenerator`` runs, per ``next()``, one decode step of the running streams and then one
prefill chunk in which every prompt being prefilled advances by ``prefill_step_size`` tokens (it reads the
attribute on every call). A running stream waits for the whole step, so its gap between tokens is about
``decode step + chunk``. :class:`StepBudget` picks that chunk before each step:

- no stream decoding: the full ``prefill_step_size`` (an idle engine prefills at full speed);
- streams decoding: ``(budget_ms - decode step ms) / ms per prefill token`` tokens in all, shared equally
  by the prompts prefilled together (each advances by the same chunk), never under ``floor`` tokens each
  (prefill always progresses) nor over ``prefill_step_size``.

Both costs are measured online from the wall time of the steps themselves (:meth:`StepBudget.observe`):
the decode step from steps with no prefill, the cost of a prefill token from the rest, each an
exponential moving average so the estimate follows the batch as it grows and its contexts lengthen.
Until a cost is known the chunk is ``floor``; the first measurement then replaces the guess outright.
The cost per token is measured at the chunk in use, so a fixed cost per model call is folded in and the
chunk settles where a step really takes the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_STEP_BUDGET_MS = 250.0
"""The default budget (``worker.step_budget_ms``); see docs/BENCHMARKS.md "step budget" for the curve."""
FLOOR_TOKENS = 16
"""The smallest chunk per prompt while streams decode: the prefill always progresses."""
ALPHA = 0.3
"""Weight of the newest step in the moving averages."""


@dataclass
class StepCosts:
    """Measured costs (None: not measured yet)."""

    decode_ms: float | None = None
    """One decode step of the running streams."""
    prefill_ms_per_token: float | None = None
    """One prompt token of a prefill chunk (the chunk's wall time over its tokens)."""


class StepBudget:
    """Sizes the prefill chunk of each step so that a step with running streams takes about ``budget_ms``.

    :param budget_ms: the target wall time of one step while streams decode (0: no budget, always
        ``full_step``).
    :param full_step: the chunk with no stream decoding, and the largest ever (``prefill_step_size``).
    :param floor: the smallest chunk per prompt while streams decode.
    :param costs: starting costs (tests inject fixed ones; ``learn=False`` keeps them fixed).
    """

    def __init__(
        self,
        budget_ms: float,
        full_step: int,
        *,
        floor: int = FLOOR_TOKENS,
        costs: StepCosts | None = None,
        learn: bool = True,
        alpha: float = ALPHA,
    ) -> None:
        self.budget_ms = budget_ms
        self.full_step = full_step
        self.floor = max(1, min(floor, full_step))
        self.costs = costs or StepCosts()
        self.learn = learn
        self.alpha = alpha

    @property
    def enabled(self) -> bool:
        return self.budget_ms > 0

    def chunk(self, decoding: int, prefilling: int) -> int:
        """Prompt tokens each prefilling prompt may advance in the next step.

        :param decoding: streams in the decode batch (they wait for this step).
        :param prefilling: prompts that will be prefilled together in this step.
        """
        if not self.enabled or decoding == 0 or prefilling == 0:
            return self.full_step
        decode, per_token = self.costs.decode_ms, self.costs.prefill_ms_per_token
        if decode is None or per_token is None or per_token <= 0:
            return self.floor
        tokens = (self.budget_ms - decode) / per_token / prefilling
        if not math.isfinite(tokens):
            return self.floor
        return max(self.floor, min(self.full_step, int(tokens)))

    def observe(self, wall_ms: float, *, decoding: int, prefill_tokens: int) -> None:
        """Learn from one step: its wall time, the streams it decoded and the prompt tokens it prefilled.

        Leave out steps that did more than that (a prompt joining the decode batch: its caches are merged).
        """
        if not self.learn or wall_ms <= 0:
            return
        costs = self.costs
        if prefill_tokens == 0:
            if decoding > 0:
                costs.decode_ms = self._average(costs.decode_ms, wall_ms)
            return
        decode = costs.decode_ms if decoding > 0 else 0.0
        if decode is None:  # no clean decode cost yet to take out
            return
        per_token = max(wall_ms - decode, 0.0) / prefill_tokens
        if per_token > 0:
            costs.prefill_ms_per_token = self._average(costs.prefill_ms_per_token, per_token)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)
