"""Output processing of one request: generated tokens → text → Token / Progress / Done frames.

Runs on the generation thread, one :class:`JobOutput` per request: the streaming detokenizer, the stop
strings (held back until resolved, never leaked), the request's features (reasoning, tool calls, logprobs
shaped into frames), the count of reasoning tokens, and the silence guard: while the features hold text
back (a tool call is parsed whole), a ``Progress(generated=n)`` frame goes out as soon as a call is held
from the first token, and otherwise after :data:`HELD_PROGRESS_S` of silence, so the controller's
first-token and stall timers measure silence, not a long tool call.
"""

from __future__ import annotations

from typing import Any

from mlxcluster.protocol import Done, Progress, Timings, Usage
from mlxcluster.worker.reasoning import ThinkTracker

HELD_PROGRESS_S = 1.0
"""Longest silence towards the controller while generated text is held back."""


class JobOutput:
    """Turns one request's generated tokens into frames.

    :param detokenizer: a fresh streaming detokenizer (already fed the tokens of a continuation).
    :param stop_filter: the request's :class:`~mlxcluster.worker.sampling.StopTextFilter`.
    :param features: the request's :class:`~mlxcluster.worker.features.RequestFeatures`.
    :param think: counts reasoning tokens (None: the model has no think markers).
    :param prompt_tokens: prompt tokens for usage (a continuation's tokens excluded).
    :param held_progress_s: the longest silence while output is held back (:data:`HELD_PROGRESS_S`).
    """

    def __init__(
        self,
        *,
        detokenizer: Any,
        stop_filter: Any,
        features: Any,
        think: ThinkTracker | None,
        prompt_tokens: int,
        submitted: float,
        held_progress_s: float = HELD_PROGRESS_S,
    ) -> None:
        self.detokenizer = detokenizer
        self.stop_filter = stop_filter
        self.features = features
        self.think = think
        self.prompt_tokens = prompt_tokens
        self.submitted = submitted
        self.held_progress_s = held_progress_s
        self.reply: list[str] = []
        self.content: list[str] = []
        """The content sent (reasoning and tool-call markup apart): what the next turn resends."""
        self.completion_tokens = 0
        self.first_token = 0.0
        self.unreported = 0
        self.cached_tokens = 0
        """Prompt tokens reused from the prompt cache (set at admission)."""
        self.admitted = 0.0
        """When the request entered the batch (``perf_counter``; set at admission)."""
        self._last_frame = 0.0

    def on_token(self, token: int, finish_reason: str | None, now: float, logprobs: Any = None) -> list[Any]:
        """The frames for one generated token; a Done (or nothing more) ends the request."""
        self.completion_tokens += 1
        if self.completion_tokens == 1:
            self.first_token = now
        if self.think is not None:
            self.think.add(token)
        detokenizer = self.detokenizer
        if finish_reason == "stop":  # an end-of-sequence token: never shown
            detokenizer.finalize()
        else:
            detokenizer.add_token(token)
            if finish_reason is not None:
                detokenizer.finalize()
        text, hit_stop = self.stop_filter.feed(detokenizer.last_segment)
        if finish_reason is not None and not hit_stop:
            text += self.stop_filter.flush()
        self.unreported += 1
        if text:
            self.reply.append(text)
        self.features.on_token(None if finish_reason == "stop" else token, logprobs)
        ended = hit_stop or finish_reason is not None
        frames: list[Any] = []
        frame = self.features.frame(text, self.unreported, final=ended)
        if frame is not None:
            if frame.text:
                self.content.append(frame.text)
            frames.append(frame)
            self.unreported = 0
            self._last_frame = now
        elif not ended and self._silent_too_long(now):
            frames.append(Progress(generated=self.completion_tokens))
            self._last_frame = now
        if not ended:
            return frames
        done = self.done("stop" if hit_stop or finish_reason == "stop" else "length", now)
        if hit_stop:
            done.stop_sequence = self.stop_filter.matched
        frames.append(done)
        return frames

    def _silent_too_long(self, now: float) -> bool:
        """Whether held-back output calls for a Progress frame: at once when a tool call starts being held
        (the first generated token is then known to the controller), else after :data:`HELD_PROGRESS_S`."""
        if not self._last_frame:
            self._last_frame = self.first_token
            return bool(getattr(self.features, "holding", False))
        return now - self._last_frame >= self.held_progress_s

    @property
    def reply_text(self) -> str:
        return "".join(self.reply)

    @property
    def content_text(self) -> str:
        return "".join(self.content)

    def done(self, reason: str, now: float) -> Done:
        """The Done frame (usage and timings) of a request ending now with ``reason``."""
        prompt_tokens, completion = self.prompt_tokens, self.completion_tokens
        decode_s = now - self.first_token
        rate = (completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0
        return Done(
            finish_reason=reason,  # type: ignore[arg-type]
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
                cached_tokens=min(self.cached_tokens, prompt_tokens),
                reasoning_tokens=self.think.spent if self.think is not None else 0,
            ),
            timings=Timings(
                queue_ms=round(max(0.0, self.admitted - self.submitted) * 1000, 3),
                ttft_ms=round((self.first_token - self.submitted) * 1000, 3),
                total_ms=round((now - self.submitted) * 1000, 3),
                tokens_per_second=round(rate, 3),
            ),
        )
