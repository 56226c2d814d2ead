"""``POST /v1/messages``: Anthropic's Messages API over the same frames as chat completions.

Content blocks out: ``thinking`` (text inside the model's thinking markers), ``text`` and
``tool_use``. A stream sends ``message_start``, per block ``content_block_start`` / ``_delta`` /
``_stop``, then ``message_delta`` (stop_reason, usage) and ``message_stop``. Errors use Anthropic's
shape, ``{"type": "error", "error": {"type", "message"}}`` (the auth middleware's 401 stays OpenAI's).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from mlxcluster.controller.http.anthropic_schema import MessagesRequest, messages_to_inference
from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.generation import Generated, collect, generation
from mlxcluster.controller.http.images import ImageRef, parked_images, resolve_images
from mlxcluster.controller.http.middleware import new_request_id, stream_headers
from mlxcluster.controller.http.openai_schema import parse_body
from mlxcluster.controller.http.openai_tools import decode_tool_arguments
from mlxcluster.controller.http.render import StreamRenderer, may_call, relay
from mlxcluster.controller.http.responses import json_response
from mlxcluster.controller.http.sse import SseWriter
from mlxcluster.protocol import Done, Token, ToolCall, Usage

routes = web.RouteTableDef()

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(exc: ApiError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(exc.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message, "code": exc.code, "param": exc.param}}


def stop_reason(finish: str, tool_calls: bool, stop_sequence: str | None = None) -> str:
    if finish == "length":
        return "max_tokens"
    if stop_sequence is not None:
        return "stop_sequence"
    return "tool_use" if tool_calls else "end_turn"


def usage_object(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    arguments = decode_tool_arguments(call.arguments)
    return {
        "type": "tool_use",
        "id": call.id.replace("call_", "toolu_", 1),
        "name": call.name,
        "input": arguments if isinstance(arguments, dict) else {},
    }


def final_message(message_id: str, model: str, result: Generated) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if result.reasoning:
        content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
    if result.shows_text:
        content.append({"type": "text", "text": result.text})
    content.extend(tool_use_block(call) for call in result.tool_calls)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(result.finish_reason, bool(result.tool_calls), result.stop_sequence),
        "stop_sequence": result.stop_sequence,
        "usage": usage_object(result.usage),
    }


class MessageStream(StreamRenderer):
    """A stream's pieces as Anthropic stream events; one open block (thinking, text or tool_use) at a time."""

    def __init__(self, sse: SseWriter, message_id: str, model: str) -> None:
        self.put_event = sse.put_event
        self.message_id = message_id
        self.model = model
        self.index = 0
        self.open_kind: str | None = None

    def send(self, name: str, **data: Any) -> None:
        self.put_event(name, {"type": name, **data})

    def start(self, prompt_tokens: int = 0) -> None:
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
        }
        self.send("message_start", message=message)

    def _open(self, kind: str) -> None:
        if self.open_kind == kind:
            return
        self._close()
        block = (
            {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
        )
        self.send("content_block_start", index=self.index, content_block=block)
        self.open_kind = kind

    def _close(self) -> None:
        if self.open_kind is None:
            return
        if self.open_kind == "thinking":
            self.send("content_block_delta", index=self.index, delta={"type": "signature_delta", "signature": ""})
        self.send("content_block_stop", index=self.index)
        self.index += 1
        self.open_kind = None

    def token(self, frame: Token) -> None:
        if frame.reasoning:
            self._open("thinking")
            self.send(
                "content_block_delta", index=self.index, delta={"type": "thinking_delta", "thinking": frame.reasoning}
            )
        if frame.text:
            self._open("text")
            self.send("content_block_delta", index=self.index, delta={"type": "text_delta", "text": frame.text})

    def call_start(self, call_id: str, name: str, index: int) -> None:
        self._close()
        block = {**tool_use_block(ToolCall(id=call_id, name=name)), "input": {}}
        self.send("content_block_start", index=self.index, content_block=block)
        self.open_kind = "tool_use"

    def call_arguments(self, arguments: str, index: int) -> None:
        delta = {"type": "input_json_delta", "partial_json": arguments}
        self.send("content_block_delta", index=self.index, delta=delta)

    def call(self, call: ToolCall, index: int, streamed: bool) -> None:
        self._close()  # a streamed call's block: only its end is left
        if streamed:
            return
        self.send("content_block_start", index=self.index, content_block={**tool_use_block(call), "input": {}})
        self.call_arguments(call.arguments, index)
        self.send("content_block_stop", index=self.index)
        self.index += 1

    def done(self, frame: Done, called: bool) -> None:
        if self.index == 0 and self.open_kind is None:
            self._open("text")
        self._close()
        reason = stop_reason(frame.finish_reason, called, frame.stop_sequence)
        delta = {"stop_reason": reason, "stop_sequence": frame.stop_sequence}
        self.send("message_delta", delta=delta, usage=usage_object(frame.usage))
        self.send("message_stop")

    def error(self, exc: ApiError) -> None:
        self.put_event("error", error_body(exc))


@routes.post("/v1/messages")
async def create_message(request: web.Request) -> web.StreamResponse:
    """Anthropic Messages API, streamed (named SSE events) or not."""
    try:
        return await _create_message(request)
    except ApiError as exc:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
        return json_response(error_body(exc), status=exc.status, headers=headers)


async def _create_message(request: web.Request) -> web.StreamResponse:
    ctx: ControllerContext = request.app[CONTROLLER]
    body: MessagesRequest = parse_body(await request.read(), MessagesRequest)
    message_id = f"msg_{new_request_id()}"
    refs: list[ImageRef] = []
    inference = messages_to_inference(body, message_id, time.time() + ctx.config.controller.request_timeout_s, refs)
    if refs:
        inference.images = await resolve_images(ctx.registry, ctx.image_fetcher, body.model, refs)
    async with (
        parked_images(ctx.images, ctx.bus.max_payload, inference),
        generation(request, inference) as (first, frames),
    ):
        if not body.stream:
            return json_response(final_message(message_id, body.model, await collect(first, frames)))
        sse = await SseWriter.open(request, stream_headers(request))
        stream = MessageStream(sse, message_id, body.model)
        stream.start()
        await relay(frames, stream, sse.flush, first, tools=may_call(inference))
        await sse.end()
        return sse.response
