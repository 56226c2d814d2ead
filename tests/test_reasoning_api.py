"""The controller's side of reasoning models (issue 19), through the real clients and a fake worker.

A fake worker (real NATS, a real registration) records the wire request each API builds and answers with
scripted frames: reasoning parameters and template variables of every API, the default ``max_tokens``,
``logit_bias`` keys, a worker's refusal naming the field, ``reasoning_tokens`` in usage, the text beside tool
calls (streamed and not), and the first-token timer fed by ``Progress(generated)`` while a call is held.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import msgspec
import openai
import pytest
from cluster_harness import Cluster, FakeWorker, RunningController, sse_events, wait_until, with_sections
from nats.aio.msg import Msg

from mlxcluster.api import MetricsEvent, RequestFinished
from mlxcluster.config import Config, StaticWorker
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import (
    Accepted,
    Done,
    Error,
    Frame,
    InferenceRequest,
    Progress,
    ReasoningParams,
    Token,
    ToolCall,
    Usage,
)

CAP = 1000
USER = [{"role": "user", "content": "hi"}]
CALL = ToolCall(id="call_1", name="weather", arguments='{"city": "Paris"}')
TOOL = {"name": "weather", "description": "Weather", "parameters": {"type": "object"}}
CHAT_TOOLS = [{"type": "function", "function": TOOL}]
RESPONSES_TOOLS = [{"type": "function", **TOOL}]
ANTHROPIC_TOOLS = [{"name": "weather", "description": "Weather", "input_schema": {"type": "object"}}]

Script = Callable[[InferenceRequest], list[Frame]]


def numbered(*frames: Frame) -> list[Frame]:
    """``frames`` with the Tokens numbered as a worker's stream writer numbers them."""
    seq = 0
    out: list[Frame] = []
    for frame in frames:
        if isinstance(frame, Token):
            frame = msgspec.structs.replace(frame, seq=seq)
            seq += 1
        out.append(frame)
    return out


def said_ok(_request: InferenceRequest) -> list[Frame]:
    return numbered(Token(text="ok"), Done(usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)))


class Scripted:
    """A fake worker's handler: Accepted, then the frames ``script`` makes of the request."""

    def __init__(self) -> None:
        self.script: Script = said_ok

    async def __call__(self, fake: FakeWorker, request: InferenceRequest, msg: Msg) -> None:
        await fake.send(msg, Accepted(worker_id=fake.id))
        for frame in self.script(request):
            await fake.send(msg, frame)


