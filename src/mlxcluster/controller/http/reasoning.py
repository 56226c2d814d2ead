"""Reasoning parameters of every API, checked and mapped onto the wire's :class:`ReasoningParams`.

OpenAI chat's ``reasoning_effort``, the Responses API's ``reasoning`` and Anthropic's ``thinking`` ask a
reasoning model the same two things: thinking on or off (the chat template's switch, ``enable_thinking``)
and how much of it (an effort, whose default thinking budget the worker knows, or a budget in tokens). The
controller checks the values and names the client's field in ``ReasoningParams.param``; whether the model
can think is the worker's call (it knows the template), and it refuses a model without thinking with an
``invalid_request`` naming that field, which the client gets as a 400. ``chat_template_kwargs``
(``mlx_lm.server``'s field) go to the template as they are: their keys are the template's business.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from mlxcluster.controller.http.errors import bad_request
from mlxcluster.protocol import ReasoningParams

EFFORTS = ("none", "minimal", "low", "medium", "high")
THINKING_OFF = frozenset({"none", "minimal"})
"""Efforts that turn thinking off (OpenAI's ``minimal`` is the least thinking a template's switch allows)."""
SUMMARIES = ("auto", "concise", "detailed")
MAX_BUDGET = 1 << 20


def effort_reasoning(effort: str | None, param: str) -> ReasoningParams | None:
    """The wire parameters of an effort given in ``param`` (None: not given, the template's default)."""
    if effort is None:
        return None
    if effort not in EFFORTS:
        raise bad_request(f"Invalid value for '{param}': '{effort}'; expected one of {', '.join(EFFORTS)}", param)
    return ReasoningParams(enabled=effort not in THINKING_OFF, effort=effort, param=param)


# The Responses API's ``reasoning`` (``generate_summary`` is the deprecated name of ``summary``).
class ReasoningOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


def responses_reasoning(options: ReasoningOptions | None) -> ReasoningParams | None:
    """``reasoning.effort`` as wire parameters; a summary we cannot write (``concise``, ``detailed``) is a 400.

    No summary is ever produced: the reasoning text itself comes back as reasoning items, so ``auto`` (the
    server's choice) is honoured by giving none."""
    if options is None:
        return None
    for name, value in (("summary", options.summary), ("generate_summary", options.generate_summary)):
        param = f"reasoning.{name}"
        if value is None or value == "auto":
            continue
        if value in SUMMARIES:
            raise bad_request(
                f"'{param}' '{value}' is not supported: no reasoning summary is written (the reasoning text "
                "comes back as reasoning items); use 'auto' or leave it out",
                param,
                code="unsupported_parameter",
            )
        raise bad_request(f"Invalid value for '{param}': '{value}'; expected one of {', '.join(SUMMARIES)}", param)
    return effort_reasoning(options.effort, "reasoning.effort")


# Anthropic's ``thinking``: ``{"type": "enabled", "budget_tokens": N}`` or ``{"type": "disabled"}``.
class ThinkingConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    budget_tokens: Annotated[int, Meta(ge=1, le=MAX_BUDGET)] | None = None


def anthropic_thinking(thinking: ThinkingConfig | None, max_tokens: int) -> ReasoningParams | None:
    """``thinking`` as wire parameters, checked as Anthropic checks it: an enabled one needs
    ``budget_tokens``, less than ``max_tokens`` (the thinking is part of the output)."""
    if thinking is None:
        return None
    if thinking.type == "disabled":
        if thinking.budget_tokens is not None:
            raise bad_request("'thinking.budget_tokens' is only allowed with type 'enabled'", "thinking.budget_tokens")
        return ReasoningParams(enabled=False, param="thinking")
    if thinking.type != "enabled":
        raise bad_request(
            f"Invalid value for 'thinking.type': '{thinking.type}'; expected 'enabled' or 'disabled'", "thinking.type"
        )
    budget = thinking.budget_tokens
    if budget is None:
        raise bad_request(
            "thinking.budget_tokens: Field required", "thinking.budget_tokens", code="missing_required_parameter"
        )
    if budget >= max_tokens:
        raise bad_request(
            f"'max_tokens' ({max_tokens}) must be greater than 'thinking.budget_tokens' ({budget}): the thinking is "
            "part of the output",
            "thinking.budget_tokens",
        )
    return ReasoningParams(enabled=True, budget_tokens=budget, param="thinking")
