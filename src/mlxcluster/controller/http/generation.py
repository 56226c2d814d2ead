"""One generation as every API answers it: dispatch, the first frame, and the frames collected.

The OpenAI, Responses and Anthropic routes share this (the WebSocket shares the readiness check and
the worker errors); a stream's frames then go through :func:`mlxcluster.controller.http.render.relay`.
A stream's HTTP status is decided by its first frame: if no worker produced one, the client gets a
proper 4xx/5xx error instead of a 200 stream that fails at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.protocol import Done, Error, InferenceRequest, Token, TokenLogprob, ToolCall, Usage

FrameIter = AsyncIterator[Token | Done | Error]


def worker_error(frame: Error) -> ApiError:
    """A worker's Error frame as the HTTP error the client sees: the request's own fault is a 400 whose
    ``param`` names the field the worker blamed (``Error.param``: ``reasoning_effort``, ``logit_bias``...)."""
    if frame.code == "deadline_exceeded":
        return ApiError(504, "The request timed out on the worker", type="server_error", code="timeout")
    if frame.code == "context_length_exceeded":
        return ApiError(400, frame.message, param=frame.param or "messages", code="context_length_exceeded")
    if frame.code == "model_load_failed":
        return ApiError(503, frame.message, type="server_error", code="model_load_failed")
    if frame.code == "invalid_request":
        return ApiError(400, frame.message, param=frame.param, code="invalid_request")
    return ApiError(502, f"Worker error ({frame.code}): {frame.message}", type="server_error", code=frame.code)


def check_ready(ctx: ControllerContext) -> None:
    """The not-ready 503 while the controller starts or drains (``Retry-After`` where there are headers)."""
    if not ctx.lifecycle.accepting:
        raise ApiError(
            503,
            f"The controller is {ctx.lifecycle.state}; try again shortly",
            type="server_error",
            code="not_ready",
            retry_after=1,
        )


def check_chat_model(ctx: ControllerContext, model: str) -> None:
    """An embedding model (its catalogue entry says so) is refused before dispatch, so it is never loaded for a
    request it cannot serve: a 400 naming ``model``."""
    entry = ctx.registry.catalogue_entry(model)
    if entry is not None and entry.kind == "embedding":
        raise ApiError(
            400,
            f"'{model}' is an embedding model: it does not chat or complete text; use /v1/embeddings",
            param="model",
            code="model_not_chat",
        )


def client_gone(request: web.Request) -> Callable[[], bool]:
    """Whether the client of ``request`` has disconnected (a stream it no longer reads is not migrated)."""

    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


@dataclass
class Generated:
    """Everything a non-streamed answer needs."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)
    stop_sequence: str | None = None

    @property
    def shows_text(self) -> bool:
        """Whether the answer has a text part: always, but beside tool calls only text that is not all
        whitespace (OpenAI's ``content`` is then null; no message item, no text block)."""
        return not self.tool_calls or bool(self.text.strip())

    def add(self, token: Token) -> None:
        self.text += token.text
        self.reasoning += token.reasoning
        self.tool_calls.extend(token.tool_calls or [])
        self.logprobs.extend(token.logprobs or [])


@contextlib.asynccontextmanager
async def generation(
    request: web.Request, inference: InferenceRequest
) -> AsyncIterator[tuple[Token | Done, FrameIter]]:
    """Dispatch ``inference``; yields its first frame (raising the HTTP error if it failed) and the rest."""
    ctx: ControllerContext = request.app[CONTROLLER]
    check_ready(ctx)
    check_chat_model(ctx, inference.model)
    async with contextlib.aclosing(ctx.dispatcher.stream(inference, disconnected=client_gone(request))) as frames:
        first = await anext(frames, None)
        if first is None:
            raise ApiError(502, "The worker ended the stream without a result", type="server_error")
        if isinstance(first, Error):
            raise worker_error(first)
        yield first, frames


async def collect(first: Token | Done, frames: FrameIter) -> Generated:
    """All frames of a stream gathered; a worker error becomes the HTTP error."""
    result = Generated()
    frame: Token | Done | Error | None = first
    while frame is not None:
        match frame:
            case Token():
                result.add(frame)
            case Done():
                result.finish_reason = frame.finish_reason
                result.usage = frame.usage
                result.stop_sequence = frame.stop_sequence
                return result
            case Error():
                raise worker_error(frame)
        frame = await anext(frames, None)
    raise ApiError(502, "The worker ended the stream without a result", type="server_error")