class Setup:
    def __init__(self, controller: RunningController, fake: FakeWorker, handler: Scripted) -> None:
        self.controller = controller
        self.fake = fake
        self.handler = handler
        self.openai = controller.client()
        self.anthropic = anthropic.AsyncAnthropic(base_url=controller.url, api_key="none", max_retries=0)

    def last(self) -> InferenceRequest:
        return self.fake.received[-1]

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.controller.session().post(self.controller.url + path, json=body) as response:
            return response.status, await response.json()

    async def events(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        """A streamed request's SSE payloads (without ``[DONE]``)."""
        async with self.controller.session().post(self.controller.url + path, json={**body, "stream": True}) as r:
            assert r.status == 200, await r.text()
            return [json.loads(e) async for e in sse_events(r) if e != "[DONE]"]


@pytest.fixture
async def setup(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Setup]:
    config = with_sections(cluster_config, controller={"default_max_tokens": CAP})
    async with Cluster(config) as cluster:
        handler = Scripted()
        fake = await cluster.start_fake("w-fake", handler)
        controller = await cluster.start_controller()
        await controller.wait_online("w-fake")
        running = Setup(controller, fake, handler)
        yield running
        await running.anthropic.close()


# --- what each API sends ------------------------------------------------------------------------------


async def test_reasoning_parameters_of_every_api_reach_the_worker(setup: Setup) -> None:
    kwargs = {"enable_thinking": False, "custom": [1, 2]}
    await setup.openai.chat.completions.create(
        model="echo", messages=USER, reasoning_effort="low", extra_body={"chat_template_kwargs": kwargs}
    )
    request = setup.last()
    assert request.reasoning == ReasoningParams(enabled=True, effort="low", param="reasoning_effort")
    assert request.chat_template_kwargs == kwargs
    await setup.openai.chat.completions.create(model="echo", messages=USER, reasoning_effort="minimal")
    assert setup.last().reasoning == ReasoningParams(enabled=False, effort="minimal", param="reasoning_effort")
    await setup.openai.chat.completions.create(model="echo", messages=USER)
    assert setup.last().reasoning is None and setup.last().chat_template_kwargs is None

    await setup.openai.responses.create(
        model="echo",
        input="hi",
        reasoning={"effort": "none", "summary": "auto"},
        extra_body={"chat_template_kwargs": kwargs},
    )
    request = setup.last()
    assert request.reasoning == ReasoningParams(enabled=False, effort="none", param="reasoning.effort")
    assert request.chat_template_kwargs == kwargs
    await setup.openai.responses.create(model="echo", input="hi", reasoning={"effort": "high"})
    assert setup.last().reasoning == ReasoningParams(enabled=True, effort="high", param="reasoning.effort")

    await setup.anthropic.messages.create(
        model="echo",
        max_tokens=200,
        messages=USER,  # type: ignore[arg-type]
        thinking={"type": "enabled", "budget_tokens": 150},
        extra_body={"chat_template_kwargs": kwargs},
    )
    request = setup.last()
    assert request.reasoning == ReasoningParams(enabled=True, budget_tokens=150, param="thinking")
    assert request.chat_template_kwargs == kwargs
    await setup.anthropic.messages.create(
        model="echo",
        max_tokens=20,
        messages=USER,
        thinking={"type": "disabled"},  # type: ignore[arg-type]
    )
    assert setup.last().reasoning == ReasoningParams(enabled=False, param="thinking")


async def test_the_default_max_tokens_is_the_room_left_up_to_the_cap(setup: Setup) -> None:
    await setup.openai.chat.completions.create(model="echo", messages=USER)
    assert (setup.last().max_tokens, setup.last().max_tokens_auto) == (CAP, True)
    await setup.openai.chat.completions.create(model="echo", messages=USER, max_completion_tokens=7)
    assert (setup.last().max_tokens, setup.last().max_tokens_auto) == (7, False)
    await setup.openai.completions.create(model="echo", prompt="hi")
    assert (setup.last().max_tokens, setup.last().max_tokens_auto) == (16, False)  # OpenAI's default there
    await setup.openai.responses.create(model="echo", input="hi")
    assert (setup.last().max_tokens, setup.last().max_tokens_auto) == (CAP, True)
    await setup.openai.responses.create(model="echo", input="hi", max_output_tokens=9)
    assert (setup.last().max_tokens, setup.last().max_tokens_auto) == (9, False)
    await setup.anthropic.messages.create(model="echo", max_tokens=11, messages=USER)  # type: ignore[arg-type]
    assert (setup.last().max_tokens, setup.last().max_tokens_auto) == (11, False)


async def test_logit_bias_keys_are_token_ids(setup: Setup) -> None:
    await setup.openai.chat.completions.create(
        model="echo", messages=USER, logit_bias={"0": -100, "49151": 5.5, "007": 1}
    )
    assert setup.last().sampling.logit_bias == {0: -100, 49151: 5.5, 7: 1}
    sent = len(setup.fake.received)
    for bias in ({"\u00b2": 1}, {"-1": 1}, {"1e3": 1}, {" 5": 1}, {"": 1}, {"1000000000": 1}, {"9" * 5000: 1}):
        status, body = await setup.post("/v1/chat/completions", {"model": "echo", "messages": USER, "logit_bias": bias})
        assert (status, body["error"]["param"]) == (400, "logit_bias"), (bias, body)
    for value in (100.5, -101):
        status, body = await setup.post(
            "/v1/chat/completions", {"model": "echo", "messages": USER, "logit_bias": {"5": value}}
        )
        assert (status, body["error"]["param"]) == (400, "logit_bias"), body
    assert len(setup.fake.received) == sent  # refused before any worker saw them


REFUSED = [
    ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "extreme"}, "reasoning_effort"),
    (
        "/v1/chat/completions",
        {"messages": USER, "chat_template_kwargs": "enable_thinking=False"},
        "chat_template_kwargs",
    ),
    ("/v1/responses", {"input": "hi", "reasoning": {"effort": "maximal"}}, "reasoning.effort"),
    ("/v1/responses", {"input": "hi", "reasoning": {"effort": "low", "summary": "concise"}}, "reasoning.summary"),
    ("/v1/responses", {"input": "hi", "reasoning": {"summary": "detailed"}}, "reasoning.summary"),
    ("/v1/responses", {"input": "hi", "reasoning": {"generate_summary": "concise"}}, "reasoning.generate_summary"),
    ("/v1/responses", {"input": "hi", "reasoning": {"summary": "long"}}, "reasoning.summary"),
    ("/v1/responses", {"input": "hi", "reasoning": {"effort": "low", "budget": 5}}, "reasoning.budget"),
    ("/v1/responses", {"input": "hi", "chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ("/v1/messages", {"max_tokens": 8, "messages": USER, "thinking": {"type": "adaptive"}}, "thinking.type"),
    ("/v1/messages", {"max_tokens": 8, "messages": USER, "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    (
        "/v1/messages",
        {"max_tokens": 100, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 100}},
        "thinking.budget_tokens",
    ),
    (
        "/v1/messages",
        {"max_tokens": 100, "messages": USER, "thinking": {"type": "disabled", "budget_tokens": 10}},
        "thinking.budget_tokens",
    ),
    ("/v1/messages", {"max_tokens": 8, "messages": USER, "chat_template_kwargs": 3}, "chat_template_kwargs"),
]


async def test_reasoning_values_we_cannot_honour_are_400s_naming_the_field(setup: Setup) -> None:
    for path, body, param in REFUSED:
        status, answer = await setup.post(path, {"model": "echo", **body})
        error = answer["error"]
        assert (status, error["param"]) == (400, param), (body, answer)
        if path == "/v1/messages":
            assert answer["type"] == "error" and error["type"] == "invalid_request_error"
    assert not setup.fake.received


async def test_a_worker_refusal_names_the_field_in_every_api(setup: Setup) -> None:
    """The worker knows whether the template can think: its refusal's ``param`` reaches each API's error."""

    def no_thinking(request: InferenceRequest) -> list[Frame]:
        assert request.reasoning is not None
        message = "this model's chat template has no thinking"
        return [Error(code="invalid_request", message=message, param=request.reasoning.param)]

    setup.handler.script = no_thinking
    with pytest.raises(openai.BadRequestError) as chat:
        await setup.openai.chat.completions.create(model="echo", messages=USER, reasoning_effort="high")
    assert chat.value.body["param"] == "reasoning_effort" and "no thinking" in chat.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as responses:
        await setup.openai.responses.create(model="echo", input="hi", reasoning={"effort": "low"}, stream=True)
    assert responses.value.body["param"] == "reasoning.effort"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as messages:
        await setup.anthropic.messages.create(
            model="echo",
            max_tokens=64,
            messages=USER,
            thinking={"type": "enabled", "budget_tokens": 32},  # type: ignore[arg-type]
        )
    body = messages.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["param"] == "thinking"


# --- what the answers show ---------------------------------------------------------------------------


def thought(_request: InferenceRequest) -> list[Frame]:
    usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7, reasoning_tokens=3)
    return numbered(Token(text="", reasoning="let me think", count=3), Token(text="ok"), Done(usage=usage))


