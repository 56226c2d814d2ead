"""A reasoning model's think block, as grammars see it: constraints apply from the think-end marker on.

vLLM and SGLang do the same with a reasoning parser. The markers are mlx-lm's (``TokenizerWrapper``'s
``think_start`` / ``think_end`` and their token ids, found in the vocabulary). For one request the block is
in one of three states at the start of the output (:func:`reasoning_mode`):

- ``opened``: the prompt ends inside a think block (the template opened it): the output is reasoning up to the
  think-end marker, then the answer;
- ``may_open``: the model has think markers and thinking is not switched off for the request: the output may
  open a think block with its very first token, else it is the answer;
- ``none``: the answer from the first token (a model without thinking, or thinking switched off).

:func:`with_reasoning` wraps an answer grammar accordingly. Inside reasoning nothing is masked but the end of
the sequence (never allowed there: a grammar accepts only once its answer is complete); where the think-end
marker is not one special token, reasoning is free text up to it (no other special token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mlxcluster.protocol import InferenceRequest
from mlxcluster.worker.lark_text import LarkVocab

ReasoningMode = Literal["none", "may_open", "opened"]
THINKING_SWITCHES = ("enable_thinking", "thinking")
"""Chat-template variables that switch thinking (mlx-lm passes ``enable_thinking`` under the template's name)."""


@dataclass(frozen=True)
class ThinkMarkers:
    """A model's think block markers, as text and as token ids."""

    start: str
    end: str
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]


def think_markers(tokenizer: Any) -> ThinkMarkers | None:
    """The model's think markers (mlx-lm's), or None when it does not think."""
    if not getattr(tokenizer, "has_thinking", False):
        return None
    return ThinkMarkers(
        start=tokenizer.think_start,
        end=tokenizer.think_end,
        start_ids=tuple(tokenizer.think_start_tokens),
        end_ids=tuple(tokenizer.think_end_tokens),
    )


def thinking_off(request: InferenceRequest) -> bool:
    """Whether the request switched thinking off (``reasoning.enabled`` false, or the template's switch)."""
    if request.reasoning is not None and request.reasoning.enabled is False:
        return True
    kwargs = request.chat_template_kwargs or {}
    return any(kwargs.get(switch) is False for switch in THINKING_SWITCHES)


def _rfind(tokens: Sequence[int], sequence: Sequence[int]) -> int:
    size = len(sequence)
    if not size:
        return -1
    first = sequence[0]
    for at in range(len(tokens) - size, -1, -1):
        if tokens[at] == first and list(tokens[at : at + size]) == list(sequence):
            return at
    return -1


def prompt_opened(markers: ThinkMarkers, prompt: Sequence[int]) -> bool:
    """Whether the prompt's tokens end inside a think block (its last think-start comes after its last think-end)."""
    return _rfind(prompt, markers.start_ids) > _rfind(prompt, markers.end_ids)


def reasoning_mode(markers: ThinkMarkers | None, request: InferenceRequest, prompt: Sequence[int]) -> ReasoningMode:
    """How the output of ``request`` (whose prompt tokens are ``prompt``) starts; see the module's docstring."""
    if markers is None or request.messages is None:
        return "none"
    if prompt_opened(markers, prompt):
        return "opened"
    return "none" if thinking_off(request) else "may_open"


def reasoning_rule(markers: ThinkMarkers, vocab: LarkVocab) -> str:
    """The rule ``reasoning``: a think block's content and its end marker. Where the marker is one special
    token, any token but it and the end of sequence (nothing else is masked); else free text up to it."""
    end = vocab.special_id(markers.end)
    if end is None:
        return vocab.text_then("reasoning", markers.end)
    excluded = ",".join(str(i) for i in sorted({*vocab.eos_ids, end}))
    return f"reasoning: <[^{excluded}]>* <[{end}]>\n"


def with_reasoning(answer_rules: str, mode: ReasoningMode, markers: ThinkMarkers | None, vocab: LarkVocab) -> str:
    """The whole output's Lark grammar: the rules defining ``answer``, after the reasoning ``mode`` allows."""
    if mode == "none" or markers is None:
        return "start: answer\n" + answer_rules
    reasoning = reasoning_rule(markers, vocab)
    if mode == "opened":
        return "start: reasoning answer\n" + reasoning + answer_rules
    return f"start: ({vocab.literal(markers.start)} reasoning)? answer\n" + reasoning + answer_rules
