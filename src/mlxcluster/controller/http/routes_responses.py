"""``POST /v1/responses``: OpenAI's Responses API over the same frames as chat completions (stateless).

Output items: ``reasoning`` (text inside the model's thinking markers), ``message`` (``output_text``)
and ``function_call``. A stream sends the official event sequence: ``response.created``,
``response.in_progress``, then per item ``response.output_item.added`` … deltas … ``.done``, then
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut it short).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.generation import Generated, collect, generation
from mlxcluster.controller.http.images import ImageRef, parked_images, resolve_images
from mlxcluster.controller.http.middleware import new_request_id, stream_headers
from mlxcluster.controller.http.openai_schema import parse_body
from mlxcluster.controller.http.render import StreamRenderer, may_call, relay
from mlxcluster.controller.http.responses import json_response
from mlxcluster.controller.http.responses_schema import ResponsesRequest, responses_to_inference
from mlxcluster.controller.http.sse import SseWriter
from mlxcluster.protocol import Done, Token, ToolCall, Usage

routes = web.RouteTableDef()


def _id(prefix: str) -> str:
    return f"{prefix}_{new_request_id()}"


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def function_call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


def _tool_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    return {"type": choice.type, "name": choice.name}


@dataclass
class ResponseShell:
    """The fields of a response object that do not depend on the output."""

    body: ResponsesRequest
    response_id: str = field(default_factory=lambda: _id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def build(self, status: str, output: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format if body.text and body.text.format else None
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": body.model,
            "output": output,
            "usage": usage_object(usage) if usage is not None else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": _tool_choice(body),
            "tools": [
                {
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    "strict": bool(t.strict),
                }
                for t in body.tools or []
            ],
            "text": {"format": {"type": fmt.type, **({"name": fmt.name, "schema": fmt.schema} if fmt.schema else {})}}
            if fmt
            else {"format": {"type": "text"}},
            "previous_response_id": None,
            "store": False,
            "metadata": {},
        }


def final_response(shell: ResponseShell, result: Generated) -> dict[str, Any]:
    output = []
    if result.reasoning:
        output.append(reasoning_item(_id("rs"), result.reasoning))
    if result.shows_text:
        output.append(message_item(_id("msg"), result.text))
    output.extend(function_call_item(_id("fc"), call) for call in result.tool_calls)
    status = "incomplete" if result.finish_reason == "length" else "completed"
    return shell.build(status, output, result.usage)


class ResponseStream(StreamRenderer):
    """A stream's pieces as the Responses event sequence; one open item (reasoning or message) at a time."""

    def __init__(self, sse: SseWriter, shell: ResponseShell) -> None:
        self.put_event = sse.put_event
        self.shell = shell
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open_kind: str | None = None
        self.open_id = ""
        self.open_text = ""
        self.open_call: tuple[int, str] = (0, "")
        """The tool call being streamed in pieces: its output index and item id."""

    def send(self, event: str, /, **data: Any) -> None:
        """One event of the stream; ``data`` may hold a ``name`` field (function calls have one)."""
        self.put_event(event, {"type": event, "sequence_number": self.seq, **data})
        self.seq += 1

    def start(self) -> None:
        response = self.shell.build("in_progress", [], None)
        self.send("response.created", response=response)
        self.send("response.in_progress", response=response)

    def _open(self, kind: str) -> None:
        if self.open_kind == kind:
            return
        self._close()
        self.open_kind, self.open_id, self.open_text = kind, _id("msg" if kind == "message" else "rs"), ""
        index = len(self.output)
        if kind == "message":
            self.send(
                "response.output_item.added", output_index=index, item=message_item(self.open_id, "", "in_progress")
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self.send(
                "response.content_part.added", item_id=self.open_id, output_index=index, content_index=0, part=part
            )
        else:
            self.send(
                "response.output_item.added", output_index=index, item=reasoning_item(self.open_id, "", "in_progress")
            )

    def _close(self) -> None:
        if self.open_kind is None:
            return
        index, text, item_id = len(self.output), self.open_text, self.open_id
        if self.open_kind == "message":
            self.send(
                "response.output_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            self.send("response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part)
            item = message_item(item_id, text)
        else:
            self.send("response.reasoning_text.done", item_id=item_id, output_index=index, content_index=0, text=text)
            item = reasoning_item(item_id, text)
        self.send("response.output_item.done", output_index=index, item=item)
        self.output.append(item)
        self.open_kind = None

    def token(self, frame: Token) -> None:
        if frame.reasoning:
            self._open("reasoning")
            self.open_text += frame.reasoning
            self.send(
                "response.reasoning_text.delta",
                item_id=self.open_id,
                output_index=len(self.output),
                content_index=0,
                delta=frame.reasoning,
            )
        if frame.text:
            self._open("message")
            self.open_text += frame.text
            self.send(
                "response.output_text.delta",
                item_id=self.open_id,
                output_index=len(self.output),
                content_index=0,
                delta=frame.text,
                logprobs=[],
            )

    def call_start(self, call_id: str, name: str, index: int) -> None:
        self._close()
        self.open_call = (len(self.output), _id("fc"))
        item = function_call_item(self.open_call[1], ToolCall(id=call_id, name=name), "in_progress")
        self.send("response.output_item.added", output_index=self.open_call[0], item=item)

    def call_arguments(self, arguments: str, index: int) -> None:
        output_index, item_id = self.open_call
        self.send("response.function_call_arguments.delta", item_id=item_id, output_index=output_index, delta=arguments)

    def call(self, call: ToolCall, index: int, streamed: bool) -> None:
        if streamed:  # only its end is left
            output_index, item_id = self.open_call
        else:
            self._close()
            output_index, item_id = len(self.output), _id("fc")
            item = function_call_item(item_id, call, "in_progress")
            self.send("response.output_item.added", output_index=output_index, item=item)
            self.send(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=output_index,
                delta=call.arguments,
            )
        self.send(
            "response.function_call_arguments.done",
            item_id=item_id,
            output_index=output_index,
            name=call.name,
            arguments=call.arguments,
        )
        item = function_call_item(item_id, call)
        self.send("response.output_item.done", output_index=output_index, item=item)
        self.output.append(item)

    def done(self, frame: Done, called: bool) -> None:
        if not self.output and self.open_kind is None:
            self._open("message")  # an empty answer is still one (empty) message
        self._close()
        status = "incomplete" if frame.finish_reason == "length" else "completed"
        self.send(f"response.{status}", response=self.shell.build(status, self.output, frame.usage))

    def error(self, exc: ApiError) -> None:
        self.send("error", code=exc.code, message=exc.message, param=exc.param)
        self.send(
            "response.failed",
            response={
                **self.shell.build("failed", self.output, None),
                "error": {"code": exc.code or "server_error", "message": exc.message},
            },
        )


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    """OpenAI Responses API, streamed (named SSE events) or not; stateless."""
    ctx: ControllerContext = request.app[CONTROLLER]
    body: ResponsesRequest = parse_body(await request.read(), ResponsesRequest)
    shell = ResponseShell(body)
    settings = ctx.config.controller
    deadline = time.time() + settings.request_timeout_s
    refs: list[ImageRef] = []
    inference = responses_to_inference(body, shell.response_id, deadline, settings.default_max_tokens, refs)
    if refs:
        inference.images = await resolve_images(ctx.registry, ctx.image_fetcher, body.model, refs)
    async with (
        parked_images(ctx.images, ctx.bus.max_payload, inference),
        generation(request, inference) as (first, frames),
    ):
        if not body.stream:
            return json_response(final_response(shell, await collect(first, frames)))
        sse = await SseWriter.open(request, stream_headers(request))
        stream = ResponseStream(sse, shell)
        stream.start()
        await relay(frames, stream, sse.flush, first, tools=may_call(inference))
        await sse.end()
        return sse.response