async def test_reasoning_tokens_are_in_the_usage(setup: Setup) -> None:
    setup.handler.script = thought
    chat = await setup.openai.chat.completions.create(model="echo", messages=USER)
    assert chat.usage is not None and chat.usage.completion_tokens_details is not None
    assert chat.usage.completion_tokens_details.reasoning_tokens == 3
    chunks = await setup.openai.chat.completions.create(
        model="echo", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    usages = [chunk.usage async for chunk in chunks if chunk.usage is not None]
    assert [u.completion_tokens_details.reasoning_tokens for u in usages if u.completion_tokens_details] == [3]
    response = await setup.openai.responses.create(model="echo", input="hi")
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 3
    assert response.output[0].type == "reasoning" and response.output_text == "ok"


def beside_call(before: str, after: str = "\n") -> Script:
    """Text ``before`` a complete tool call and ``after`` it, as a model writes them."""

    def script(_request: InferenceRequest) -> list[Frame]:
        return numbered(
            Token(text="", reasoning="plan"),
            Token(text=before),
            Token(text="", tool_calls=[CALL]),
            Token(text=after),
            Done(usage=Usage(prompt_tokens=1, completion_tokens=4, total_tokens=5)),
        )

    return script


async def test_whitespace_beside_tool_calls_is_no_content(setup: Setup) -> None:
    setup.handler.script = beside_call("\n\n")
    chat_body = {"model": "echo", "messages": USER, "tools": CHAT_TOOLS}
    status, chat = await setup.post("/v1/chat/completions", chat_body)
    message = chat["choices"][0]["message"]
    assert status == 200 and message["content"] is None and len(message["tool_calls"]) == 1
    assert chat["choices"][0]["finish_reason"] == "tool_calls"
    deltas = [c["choices"][0]["delta"] for c in await setup.events("/v1/chat/completions", chat_body) if c["choices"]]
    assert not any(d.get("content") for d in deltas), deltas
    assert [d["reasoning_content"] for d in deltas if "reasoning_content" in d] == ["plan"]

    responses_body = {"model": "echo", "input": "hi", "tools": RESPONSES_TOOLS}
    status, response = await setup.post("/v1/responses", responses_body)
    assert [item["type"] for item in response["output"]] == ["reasoning", "function_call"]
    events = await setup.events("/v1/responses", responses_body)
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "function_call"]
    assert [i["type"] for i in events[-1]["response"]["output"]] == ["reasoning", "function_call"]

    messages_body = {"model": "echo", "max_tokens": 64, "messages": USER, "tools": ANTHROPIC_TOOLS}
    status, message = await setup.post("/v1/messages", messages_body)
    assert [block["type"] for block in message["content"]] == ["thinking", "tool_use"]
    assert message["stop_reason"] == "tool_use"
    events = await setup.events("/v1/messages", messages_body)
    blocks = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert blocks == ["thinking", "tool_use"]


