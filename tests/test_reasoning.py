"""Reasoning control on the worker: the thinking plan of each reasoning parameter, the think-block tracker and
the budget processor that forces the think-end marker (unit tests; the engine paths run on the family
fixtures in tests/test_families_engine.py)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxcluster.protocol import InferenceRequest, ReasoningParams
from mlxcluster.worker.reasoning import ReasoningRefused, ThinkingBudget, ThinkingPlan, ThinkTracker, plan_thinking

START, END = (7,), (8, 9)  # a one-token start marker and a two-token end marker


def request(reasoning: ReasoningParams | None = None, **kwargs: object) -> InferenceRequest:
    return InferenceRequest(request_id="r", model="m", prompt="x", reasoning=reasoning, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reasoning", "kwargs", "switch", "expected"),
    [
        (None, None, True, ThinkingPlan(None, None)),
        (None, {"enable_thinking": False}, True, ThinkingPlan(False, None)),
        (
            ReasoningParams(enabled=False, effort="none", param="reasoning_effort"),
            None,
            True,
            ThinkingPlan(False, None),
        ),
        (ReasoningParams(enabled=False, effort="minimal"), None, False, ThinkingPlan(None, 0)),  # always thinks
        (ReasoningParams(enabled=True, effort="low"), None, True, ThinkingPlan(True, 1024)),
        (ReasoningParams(enabled=True, effort="high"), None, True, ThinkingPlan(True, 1500)),  # half of max_tokens
        (ReasoningParams(effort="medium"), None, True, ThinkingPlan(True, 1500)),
        (ReasoningParams(enabled=True, budget_tokens=64, param="thinking"), None, True, ThinkingPlan(True, 64)),
        (ReasoningParams(enabled=True, budget_tokens=64), None, False, ThinkingPlan(None, 64)),
        (ReasoningParams(enabled=True, effort="low"), {"enable_thinking": False}, True, ThinkingPlan(False, 1024)),
    ],
)
def test_the_thinking_plan_of_each_parameter(
    reasoning: ReasoningParams | None, kwargs: dict | None, switch: bool, expected: ThinkingPlan
) -> None:
    plan = plan_thinking(request(reasoning, chat_template_kwargs=kwargs), thinking=True, switch=switch, max_tokens=3000)
    assert plan == expected


def test_a_model_without_thinking_refuses_to_think_and_ignores_not_thinking() -> None:
    asked = ReasoningParams(enabled=True, effort="high", param="reasoning.effort")
    with pytest.raises(ReasoningRefused) as refused:
        plan_thinking(request(asked), thinking=False, switch=False, max_tokens=100)
    assert refused.value.param == "reasoning.effort"
    off = ReasoningParams(enabled=False, param="thinking")
    assert plan_thinking(request(off), thinking=False, switch=False, max_tokens=100) == ThinkingPlan(None, None)


def test_configured_budgets_replace_the_defaults() -> None:
    plan = plan_thinking(
        request(ReasoningParams(effort="low")),
        thinking=True,
        switch=True,
        max_tokens=10_000,
        budgets={"low": 7, "medium": 8, "high": 9},
    )
    assert plan.budget == 7


def test_the_tracker_follows_multi_token_markers() -> None:
    tracker = ThinkTracker(START, END, inside=False)
    for token in [1, 7, 2, 3, 8, 4, 9, 8, 9, 5]:
        tracker.add(token)
    assert not tracker.inside
    assert tracker.spent == 7  # 2, 3, 8, 4, 9, 8, 9: inside from after <start> until the end marker closes
    tracker.add(7)
    assert tracker.inside


def run_budget(budget: int, inside: bool, generated: list[int]) -> list[list[int]]:
    """The tokens each call leaves allowed (finite logits), feeding ``generated`` one by one."""
    processor = ThinkingBudget(ThinkTracker(START, END, inside=inside), budget)
    context = [0]
    allowed = []
    for token in [None, *generated]:
        if token is not None:
            context.append(token)
        out = processor(mx.array(context), mx.zeros((1, 12)))
        allowed.append([i for i, v in enumerate(out[0].tolist()) if v != float("-inf")])
    return allowed


def test_the_budget_forces_the_end_marker_once_spent() -> None:
    everything = list(range(12))
    allowed = run_budget(2, inside=True, generated=[1, 2, 8, 9, 3])
    assert allowed[0] == everything and allowed[1] == everything  # spent 0, then 1
    assert allowed[2] == [8]  # 2 spent: the end marker's first token ...
    assert allowed[3] == [9]  # ... then its second
    assert allowed[4] == everything and allowed[5] == everything  # out of the block: free


def test_a_zero_budget_closes_a_block_the_model_opens() -> None:
    allowed = run_budget(0, inside=False, generated=[3, 7, 8, 9])
    assert allowed[1] == list(range(12))
    assert allowed[2] == [8] and allowed[3] == [9]
    assert allowed[4] == list(range(12))


def test_resume_does_not_count_the_last_token_twice() -> None:
    tracker = ThinkTracker(START, END, inside=True)
    processor = ThinkingBudget(tracker, 10)
    processor(mx.array([0]), mx.zeros((1, 12)))
    processor(mx.array([0, 5]), mx.zeros((1, 12)))
    assert tracker.spent == 1
    processor.resume()  # re-inserted into a fresh batch: the context ends with 5 again
    processor(mx.array([0, 5]), mx.zeros((1, 12)))
    assert tracker.spent == 1
