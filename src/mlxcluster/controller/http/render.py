"""A stream's frames, rendered: the one loop every streamed API shares, over one renderer per API.

The dispatcher's frames (Tokens, then Done or Error, after retries and migration) go through
:func:`relay`, which hands a :class:`StreamRenderer` API-neutral pieces: each Token's text, reasoning
and logprobs; its tool calls taken apart into a streamed call's head and argument pieces and each
complete call (numbered in the order they started, marked when its pieces went first); the end
(``Done``: finish reason, usage with the cached prompt tokens, stop sequence, and whether the model
called a tool); and any failure as the :class:`ApiError` it means (a worker's Error, a mid-stream
deadline, a stream that ended without a result). Renderers are synchronous and buffer what they make;
the loop flushes once per frame, so a frame costs one write whatever the API makes of it.

Where the model may call tools, content that is only whitespace at the start of a run of text (the
``"\n"`` a model writes before its call) is held back until real text follows (then it goes with that
text, which is not delayed) or the stream ends without a call: beside a call it is never shown, as OpenAI
gives ``null`` content there (no content delta, no message item, no text block).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.generation import FrameIter, worker_error
from mlxcluster.protocol import Done, InferenceRequest, Token, ToolCall


class StreamRenderer(Protocol):
    """One API's shape of a stream; each method buffers its output until the loop flushes it.

    Renderers subclass it: a renderer that sends no tool calls apart (the WebSocket's) keeps the do-nothing
    ``call_*`` methods.
    """

    def token(self, frame: Token) -> None:
        """Every Token frame: its ``text``, ``reasoning`` and ``logprobs`` (its tool calls come apart)."""

    def call_start(self, call_id: str, name: str, index: int) -> None:
        """A call streamed in pieces begins; ``index`` counts the calls of the stream from 0."""
        return None

    def call_arguments(self, arguments: str, index: int) -> None:
        """A piece of the arguments of the streamed call ``index`` (the one open)."""
        return None

    def call(self, call: ToolCall, index: int, streamed: bool) -> None:
        """A complete call; ``streamed``: its head and arguments went before (only its end is left)."""
        return None

    def done(self, frame: Done, called: bool) -> None:
        """The end: finish reason, usage, stop sequence; ``called``: the model called a tool."""

    def error(self, exc: ApiError) -> None:
        """The stream failed after it started: say it in-band (the status line is sent)."""


class _Calls:
    """The stream's tool calls so far: how many started, and the one being streamed in pieces."""

    __slots__ = ("count", "open_id", "open_index")

    def __init__(self) -> None:
        self.count = 0
        self.open_id: str | None = None
        self.open_index = 0

    def render(self, frame: Token, renderer: StreamRenderer) -> None:
        """The calls of one Token frame, in order: heads and pieces, then the complete calls."""
        ended: list[str] = []
        for piece in frame.tool_call_deltas or ():
            if piece.name:
                if self.open_id is not None:  # coalesced frames: the open call's end is in this one too
                    for call in frame.tool_calls or ():
                        if call.id == self.open_id:
                            renderer.call(call, self.open_index, True)
                            ended.append(call.id)
                            break
                self.open_id, self.open_index = piece.id, self.count
                self.count += 1
                renderer.call_start(piece.id, piece.name, self.open_index)
            if piece.arguments and piece.id == self.open_id:
                renderer.call_arguments(piece.arguments, self.open_index)
        for call in frame.tool_calls or ():
            if call.id == self.open_id:
                self.open_id = None
                renderer.call(call, self.open_index, True)
            elif call.id not in ended:
                renderer.call(call, self.count, False)
                self.count += 1


class _HeldSpace:
    """Whitespace-only content at the start of a run of text (the stream's start, or after a call), held
    while it may be the space before a tool call."""

    __slots__ = ("text", "in_text")

    def __init__(self) -> None:
        self.text = ""
        self.in_text = False
        """Real text was shown since the last call: whitespace now is part of it."""

    def pass_on(self, frame: Token) -> Token | None:
        """The frame to render (its text with the held whitespace before it), or None when all it had was
        whitespace, now held."""
        if self.in_text:
            return frame
        if frame.text.isspace() and not frame.logprobs:
            self.text += frame.text
            if frame.reasoning or frame.tool_calls or frame.tool_call_deltas:
                return msgspec.structs.replace(frame, text="")
            return None
        self.in_text = True
        if self.text:
            frame, self.text = msgspec.structs.replace(frame, text=self.text + frame.text), ""
        return frame

    def release(self, renderer: StreamRenderer, called: bool) -> None:
        """The stream ends: whitespace still held is shown, unless it was beside a call."""
        if self.text and not called:
            renderer.token(Token(text=self.text))
        self.text = ""


def may_call(request: InferenceRequest) -> bool:
    """Whether the model may call a tool in answer to ``request`` (whitespace before a call is then held)."""
    return bool(request.tools) and request.tool_choice != "none"


async def relay(
    frames: FrameIter,
    renderer: StreamRenderer,
    flush: Callable[[], Awaitable[None]],
    first: Token | Done | None = None,
    *,
    tools: bool = False,
) -> None:
    """Render ``first`` (when the route already took it) and the rest of ``frames`` until the stream ends.

    Every stream ends in :meth:`StreamRenderer.done` or :meth:`StreamRenderer.error`, flushed. ``tools``:
    the model may call one (:func:`may_call`), so whitespace that may precede a call is held.
    """
    calls = _Calls()
    held = _HeldSpace() if tools else None
    try:
        frame = first if first is not None else await anext(frames, None)
        while frame is not None:
            if isinstance(frame, Token):
                shown: Token | None = frame
                if held is not None and frame.text:
                    shown = held.pass_on(frame)
                if shown is not None:
                    renderer.token(shown)
                    if shown.tool_call_deltas or shown.tool_calls:
                        calls.render(shown, renderer)
                        if held is not None:
                            held.in_text = False
                    await flush()
                frame = await anext(frames, None)
                continue
            if held is not None:
                held.release(renderer, calls.count > 0)
            if isinstance(frame, Done):
                renderer.done(frame, calls.count > 0)
            else:
                renderer.error(worker_error(frame))
            await flush()
            return
        failure = ApiError(502, "The stream ended without a result", type="server_error")
    except ApiError as exc:  # no worker at all (a stream that had no first frame), or the deadline mid-stream
        failure = exc
    if held is not None:
        held.release(renderer, calls.count > 0)
    renderer.error(failure)
    await flush()
