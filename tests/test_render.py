"""The one stream loop (``controller/http/render.py``) over the worker's real output shaping, no model.

Two parallel tool calls streamed in pieces, as the worker's :class:`OutputShaper` makes them, reach a
renderer the same way whether each piece has its own frame or a slow consumer got them coalesced into
one frame (the worker's own :func:`merge_tokens`). On the wire, the official ``anthropic`` and ``openai``
clients read the Anthropic and Responses streams of the coalesced frames back as exactly two calls.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mlx_lm.tool_parsers import json_tools

from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.render import relay
from mlxcluster.controller.http.responses_schema import ResponsesRequest
from mlxcluster.controller.http.routes_anthropic import MessageStream
from mlxcluster.controller.http.routes_responses import ResponseShell, ResponseStream
from mlxcluster.controller.http.sse import SseWriter
from mlxcluster.protocol import Done, Error, Token, ToolCall, Usage
from mlxcluster.worker.output import OutputShaper, merge_tokens
from mlxcluster.worker.tool_formats import JsonToolsFormat

TOOLS = JsonToolsFormat("<tool_call>", "</tool_call>", json_tools.parse_tool_call, native=True)
TWO_CALLS = (
    'On it. <tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    '<tool_call>\n{"name": "time", "arguments": {"zone": "CET", "h24": true}}\n</tool_call>'
)
ARGUMENTS = [{"city": "Paris"}, {"zone": "CET", "h24": True}]


def shaped(text: str, size: int = 3) -> list[Token]:
    """The worker's frames for ``text`` generated ``size`` characters at a time, calls streamed in pieces."""
    shaper = OutputShaper(tools=TOOLS, stream_calls=True)
    frames = [shaper.frame(text[i : i + size], 1, final=False) for i in range(0, len(text), size)]
    frames.append(shaper.frame("", 0, final=True))
    return [f for f in frames if f is not None]


async def frames_of(frames: list[Token | Done | Error]) -> AsyncIterator[Token | Done | Error]:
    for frame in frames:
        yield frame


class Pieces:
    """A renderer that writes down the pieces it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def token(self, frame: Token) -> None:
        if frame.text:
            self.seen.append(("text", frame.text))

    def call_start(self, call_id: str, name: str, index: int) -> None:
        self.seen.append(("start", index, name))

    def call_arguments(self, arguments: str, index: int) -> None:
        self.seen.append(("arguments", index, arguments))

    def call(self, call: ToolCall, index: int, streamed: bool) -> None:
        self.seen.append(("call", index, call.name, streamed, call.arguments))

    def done(self, frame: Done, called: bool) -> None:
        self.seen.append(("done", frame.finish_reason, called))

    def error(self, exc: ApiError) -> None:
        self.seen.append(("error", exc.status, exc.code))

    async def flush(self) -> None:
        self.seen.append(("flush",))

    def joined(self) -> list[tuple[Any, ...]]:
        """The pieces with each call's argument pieces joined (coalescing joins them too) and no flushes."""
        out: list[tuple[Any, ...]] = []
        for piece in self.seen:
            if out and piece[0] in ("arguments", "text") and out[-1][:-1] == piece[:-1]:
                out[-1] = (*piece[:-1], out[-1][-1] + piece[-1])
            elif piece[0] != "flush":
                out.append(piece)
        return out


async def rendered(frames: list[Token | Done | Error]) -> Pieces:
    pieces = Pieces()
    await relay(frames_of(frames), pieces, pieces.flush)
    return pieces


async def test_coalesced_frames_give_a_renderer_the_same_calls_in_the_same_order() -> None:
    frames = shaped(TWO_CALLS)
    done = Done(finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=40, total_tokens=43))
    one_by_one = await rendered([*frames, done])
    coalesced = await rendered([merge_tokens(frames, 0), done])
    assert coalesced.seen.count(("flush",)) == 2  # one write per frame, whatever the frame holds
    calls = [p for p in one_by_one.joined() if p[0] != "text"]
    assert [p[:3] for p in calls] == [
        ("start", 0, "weather"),
        ("arguments", 0, json.dumps(ARGUMENTS[0])),
        ("call", 0, "weather"),
        ("start", 1, "time"),
        ("arguments", 1, json.dumps(ARGUMENTS[1])),
        ("call", 1, "time"),
        ("done", "stop", True),
    ]
    assert all(p[3] is True for p in calls if p[0] == "call")  # both were streamed: only their ends are left
    assert coalesced.joined() == one_by_one.joined()


async def test_a_stream_that_fails_or_stops_short_ends_in_one_error() -> None:
    text = [Token(text="Hel"), Token(text="lo")]
    failed = await rendered([*text, Error(code="deadline_exceeded", message="late")])
    assert failed.joined() == [("text", "Hello"), ("error", 504, "timeout")]
    cut = await rendered(text)  # the dispatcher's frames ended without Done or Error
    assert cut.joined() == [("text", "Hello"), ("error", 502, None)]
    whole = await rendered([Token(text="", tool_calls=[ToolCall(id="c1", name="f")]), Done(finish_reason="length")])
    assert whole.joined() == [("call", 0, "f", False, "{}"), ("done", "length", True)]


@pytest.fixture
async def coalesced_server() -> AsyncIterator[str]:
    """A bare aiohttp server whose Anthropic and Responses routes stream the two calls coalesced in one frame."""
    frames: list[Token | Done | Error] = [
        merge_tokens(shaped(TWO_CALLS), 0),
        Done(usage=Usage(prompt_tokens=5, completion_tokens=40, total_tokens=45, cached_tokens=2)),
    ]

    async def messages(request: web.Request) -> web.StreamResponse:
        sse = await SseWriter.open(request)
        stream = MessageStream(sse, "msg_1", "m")
        stream.start()
        await relay(frames_of(frames), stream, sse.flush)
        await sse.end()
        return sse.response

    async def responses(request: web.Request) -> web.StreamResponse:
        body = ResponsesRequest(model="m", input="hi", stream=True)
        sse = await SseWriter.open(request)
        stream = ResponseStream(sse, ResponseShell(body))
        stream.start()
        await relay(frames_of(frames), stream, sse.flush)
        await sse.end()
        return sse.response

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/responses", responses)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url(""))
    finally:
        await server.close()


async def test_anthropic_stream_of_coalesced_calls_reads_as_two_tool_uses(coalesced_server: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=coalesced_server, api_key="none", max_retries=0)
    async with client.messages.stream(model="m", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as stream:
        message = await stream.get_final_message()
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    uses = [block for block in message.content if block.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("weather", ARGUMENTS[0]), ("time", ARGUMENTS[1])]
    assert message.stop_reason == "tool_use" and message.usage.cache_read_input_tokens == 2


async def test_responses_stream_of_coalesced_calls_reads_as_two_function_calls(coalesced_server: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{coalesced_server}/v1", api_key="none", max_retries=0)
    async with client.responses.stream(model="m", input="hi") as stream:
        response = await stream.get_final_response()
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("weather", ARGUMENTS[0]), ("time", ARGUMENTS[1])]
    assert [item.type for item in response.output] == ["message", "function_call", "function_call"]
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens == 2
