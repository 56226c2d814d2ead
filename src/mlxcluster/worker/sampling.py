"""Per-request sampling for the batched engine: samplers with their own random key, and stop-text filtering.

mlx-lm's samplers draw from MLX's global random state, which is why ``mlx_lm.server`` serves a
seeded request on its own, outside the batch. Here every sampling request owns a PRNG key that is
split once per token, so a seed fixes the draws of that request whatever else shares the batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler, make_logits_processors

from mlxcluster.protocol import SamplingParams


class KeyedSampler:
    """Temperature / top-p / top-k / min-p sampling drawing from a per-request PRNG key.

    Called by mlx-lm's ``GenerationBatch`` with the log-probabilities of one sequence (shape
    ``[1, vocab]``) once per generated token, in order; returns the sampled token id(s).
    """

    draftable = True
    """Speculative decoding may draft for it: :meth:`draws` replays the draws plain decoding would make."""

    def __init__(self, params: SamplingParams, seed: int | None, vocab_size: int) -> None:
        self.temperature = float(params.temperature)
        self.top_p = float(params.top_p)
        self.min_p = float(params.min_p)
        self.top_k = int(params.top_k) if 0 < params.top_k < vocab_size else 0
        self.seed = secrets.randbits(63) if seed is None else int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        self._key = mx.random.key(self.seed)
        for done in range(params.seed_offset):  # a continued request: skip the draws its first worker made
            self._key = mx.random.split(self._key)[0]
            if done % 256 == 255:
                mx.eval(self._key)

    def __call__(self, logprobs: mx.array) -> mx.array:
        keys = mx.random.split(self._key)
        self._key = keys[0]
        return self._draw(logprobs, keys[1])

    def _draw(self, logprobs: mx.array, key: mx.array) -> mx.array:
        if 0.0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=key)

    def draws(self, logprobs: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        """Draws for the tokens after the next one (``logprobs``: one row per position, in order), each with
        the key plain decoding would draw that token with, and the key after each; the sampler's own key does
        not move until :meth:`commit` is given the one after the last token kept (speculative decoding)."""
        key, tokens, states = self._key, [], []
        for position in range(logprobs.shape[0]):
            keys = mx.random.split(key)
            key = keys[0]
            tokens.append(self._draw(logprobs[position : position + 1], keys[1]))
            states.append(key)
        return tokens, states

    def commit(self, key: mx.array) -> None:
        """Go on from ``key`` (one of :meth:`draws`' states: the tokens up to it were kept)."""
        self._key = key


def make_request_sampler(params: SamplingParams, seed: int | None, vocab_size: int) -> Callable[[Any], Any]:
    """The shared greedy sampler for ``temperature == 0`` (lets the batch sample in one call), else a keyed one."""
    if params.temperature <= 0.0:
        return greedy_sampler
    return KeyedSampler(params, seed, vocab_size)


class RequestProcessors(list[Callable[[Any, Any], Any]]):
    """A request's logits processors, remembering the parameters they were made from: a worker group's
    followers rebuild them, which they can only do when ``replayable`` (the repetition penalty alone)."""

    repetition_penalty: float = 1.0
    replayable: bool = True


def make_request_processors(params: SamplingParams) -> RequestProcessors:
    """Logits processors for the request: repetition penalty (when not 1), presence / frequency penalties
    (when not 0; over the last 20 tokens, as mlx-lm does) and the logit bias."""
    penalty = params.repetition_penalty
    repetition = None if penalty is None or penalty == 1.0 or penalty <= 0.0 else penalty
    presence = params.presence_penalty or None
    frequency = params.frequency_penalty or None
    processors = RequestProcessors()
    if repetition is None and presence is None and frequency is None and not params.logit_bias:
        return processors
    processors.extend(
        make_logits_processors(
            logit_bias=params.logit_bias or None,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
        )
    )
    processors.repetition_penalty = float(repetition or 1.0)
    processors.replayable = presence is None and frequency is None and not params.logit_bias
    return processors


def validate_sampling(params: SamplingParams, max_tokens: int) -> str | None:
    """A message describing the first invalid parameter, or None."""
    if max_tokens < 1:
        return f"max_tokens must be at least 1 (got {max_tokens})"
    if params.temperature < 0:
        return f"temperature must be >= 0 (got {params.temperature})"
    if not 0.0 <= params.top_p <= 1.0:
        return f"top_p must be in [0, 1] (got {params.top_p})"
    if not 0.0 <= params.min_p <= 1.0:
        return f"min_p must be in [0, 1] (got {params.min_p})"
    if params.top_k < 0:
        return f"top_k must be >= 0 (got {params.top_k})"
    if params.repetition_penalty < 0:
        return f"repetition_penalty must be >= 0 (got {params.repetition_penalty})"
    return None


class StopTextFilter:
    """Streams text while hiding stop strings: any tail that could start a stop string is held back.

    :meth:`feed` returns ``(text_to_emit, stopped)``; once stopped, the text before the earliest stop
    string has been returned and everything after it is dropped. :meth:`flush` releases the held tail
    when the stream ends for another reason.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the text (the earliest in it; the first listed on a tie)."""

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        found = [(at, order) for order, at in enumerate(buffer.find(s) for s in self.stops) if at >= 0]
        if found:
            cut, order = min(found)
            self._held = ""
            self.stopped = True
            self.matched = self.stops[order]
            return buffer[:cut], True
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
