"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions`` (``/v1/models``: :mod:`.routes_models`).

A stream's HTTP status is decided by its first frame: if no worker produced one, the client gets a
proper 4xx/5xx JSON error instead of a 200 stream that fails at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.generation import Generated, collect, generation
from mlxcluster.controller.http.images import ImageRef, parked_images, resolve_images
from mlxcluster.controller.http.middleware import new_request_id, stream_headers
from mlxcluster.controller.http.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_to_inference,
    completion_to_inference,
    include_usage,
    openai_finish_reason,
    parse_body,
)
from mlxcluster.controller.http.render import StreamRenderer, may_call, relay
from mlxcluster.controller.http.responses import json_response
from mlxcluster.controller.http.sse import SseWriter
from mlxcluster.protocol import Done, InferenceRequest, Token, TokenLogprob, ToolCall, Usage

routes = web.RouteTableDef()


def usage_dict(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object, with the prompt tokens the worker's prompt cache served and the completion
    tokens spent thinking (and, for a request with images, the prompt tokens that stand for them)."""
    prompt_details: dict[str, int] = {"cached_tokens": usage.cached_tokens}
    if usage.image_tokens:
        prompt_details["image_tokens"] = usage.image_tokens
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top],
            }
            for e in entries
        ]
    }


def text_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Legacy completions' ``logprobs``: parallel lists of tokens, logprobs, top alternatives, offsets."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


@dataclass
class Renderer:
    """Builds the response objects of one endpoint (chat or text): the JSON answer, or a stream's chunks."""

    chat: bool
    completion_id: str
    model: str
    created: int
    logprobs: bool = False
    text_offset: int = 0

    def _base(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.completion_id, "object": kind, "created": self.created, "model": self.model}

    def logprob_body(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries or [])
        body = text_logprobs(entries or [], self.text_offset)
        self.text_offset += sum(len(e.token) for e in entries or [])
        return body

    def text_chunk(self, token: Token) -> dict[str, Any]:
        choice = {"index": 0, "text": token.text, "logprobs": self.logprob_body(token.logprobs), "finish_reason": None}
        return {**self._base(True), "choices": [choice]}

    def delta(self, delta: dict[str, Any], logprobs: Any, finish: str | None = None) -> dict[str, Any]:
        return {
            **self._base(True),
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    def call_head(self, call_id: str, name: str, index: int) -> dict[str, Any]:
        head = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return self.delta({"tool_calls": [head]}, None)

    def call_arguments(self, arguments: str, index: int) -> dict[str, Any]:
        return self.delta({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}, None)

    def finish_chunk(self, reason: str, called: bool) -> dict[str, Any]:
        finish = openai_finish_reason(reason, called)
        if not self.chat:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
            return {**self._base(True), "choices": [choice]}
        return self.delta({}, None, finish)

    def role_chunk(self) -> dict[str, Any]:
        return self.delta({"role": "assistant", "content": ""}, None)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": usage_dict(usage)}

    def final(self, result: Generated) -> dict[str, Any]:
        finish = openai_finish_reason(result.finish_reason, bool(result.tool_calls))
        logprobs = self.logprob_body(result.logprobs)
        if not self.chat:
            choice = {"index": 0, "text": result.text, "logprobs": logprobs, "finish_reason": finish}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": result.text if result.shows_text else None}
            if result.tool_calls:
                message["tool_calls"] = [tool_call_dict(call) for call in result.tool_calls]
            if result.reasoning:
                message["reasoning_content"] = result.reasoning
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        return {**self._base(False), "choices": [choice], "usage": usage_dict(result.usage)}


class ChunkStream(StreamRenderer):
    """A stream's pieces as OpenAI chunks: text (with reasoning and logprobs), then on chat the tool calls,
    a streamed call's head and argument pieces as they come, a call sent whole in two pieces (head, arguments).
    Text completions have no tools: a chunk per Token frame."""

    def __init__(self, renderer: Renderer, sse: SseWriter, include_usage: bool) -> None:
        self.renderer = renderer
        self.chat = renderer.chat
        self.put = sse.put
        self.include_usage = include_usage

    def token(self, frame: Token) -> None:
        renderer = self.renderer
        if not self.chat:
            self.put(renderer.text_chunk(frame))
            return
        delta: dict[str, Any] = {}
        if frame.text:
            delta["content"] = frame.text
        if frame.reasoning:
            delta["reasoning_content"] = frame.reasoning
        if delta or frame.logprobs:
            self.put(renderer.delta(delta, renderer.logprob_body(frame.logprobs)))

    def call_start(self, call_id: str, name: str, index: int) -> None:
        if self.chat:
            self.put(self.renderer.call_head(call_id, name, index))

    def call_arguments(self, arguments: str, index: int) -> None:
        if self.chat:
            self.put(self.renderer.call_arguments(arguments, index))

    def call(self, call: ToolCall, index: int, streamed: bool) -> None:
        if self.chat and not streamed:
            self.put(self.renderer.call_head(call.id, call.name, index))
            self.put(self.renderer.call_arguments(call.arguments, index))

    def done(self, frame: Done, called: bool) -> None:
        self.put(self.renderer.finish_chunk(frame.finish_reason, called and self.chat))
        if self.include_usage:
            self.put(self.renderer.usage_chunk(frame.usage))

    def error(self, exc: ApiError) -> None:
        self.put(exc.body())


async def complete(
    request: web.Request, inference: InferenceRequest, renderer: Renderer, *, usage_in_stream: bool
) -> web.StreamResponse:
    """Dispatch ``inference`` and answer with one JSON body or an SSE stream."""
    async with generation(request, inference) as (first, frames):
        if not inference.stream:
            return json_response(renderer.final(await collect(first, frames)))
        sse = await SseWriter.open(request, stream_headers(request))
        if renderer.chat:
            sse.put(renderer.role_chunk())
        stream = ChunkStream(renderer, sse, usage_in_stream)
        await relay(frames, stream, sse.flush, first, tools=may_call(inference))
        await sse.done()
        return sse.response


def _deadline(ctx: ControllerContext) -> float:
    return time.time() + ctx.config.controller.request_timeout_s


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions, streamed (SSE) or not."""
    ctx: ControllerContext = request.app[CONTROLLER]
    body: ChatCompletionRequest = parse_body(await request.read(), ChatCompletionRequest)
    completion_id = f"chatcmpl-{new_request_id()}"
    refs: list[ImageRef] = []
    inference = chat_to_inference(
        body, completion_id, _deadline(ctx), ctx.config.controller.default_max_tokens, images=refs
    )
    if refs:
        inference.images = await resolve_images(ctx.registry, ctx.image_fetcher, body.model, refs)
    renderer = Renderer(
        chat=True, completion_id=completion_id, model=body.model, created=int(time.time()), logprobs=inference.logprobs
    )
    async with parked_images(ctx.images, ctx.bus.max_payload, inference):
        return await complete(request, inference, renderer, usage_in_stream=include_usage(body))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI (legacy) text completions."""
    ctx: ControllerContext = request.app[CONTROLLER]
    body: CompletionRequest = parse_body(await request.read(), CompletionRequest)
    completion_id = f"cmpl-{new_request_id()}"
    inference = completion_to_inference(body, completion_id, _deadline(ctx))
    renderer = Renderer(
        chat=False, completion_id=completion_id, model=body.model, created=int(time.time()), logprobs=inference.logprobs
    )
    return await complete(request, inference, renderer, usage_in_stream=include_usage(body))
