"""Reasoning control: the template's thinking switch, thinking budgets, and counting reasoning tokens.

A request's :class:`~mlxcluster.protocol.ReasoningParams` (from ``reasoning_effort``, the Responses API's
``reasoning`` or Anthropic's ``thinking``) maps onto the chat template's switch (``enable_thinking``,
which mlx-lm's tokenizer wrapper renames for templates that call it ``thinking``) and a budget: once a
request has spent its budget inside a think block, :class:`ThinkingBudget` forces the think-end marker,
so the answer still comes. ``none``/``minimal`` switch thinking off; a model that always thinks (think
markers, no switch) then gets a budget of zero. A model without think markers refuses a request to think
(the caller names the client's field); asking it not to think is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlxcluster.protocol import InferenceRequest

OFF_EFFORTS = frozenset({"none", "minimal"})
DEFAULT_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}
"""Reasoning tokens per effort when the client gives no budget (``worker.thinking_budgets`` overrides them)."""


class ReasoningRefused(ValueError):
    """The request asks for reasoning control the model does not have; ``param`` is the client's field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ThinkingPlan:
    """What one request does about thinking: the template switch to pass and the budget to enforce."""

    enable_thinking: bool | None
    """The value for the template's switch (None: leave the template's default)."""
    budget: int | None
    """Most reasoning tokens before the think-end marker is forced (None: no budget)."""


def plan_thinking(
    request: InferenceRequest,
    *,
    thinking: bool,
    switch: bool,
    max_tokens: int,
    budgets: dict[str, int] | None = None,
) -> ThinkingPlan:
    """The thinking plan of ``request`` on a model with (``thinking``) think markers and (``switch``) a switch.

    ``chat_template_kwargs["enable_thinking"]`` is honoured as given; ``reasoning`` decides otherwise.
    A per-effort default budget is at most half of ``max_tokens``, so the answer has room.
    Raises :class:`ReasoningRefused` when the model cannot think at all.
    """
    asked = request.reasoning
    kwargs = request.chat_template_kwargs or {}
    explicit = kwargs.get("enable_thinking")
    if asked is None:
        return ThinkingPlan(enable_thinking=explicit if isinstance(explicit, bool) else None, budget=None)
    enabled = asked.enabled
    if enabled is None and asked.effort:
        enabled = asked.effort not in OFF_EFFORTS
    if not thinking:
        if enabled is False:  # nothing to switch off
            return ThinkingPlan(enable_thinking=None, budget=None)
        raise ReasoningRefused(
            "this model does not reason: its chat template has no thinking and its vocabulary no think markers",
            asked.param or "reasoning",
        )
    budget = asked.budget_tokens
    if budget is None and enabled and asked.effort in (budgets or DEFAULT_BUDGETS):
        budget = min((budgets or DEFAULT_BUDGETS)[asked.effort], max(1, max_tokens // 2))
    if enabled is False:
        if switch:
            return ThinkingPlan(enable_thinking=False, budget=None)
        return ThinkingPlan(enable_thinking=None, budget=0)  # always thinks: close the block at once
    if isinstance(explicit, bool):
        enabled = explicit
    return ThinkingPlan(enable_thinking=enabled if switch else None, budget=budget)


class ThinkTracker:
    """Follows generated tokens in and out of think blocks (the markers may be several tokens long)."""

    def __init__(self, start: Sequence[int], end: Sequence[int], *, inside: bool) -> None:
        self.start = tuple(start)
        self.end = tuple(end)
        self.inside = inside
        self.spent = 0
        """Tokens generated inside think blocks (the end marker included)."""
        self._recent: tuple[int, ...] = ()

    def add(self, token: int) -> None:
        if self.inside:
            self.spent += 1
        width = max(len(self.start), len(self.end))
        self._recent = (self._recent + (token,))[-width:]
        if self.inside and self.end and self._recent[-len(self.end) :] == self.end:
            self.inside = False
        elif not self.inside and self.start and self._recent[-len(self.start) :] == self.start:
            self.inside = True


class ThinkingBudget:
    """mlx-lm logits processor: once ``budget`` reasoning tokens are spent, force the think-end marker.

    Called once per generated token with the sequence so far and the next token's logits ``[1, vocab]``
    (the first call sees only the prompt). While the end marker is being forced (it may be several
    tokens), every other token is masked.
    """

    def __init__(self, tracker: ThinkTracker, budget: int) -> None:
        self.tracker = tracker
        self.budget = budget
        self._started = False
        self._forcing = 0

    def resume(self) -> None:
        """The next call's last token was already counted (the request was re-inserted into a new batch)."""
        self._started = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        if self._started:
            self.tracker.add(int(tokens[-1].item()))
        self._started = True
        tracker = self.tracker
        if not tracker.inside:
            self._forcing = 0
            return logits
        if tracker.spent < self.budget and not self._forcing:
            return logits
        forced = tracker.end[min(self._forcing, len(tracker.end) - 1)]
        self._forcing += 1
        mask = mx.full(logits.shape, -float("inf"), dtype=logits.dtype)
        mask[..., forced] = 0
        return logits + mask
