"""Mid-stream migration: what a started stream has produced so far, and the request that continues it.

When a stream's worker is lost after the first token (offline in the registry, silent past the stall
timeout, frames lost on the bus, a retryable error), the dispatcher sends the prompt again to another
worker with the text relayed so far as ``InferenceRequest.continuation``: the new worker continues the
assistant's message after it. The client sees one stream: :class:`StreamSoFar` keeps the text and token
count relayed, builds the continuing request (remaining ``max_tokens``, the seeded random stream advanced
past the draws already made) and rewrites the final ``Done`` so usage counts the prompt once and every
generated token once. Design and limits: docs/ARCHITECTURE.md, "Mid-stream migration".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from mlxcluster.api import RequestMigrated
from mlxcluster.protocol import Done, Error, InferenceRequest, Token, Usage

LossReason = Literal["offline", "stalled", "frames_lost", "worker_error"]
"""Why a started stream was given up on its worker (the ``reason`` of :class:`RequestMigrated` events)."""


class LostMidStream(Exception):
    """A started stream's worker can no longer finish it; the stream may continue elsewhere."""

    def __init__(self, worker_id: str, reason: LossReason, error: Error) -> None:
        super().__init__(error.message)
        self.worker_id = worker_id
        self.reason = reason
        self.error = error
        """The frame the client gets if the stream cannot move (code ``worker_lost``, ``frames_lost``...)."""


@dataclass
class StreamSoFar:
    """What one request has streamed to its client, across all the workers that served it."""

    request: InferenceRequest
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    """Tokens relayed (the sum of ``Token.count``, as the generating workers counted them)."""
    tokens_before_segment: int = 0
    """Tokens relayed by earlier workers (the current worker's usage does not include them)."""
    moves: int = 0
    """Moves to another worker that succeeded (the continuation started there)."""
    continued: bool = False
    lost: set[str] = field(default_factory=set)
    """Workers that lost this stream: never tried again for it."""
    attempts: int = 0
    """Workers sent this request so far (first tries, retries and continuations)."""
    last_frame_at: float = field(default_factory=time.monotonic)
    loss: LostMidStream | None = None
    """The latest loss (the one being moved away from)."""
    open_calls: set[str] = field(default_factory=set)
    """Tool calls whose head was relayed in pieces but not yet their end: a stream lost inside one cannot
    move (the continuation carries text only; another worker would start the call again)."""

    def relayed(self, frame: Token | Done | Error) -> Token | Done | Error:
        """Account for a frame about to reach the client; a continuation's Done gets the whole stream's usage."""
        self.last_frame_at = time.monotonic()
        if frame.__class__ is Token:
            self.parts.append(frame.text)
            self.tokens += frame.count or 1
            if frame.tool_call_deltas or self.open_calls:
                self.open_calls.update(d.id for d in frame.tool_call_deltas or [] if d.name)
                self.open_calls.difference_update(c.id for c in frame.tool_calls or [])
            return frame
        if isinstance(frame, Done) and self.continued:
            usage = frame.usage
            completion = self.tokens_before_segment + usage.completion_tokens
            whole = msgspec.structs.replace(
                usage, completion_tokens=completion, total_tokens=usage.prompt_tokens + completion
            )
            return msgspec.structs.replace(frame, usage=whole)
        return frame

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def exhausted(self) -> bool:
        """The whole ``max_tokens`` budget was streamed before the worker was lost."""
        return self.tokens >= self.request.max_tokens

    def continuation(self) -> InferenceRequest:
        """The request that continues the stream on another worker (call once per move)."""
        self.continued = True
        self.tokens_before_segment = self.tokens
        request = self.request
        sampling = request.sampling
        if request.seed is not None:  # the same seed, past the draws the lost worker(s) made
            sampling = msgspec.structs.replace(sampling, seed_offset=sampling.seed_offset + self.tokens)
        return msgspec.structs.replace(
            request,
            continuation=(request.continuation or "") + self.text,
            max_tokens=request.max_tokens - self.tokens,
            sampling=sampling,
        )

    def ending(self, lost: LostMidStream, limit: int, *, client_gone: bool) -> Done | Error | None:
        """The frame that ends the stream ``lost`` interrupted when it cannot move, or ``None`` (move it)."""
        if self.exhausted:  # lost between the budget's last token and its Done: nothing left to generate
            return self.length_done()
        if self.moves >= limit:
            return unmovable(lost, f"not moved: migration limit ({limit}) reached") if limit else lost.error
        if client_gone:
            return unmovable(lost, "not moved: the client has gone")
        if self.open_calls:
            return unmovable(lost, "not moved: lost inside a tool call being streamed")
        return None

    def moved_to(self, worker_id: str) -> RequestMigrated:
        """Count the move that just started on ``worker_id`` (its first frame came); its metrics event."""
        assert self.loss is not None, "moved without a loss"
        self.moves += 1
        request, lost = self.request, self.loss
        return RequestMigrated(
            time=time.time(),
            request_id=request.request_id,
            model=request.model,
            worker=lost.worker_id,
            to_worker=worker_id,
            migration=self.moves,
            reason=lost.reason,
            tokens=self.tokens,
            gap_s=time.monotonic() - self.last_frame_at,
        )

    def length_done(self) -> Done:
        """The end of a stream whose worker was lost after the last token of its budget, before its Done."""
        return Done(
            finish_reason="length",
            usage=Usage(completion_tokens=self.tokens, total_tokens=self.tokens),
        )


def unmovable(lost: LostMidStream, why: str) -> Error:
    """The frame ending a stream that could not move: the loss, and why it could not continue."""
    return Error(code=lost.error.code, message=f"{lost.error.message}; {why}", retryable=False)
