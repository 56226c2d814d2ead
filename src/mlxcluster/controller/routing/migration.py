"""Mid-stream migration: what a started stream has produced so far, and the request that continues it.

When a stream's worker is lost after the first token (offline in the registry, silent past the stall
timeout, frames lost on the bus, a retryable error), the dispatcher sends the prompt again to another
worker with what was said so far: ``InferenceRequest.said``, in order, the reasoning text, the content text
and the complete tool calls relayed (``continuation`` keeps the content text alone, for workers that predate
``said``); the new worker continues the assistant's message after it. The client sees one stream:
:class:`StreamSoFar` keeps what was said and the tokens relayed (reasoning ones too), builds the continuing
request (remaining ``max_tokens``, the seeded random stream advanced past the draws already made) and
rewrites the final ``Done`` so usage counts the prompt once and every generated token once. Design and
limits: docs/ARCHITECTURE.md, "Mid-stream migration".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from mlxcluster.api import RequestMigrated
from mlxcluster.protocol import Done, Error, InferenceRequest, SaidPart, Token, ToolCall, Usage

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


SaidKind = Literal["reasoning", "content", "tool_call"]


class _Said:
    """One piece of what was said: a run of reasoning or content text (its pieces, joined when a move needs
    them), or a complete tool call."""

    __slots__ = ("kind", "pieces", "call")

    def __init__(self, kind: SaidKind, pieces: list[str] | None = None, call: ToolCall | None = None) -> None:
        self.kind = kind
        self.pieces = pieces or []
        self.call = call

    def part(self) -> SaidPart:
        if self.call is not None:
            return SaidPart(kind="tool_call", call=self.call)
        return SaidPart(kind=self.kind, text="".join(self.pieces))


def merged(parts: list[SaidPart]) -> list[SaidPart]:
    """``parts`` with consecutive texts of one kind joined into one part."""
    out: list[SaidPart] = []
    for part in parts:
        last = out[-1] if out else None
        if last is not None and part.kind == last.kind and part.kind != "tool_call":
            out[-1] = SaidPart(kind=part.kind, text=last.text + part.text)
        else:
            out.append(part)
    return out


@dataclass
class StreamSoFar:
    """What one request has streamed to its client, across all the workers that served it."""

    request: InferenceRequest
    said: list[_Said] = field(default_factory=list)
    """What was relayed, in order: runs of reasoning or content text, and complete tool calls."""
    tokens: int = 0
    """Tokens relayed (the sum of ``Token.count``, as the generating workers counted them), reasoning too."""
    reasoning_tokens: int = 0
    """Of those, the tokens of frames that carried only reasoning (a frame that crosses the think-end marker
    counts as content: the worker's own count, in ``Usage.reasoning_tokens``, is exact)."""
    tokens_before_segment: int = 0
    """Tokens relayed by earlier workers (the current worker's usage does not include them)."""
    reasoning_before_segment: int = 0
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
            count = frame.count or 1
            self.tokens += count
            if frame.reasoning:
                self._say("reasoning", frame.reasoning)
                if not frame.text and not frame.tool_calls:
                    self.reasoning_tokens += count
            if frame.text:
                self._say("content", frame.text)
            if frame.tool_calls:
                self.said.extend(_Said("tool_call", call=call) for call in frame.tool_calls)
            if frame.tool_call_deltas or self.open_calls:
                self.open_calls.update(d.id for d in frame.tool_call_deltas or [] if d.name)
                self.open_calls.difference_update(c.id for c in frame.tool_calls or [])
            return frame
        if isinstance(frame, Done) and self.continued:
            usage = frame.usage
            completion = self.tokens_before_segment + usage.completion_tokens
            whole = msgspec.structs.replace(
                usage,
                completion_tokens=completion,
                total_tokens=usage.prompt_tokens + completion,
                reasoning_tokens=self.reasoning_before_segment + usage.reasoning_tokens,
            )
            return msgspec.structs.replace(frame, usage=whole)
        return frame

    def _say(self, kind: SaidKind, text: str) -> None:
        said = self.said
        if said and said[-1].kind == kind:
            said[-1].pieces.append(text)
        else:
            said.append(_Said(kind, [text]))

    @property
    def text(self) -> str:
        """The content text relayed (no reasoning, no tool calls)."""
        return "".join(piece for run in self.said if run.kind == "content" for piece in run.pieces)

    @property
    def exhausted(self) -> bool:
        """The whole ``max_tokens`` budget was streamed before the worker was lost."""
        return self.tokens >= self.request.max_tokens

    def continuation(self) -> InferenceRequest:
        """The request that continues the stream on another worker (call once per move)."""
        self.continued = True
        self.tokens_before_segment = self.tokens
        self.reasoning_before_segment = self.reasoning_tokens
        request = self.request
        sampling = request.sampling
        if request.seed is not None:  # the same seed, past the draws the lost worker(s) made
            sampling = msgspec.structs.replace(sampling, seed_offset=sampling.seed_offset + self.tokens)
        return msgspec.structs.replace(
            request,
            continuation=(request.continuation or "") + self.text,
            said=merged([*(request.said or []), *(run.part() for run in self.said)]),
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
            usage=Usage(
                completion_tokens=self.tokens, total_tokens=self.tokens, reasoning_tokens=self.reasoning_tokens
            ),
        )


def unmovable(lost: LostMidStream, why: str) -> Error:
    """The frame ending a stream that could not move: the loss, and why it could not continue."""
    return Error(code=lost.error.code, message=f"{lost.error.message}; {why}", retryable=False)
