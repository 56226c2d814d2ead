"""Multi-turn conversations for ``bench multiturn``: building them, and the arithmetic of what they measured.

A conversation is a long system prompt (about ``system_tokens`` tokens of the model's tokenizer) and a
few short user turns; every request resends the whole history, as OpenAI clients do. Conversations
differ from their first words on, so one conversation's cache never helps another's first turn.
No model and no network here: the benchmark drives these, and tests check them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from mlxcluster.bench.stats import percentile

USER_TURNS = [
    "Hello! Please introduce yourself in one sentence.",
    "What is the first rule you follow?",
    "Give me one tip for writing clear code.",
    "How do you handle a question you cannot answer?",
    "Summarise our conversation in a few words.",
    "Thank you. Anything else I should know?",
]

_TOPICS = [
    "the weather",
    "cooking",
    "gardening",
    "astronomy",
    "music",
    "history",
    "chess",
    "travel",
    "painting",
    "cycling",
    "poetry",
    "geology",
]


def system_prompt(index: int, target_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """A system prompt of at least ``target_tokens`` tokens, unique to conversation ``index`` from its
    first words (so no two conversations share more than the chat template's opening tokens)."""
    parts = [f"Session {index} (code {index * 7919 % 10007}). You are assistant number {index}."]
    rule = 0
    while count_tokens(" ".join(parts)) < target_tokens:
        rule += 1
        topic = _TOPICS[(rule + index) % len(_TOPICS)]
        parts.append(
            f"Rule {rule}: when the user asks about {topic}, answer briefly, politely and accurately, "
            f"and mention that rule {rule} applies."
        )
    return " ".join(parts)


@dataclass
class Conversation:
    """One conversation's history; :meth:`request_messages` is what the next turn sends."""

    index: int
    system: str
    messages: list[dict[str, str]] = field(default_factory=list)
    turns_done: int = 0

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = [{"role": "system", "content": self.system}]

    def request_messages(self) -> list[dict[str, str]]:
        """The whole history plus the next user turn (the turn is not recorded until :meth:`record`)."""
        user = USER_TURNS[self.turns_done % len(USER_TURNS)]
        return [*self.messages, {"role": "user", "content": user}]

    def record(self, reply: str) -> None:
        """The turn was answered: keep the user turn and the reply in the history."""
        self.messages = [*self.request_messages(), {"role": "assistant", "content": reply}]
        self.turns_done += 1


def build_conversations(
    count: int, system_tokens: int, count_tokens: Callable[[str], int], *, first: int = 0
) -> list[Conversation]:
    """``count`` conversations with distinct system prompts (numbered from ``first``)."""
    return [Conversation(i, system_prompt(i, system_tokens, count_tokens)) for i in range(first, first + count)]


def turn_major(conversations: list[Conversation], turns: int) -> list[list[Conversation]]:
    """Rounds of requests: every conversation's turn 1, then every conversation's turn 2, and so on."""
    return [list(conversations) for _ in range(turns)]


class TurnSample(msgspec.Struct):
    """One answered turn: its latency to the first token and its prompt / cached token counts."""

    conversation: int
    turn: int
    """1-based."""
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int
    worker: str = ""


class TurnSummary(msgspec.Struct):
    """Turn 1 against the later turns of the same conversations."""

    turn1_ttft_p50_ms: float
    later_ttft_p50_ms: float
    later_over_turn1: float
    """later-turn p50 TTFT / turn-1 p50 TTFT (lower is better)."""
    later_cached_fraction: float
    """Cached prompt tokens / prompt tokens, over the later turns."""
    later_prompt_tokens: int
    later_cached_tokens: int
    turn1_samples: int
    later_samples: int
    turn1_ttft_mean_ms: float = 0.0
    later_ttft_mean_ms: float = 0.0
    later_over_turn1_mean: float = 0.0
    """later-turn mean TTFT / turn-1 mean TTFT: unlike the p50s, every later turn that missed counts."""


def summarize(samples: list[TurnSample]) -> TurnSummary:
    """p50 TTFT of turn 1 and of later turns, their ratio, and the later turns' cached fraction."""
    first = [s for s in samples if s.turn == 1]
    later = [s for s in samples if s.turn > 1]
    first_p50 = percentile([s.ttft_ms for s in first], 50)
    later_p50 = percentile([s.ttft_ms for s in later], 50)
    first_mean = _mean([s.ttft_ms for s in first])
    later_mean = _mean([s.ttft_ms for s in later])
    prompt = sum(s.prompt_tokens for s in later)
    cached = sum(s.cached_tokens for s in later)
    return TurnSummary(
        turn1_ttft_p50_ms=round(first_p50, 1),
        later_ttft_p50_ms=round(later_p50, 1),
        later_over_turn1=round(later_p50 / first_p50, 3) if first_p50 else 0.0,
        later_cached_fraction=round(cached / prompt, 3) if prompt else 0.0,
        later_prompt_tokens=prompt,
        later_cached_tokens=cached,
        turn1_samples=len(first),
        later_samples=len(later),
        turn1_ttft_mean_ms=round(first_mean, 1),
        later_ttft_mean_ms=round(later_mean, 1),
        later_over_turn1_mean=round(later_mean / first_mean, 3) if first_mean else 0.0,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def gaps_ms(arrivals: list[float]) -> list[float]:
    """Milliseconds between consecutive arrival times (seconds)."""
    return [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:], strict=False)]
