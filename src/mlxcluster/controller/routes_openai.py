"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

A stream's HTTP status is decided by its first frame: if no worker produced one, the client gets a
proper 4xx/5xx JSON error instead of a 200 stream that fails at once.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mlxcluster.controller.context import CONTROLLER, ControllerContext
from mlxcluster.controller.errors import ApiError
from mlxcluster.controller.middleware import API_KEY, stream_headers
from mlxcluster.controller.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_to_inference,
    completion_to_inference,
    include_usage,
    openai_finish_reason,
    parse_body,
)
from mlxcluster.controller.responses import json_response
from mlxcluster.controller.sse import SseWriter
from mlxcluster.protocol import Done, Error, InferenceRequest, Token, Usage

routes = web.RouteTableDef()


def worker_error(frame: Error) -> ApiError:
    """A worker's Error frame as the HTTP error the client sees: the request's own fault is a 400."""
    if frame.code == "deadline_exceeded":
        return ApiError(504, "The request timed out on the worker", type="server_error", code="timeout")
    if frame.code == "context_length_exceeded":
        return ApiError(400, frame.message, param="messages", code="context_length_exceeded")
    if frame.code == "invalid_request":
        return ApiError(400, frame.message, code="invalid_request")
    return ApiError(502, f"Worker error ({frame.code}): {frame.message}", type="server_error", code=frame.code)


def client_gone(request: web.Request) -> Callable[[], bool]:
    """Whether the client of ``request`` has disconnected (a stream it no longer reads is not migrated)."""

    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


def usage_dict(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens the worker's prompt cache served."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass
class Renderer:
    """Builds the response objects of one endpoint (chat or text)."""

    chat: bool
    completion_id: str
    model: str
    created: int

    def _base(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.completion_id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, text: str | None, finish: str | None, *, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": text or ""}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}

    def chunk(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        return {**self._base(True), "choices": [self.choice(text, finish, chunk=True)]}

    def role_chunk(self) -> dict[str, Any]:
        return {
            **self._base(True),
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": usage_dict(usage)}

    def final(self, text: str, finish: str, usage: Usage) -> dict[str, Any]:
        return {**self._base(False), "choices": [self.choice(text, finish, chunk=False)], "usage": usage_dict(usage)}


async def complete(
    request: web.Request, inference: InferenceRequest, renderer: Renderer, *, usage_in_stream: bool
) -> web.StreamResponse:
    """Dispatch ``inference`` and answer with one JSON body or an SSE stream."""
    ctx: ControllerContext = request.app[CONTROLLER]
    if not ctx.lifecycle.accepting:
        raise ApiError(
            503,
            f"The controller is {ctx.lifecycle.state}; try again shortly",
            type="server_error",
            code="not_ready",
            retry_after=1,
        )
    async with contextlib.aclosing(ctx.dispatcher.stream(inference, disconnected=client_gone(request))) as frames:
        first = await anext(frames, None)
        if first is None:
            raise ApiError(502, "The worker ended the stream without a result", type="server_error")
        if isinstance(first, Error):
            raise worker_error(first)
        if inference.stream:
            return await _stream(request, renderer, first, frames, usage_in_stream)
        return await _collect(renderer, first, frames)


async def _collect(
    renderer: Renderer, first: Token | Done, frames: AsyncIterator[Token | Done | Error]
) -> web.Response:
    parts: list[str] = []
    frame: Token | Done | Error | None = first
    while frame is not None:
        match frame:
            case Token(text=text):
                parts.append(text)
            case Done():
                body = renderer.final("".join(parts), openai_finish_reason(frame.finish_reason), frame.usage)
                return json_response(body)
            case Error():
                raise worker_error(frame)
        frame = await anext(frames, None)
    raise ApiError(502, "The worker ended the stream without a result", type="server_error")


async def _stream(
    request: web.Request,
    renderer: Renderer,
    first: Token | Done,
    frames: AsyncIterator[Token | Done | Error],
    usage_in_stream: bool,
) -> web.StreamResponse:
    sse = await SseWriter.open(request, stream_headers(request))
    if renderer.chat:
        await sse.send(renderer.role_chunk())
    frame: Token | Done | Error | None = first
    while frame is not None:
        match frame:
            case Token(text=text):
                await sse.send(renderer.chunk(text))
            case Done():
                await sse.send(renderer.chunk(None if renderer.chat else "", openai_finish_reason(frame.finish_reason)))
                if usage_in_stream:
                    await sse.send(renderer.usage_chunk(frame.usage))
                break
            case Error():
                await sse.send(worker_error(frame).body())
                break
        try:
            frame = await anext(frames, None)
        except ApiError as exc:  # e.g. the request deadline passed mid-stream: headers are sent, say it in-band
            await sse.send(exc.body())
            break
    else:
        await sse.send(ApiError(502, "The stream ended without a result", type="server_error").body())
    await sse.done()
    return sse.response


def _deadline(ctx: ControllerContext) -> float:
    return time.time() + ctx.config.controller.request_timeout_s


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions, streamed (SSE) or not."""
    ctx: ControllerContext = request.app[CONTROLLER]
    body: ChatCompletionRequest = parse_body(await request.read(), ChatCompletionRequest)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    inference = chat_to_inference(body, completion_id, _deadline(ctx))
    renderer = Renderer(chat=True, completion_id=completion_id, model=body.model, created=int(time.time()))
    return await complete(request, inference, renderer, usage_in_stream=include_usage(body))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI (legacy) text completions."""
    ctx: ControllerContext = request.app[CONTROLLER]
    body: CompletionRequest = parse_body(await request.read(), CompletionRequest)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    inference = completion_to_inference(body, completion_id, _deadline(ctx))
    renderer = Renderer(chat=False, completion_id=completion_id, model=body.model, created=int(time.time()))
    return await complete(request, inference, renderer, usage_in_stream=include_usage(body))


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Every model some online worker serves, in OpenAI's list shape."""
    ctx: ControllerContext = request.app[CONTROLLER]
    key = request.get(API_KEY)  # a key limited to some models sees only those
    data = [
        {"id": model, "object": "model", "created": ctx.started_at, "owned_by": "mlxcluster"}
        for model in ctx.registry.models()
        if key is None or key.allows_model(model)
    ]
    return json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    ctx: ControllerContext = request.app[CONTROLLER]
    model = request.match_info["model"]
    key = request.get(API_KEY)
    if model not in ctx.registry.models() or (key is not None and not key.allows_model(model)):
        raise ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    return json_response({"id": model, "object": "model", "created": ctx.started_at, "owned_by": "mlxcluster"})