async def test_text_beside_tool_calls_is_kept_whole_and_not_delayed(setup: Setup) -> None:
    setup.handler.script = beside_call("\nSure.", after=" ")
    chat_body = {"model": "echo", "messages": USER, "tools": CHAT_TOOLS}
    status, chat = await setup.post("/v1/chat/completions", chat_body)
    assert chat["choices"][0]["message"]["content"] == "\nSure. "
    deltas = [c["choices"][0]["delta"] for c in await setup.events("/v1/chat/completions", chat_body) if c["choices"]]
    assert [d["content"] for d in deltas if d.get("content")] == ["\nSure."]  # the space after the call: beside it
    client = setup.anthropic
    message = await client.messages.create(model="echo", max_tokens=64, messages=USER, tools=ANTHROPIC_TOOLS)  # type: ignore[arg-type]
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]

    def whitespace_only(_request: InferenceRequest) -> list[Frame]:  # no call: whitespace is the answer
        return numbered(Token(text="\n"), Done(usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)))

    setup.handler.script = whitespace_only
    status, chat = await setup.post("/v1/chat/completions", chat_body)
    assert chat["choices"][0]["message"]["content"] == "\n"
    deltas = [c["choices"][0]["delta"] for c in await setup.events("/v1/chat/completions", chat_body) if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "\n"


# --- the first token while a tool call is held --------------------------------------------------------------

TIMEOUT_S = 0.5


def record_finished(controller: RunningController) -> list[RequestFinished]:
    finished: list[RequestFinished] = []
    dispatcher = controller.ctx.dispatcher
    sink = dispatcher.events

    def keep(event: MetricsEvent) -> None:
        if isinstance(event, RequestFinished):
            finished.append(event)
        sink(event)

    dispatcher.events = keep
    return finished


def held_call(progress: int, *, before: str = "") -> Callable[[FakeWorker, InferenceRequest, Msg], Any]:
    """A worker whose parser holds a long tool call: ``progress`` Progress(generated) frames a fifth of the
    first-token timeout apart, then the call (after ``before`` text, if any)."""

    async def handler(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
        await fake.send(msg, Accepted(worker_id=fake.id))
        seq = 0
        if before:
            await fake.send(msg, Token(text=before, seq=seq))
            seq += 1
        for generated in range(1, progress + 1):
            await fake.send(msg, Progress(generated=generated))
            await asyncio.sleep(TIMEOUT_S / 5)
        await fake.send(msg, Token(text="", tool_calls=[CALL], count=progress, seq=seq))
        usage = Usage(prompt_tokens=1, completion_tokens=progress + seq, total_tokens=progress + seq + 1)
        await fake.send(msg, Done(usage=usage, seq=seq + 1))

    return handler


async def test_a_call_held_past_three_first_token_timeouts_completes_and_ttft_is_its_first_token(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    config = with_sections(cluster_config, controller={"first_token_timeout_s": TIMEOUT_S})
    async with Cluster(config) as cluster:
        await cluster.start_fake("w-slow", held_call(16))  # 16 × timeout/5: past 3 × the timeout
        controller = await cluster.start_controller()
        await controller.wait_online("w-slow")
        finished = record_finished(controller)
        client = controller.client()
        chat = await client.chat.completions.create(model="echo", messages=USER, tools=CHAT_TOOLS)  # type: ignore[arg-type]
        assert chat.choices[0].finish_reason == "tool_calls" and chat.choices[0].message.content is None
        await wait_until(lambda: finished)
        (event,) = finished
        assert event.status == "ok" and event.attempts == 1 and event.ttft_s is not None
        assert event.duration_s - event.ttft_s >= 3 * TIMEOUT_S  # the first Progress, not the call, is the first token
        async with controller.session().get(controller.url + "/api/cluster/requests") as resp:
            (record,) = (await resp.json())["recent"]
        assert record["ttft_ms"] == pytest.approx(event.ttft_s * 1000, abs=0.01)


async def test_a_worker_given_up_on_before_its_first_token_marks_no_ttft(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    """Tokens a worker held and never delivered are not the answer: the TTFT is the next worker's."""

    async def progress_then_silence(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
        await fake.send(msg, Accepted(worker_id=fake.id))
        await fake.send(msg, Progress(generated=1))

    static = [StaticWorker(name="w-silent", priority=20)]
    config = with_sections(cluster_config, controller={"first_token_timeout_s": TIMEOUT_S}, workers={"static": static})
    async with Cluster(config) as cluster:
        await cluster.start_fake("w-silent", progress_then_silence)
        await cluster.start_fake("w-ok", held_call(1))
        controller = await cluster.start_controller()
        await controller.wait_online("w-silent", "w-ok")
        finished = record_finished(controller)
        chat = await controller.client().chat.completions.create(model="echo", messages=USER, tools=CHAT_TOOLS)  # type: ignore[arg-type]
        assert chat.choices[0].finish_reason == "tool_calls"
        await wait_until(lambda: finished)
        (event,) = finished
        assert (event.attempts, event.worker) == (2, "w-ok")
        assert event.ttft_s is not None and event.ttft_s >= TIMEOUT_S  # after the silent worker's timeout


async def test_progress_keeps_a_started_stream_from_counting_as_stalled(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    config = with_sections(cluster_config, controller={"stall_timeout_s": TIMEOUT_S})
    async with Cluster(config) as cluster:
        await cluster.start_fake("w-slow", held_call(16, before="Sure."))  # silent but for Progress past 3 × stall
        controller = await cluster.start_controller()
        await controller.wait_online("w-slow")
        body = {"model": "echo", "messages": USER, "tools": CHAT_TOOLS, "stream": True}
        async with controller.session().post(controller.url + "/v1/chat/completions", json=body) as resp:
            payloads = [json.loads(e) async for e in sse_events(resp) if e != "[DONE]"]
        assert not any("error" in p for p in payloads), payloads
        deltas = [p["choices"][0]["delta"] for p in payloads if p["choices"]]
        assert [d["content"] for d in deltas if d.get("content")] == ["Sure."]
        assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", []) if "id" in c] == ["weather"]
        assert controller.ctx.dispatcher.stats.migrations == 0
