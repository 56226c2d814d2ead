"""Agent features end to end with the real demo model and the real clients: structured output, tool calls,
logprobs (openai), the Responses API (openai), the Messages API (anthropic), langchain's structured output.

The enforced parts (JSON schemas, forced tool calls) run at temperature 1.0 on the 135M model: the
grammar, not the model, makes the output valid. One engine serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from cluster_harness import Cluster, RunningController, with_sections

from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.worker.engine import MlxEngine

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]  # slow on shared, loaded CPUs

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ANSWER = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "w", "description": "Weather in a city", "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine() -> Iterator[MlxEngine]:
    from mlxcluster.models.demo import ensure_demo_model
    from mlxcluster.models.registry import default_models_dir

    models_dir = Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir())
    engine = MlxEngine(str(ensure_demo_model(models_dir)), max_concurrent=4)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


@pytest.fixture
async def controller(
    cluster_config: Config, nats_server: EmbeddedNatsServer, engine: MlxEngine
) -> AsyncIterator[RunningController]:
    slow_cpu = with_sections(  # shared, loaded cores: the model's thread may delay heartbeats past 1 s
        cluster_config,
        controller={"first_token_timeout_s": 300.0},
        discovery={"heartbeat_interval_ms": 500, "offline_timeout_ms": 30_000},
    )
    async with Cluster(slow_cpu) as cluster:
        await cluster.start_worker("w1", engine=engine)
        running = await cluster.start_controller()
        await running.wait_online("w1")
        yield running


@pytest.fixture
def model(engine: MlxEngine) -> str:
    return engine.model_name


@pytest.fixture
def client(controller: RunningController) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{controller.port}/v1", api_key="none", max_retries=0)


# --- structured output -----------------------------------------------------------------------------


async def test_json_schema_output_validates_at_temperature_one(client: openai.AsyncOpenAI, model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    for seed in (1, 2):
        response = await client.chat.completions.create(
            model=model, messages=ASK, response_format=fmt, temperature=1.0, seed=seed, max_tokens=16
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), ANSWER)


async def test_json_object_output_is_an_object(client: openai.AsyncOpenAI, model: str) -> None:
    response = await client.chat.completions.create(
        model=model, messages=ASK, response_format={"type": "json_object"}, temperature=1.0, max_tokens=16
    )
    choice = response.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: says so, and what came is the start of an object
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


async def test_json_cut_by_max_tokens_is_length(client: openai.AsyncOpenAI, model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    response = await client.chat.completions.create(model=model, messages=ASK, response_format=fmt, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content.startswith("{")


async def test_invalid_schema_is_a_400_naming_it(client: openai.AsyncOpenAI, model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "if": {}}}}
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=ASK, response_format=fmt)
    assert info.value.body["param"] == "response_format.json_schema.schema"
    assert "if" in info.value.body["message"]


async def test_unsupported_parameter_is_a_400_naming_it(client: openai.AsyncOpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=ASK, audio={"voice": "alloy", "format": "wav"})
    assert info.value.body["param"] == "audio"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=ASK, n=2)
    assert info.value.body["param"] == "n"


# --- tool calls ------------------------------------------------------------------------------------


async def test_required_tool_call(client: openai.AsyncOpenAI, model: str) -> None:
    response = await client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # with parallel calls the grammar lets the model go on to a second call
        temperature=1.0,
        max_tokens=64,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "w" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


async def test_streamed_named_tool_call_and_history(client: openai.AsyncOpenAI, model: str) -> None:
    stream = await client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "w"}},
        parallel_tool_calls=False,
        max_tokens=64,
        stream=True,
    )
    names, arguments, ids, finish = [], "", set(), None
    async for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            if delta.id:
                ids.add(delta.id)
            if delta.function.name:
                names.append(delta.function.name)
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["w"] and len(ids) == 1 and finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), WEATHER)
    history = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [{"id": ids.pop(), "type": "function", "function": {"name": "w", "arguments": arguments}}],
        },
        {"role": "tool", "tool_call_id": "x", "content": '{"temp": 21}'},
    ]
    after = await client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=4)
    assert after.choices[0].finish_reason in ("stop", "length")


async def test_streamed_tool_call_arguments_come_in_pieces(controller: RunningController, model: str) -> None:
    """OpenAI, Responses and Anthropic streams: the head first, then the arguments in several pieces that
    concatenate to the final arguments (valid JSON of the schema)."""
    import anthropic

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{controller.port}/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        max_tokens=64,
        stream=True,
    )
    heads, pieces, finish = [], [], None
    async for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            if delta.id:
                heads.append((delta.id, delta.function.name, delta.function.arguments))
            elif delta.function.arguments:
                pieces.append(delta.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert len(heads) == 1 and heads[0][1:] == ("w", "") and finish == "tool_calls"
    assert len(pieces) > 1, pieces
    jsonschema.validate(json.loads("".join(pieces)), WEATHER)

    events = [
        event
        async for event in await client.responses.create(
            model=model,
            input="What is the weather in Paris?",
            tools=[{"type": "function", **TOOLS[0]["function"]}],
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=64,
            stream=True,
        )
    ]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1 and "".join(deltas) == done.arguments and done.name == "w"
    jsonschema.validate(json.loads(done.arguments), WEATHER)
    (item,) = [out for out in events[-1].response.output if out.type == "function_call"]
    assert item.arguments == done.arguments

    messages = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{controller.port}", api_key="none", max_retries=0)
    tools = [{"name": "w", "description": "Weather in a city", "input_schema": WEATHER}]
    async with messages.messages.stream(
        model=model,
        max_tokens=64,
        messages=ASK,
        tools=tools,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    ) as streamed:
        parts = [
            e.delta.partial_json
            async for e in streamed
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = await streamed.get_final_message()
    (use,) = [block for block in final.content if block.type == "tool_use"]
    assert len(parts) > 1 and json.loads("".join(parts)) == use.input and final.stop_reason == "tool_use"
    jsonschema.validate(use.input, WEATHER)


# --- logprobs --------------------------------------------------------------------------------------


async def test_logprobs_non_streamed_and_streamed(client: openai.AsyncOpenAI, model: str) -> None:
    response = await client.chat.completions.create(
        model=model, messages=ASK, logprobs=True, top_logprobs=3, max_tokens=4, temperature=0
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy: the sampled token is the most likely
    assert "".join(e.token for e in content) == response.choices[0].message.content
    stream = await client.chat.completions.create(
        model=model, messages=ASK, logprobs=True, top_logprobs=1, max_tokens=4, temperature=0, stream=True
    )
    streamed = [
        e
        async for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    text = await client.completions.create(model=model, prompt="The capital of France is", logprobs=2, max_tokens=3)
    legacy = text.choices[0].logprobs
    assert 1 <= len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) <= 3
    assert all(len(top) == 2 for top in legacy.top_logprobs)
    assert "".join(legacy.tokens).lstrip() == text.choices[0].text.lstrip()  # mlx-lm's detokenizer trims a first space


# --- langchain ---------------------------------------------------------------------------------------


async def test_langchain_with_structured_output(controller: RunningController, model: str) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        ok: bool
        n: int = Field(ge=0, le=9)

    llm = ChatOpenAI(
        model=model, base_url=f"http://127.0.0.1:{controller.port}/v1", api_key="none", max_tokens=16, max_retries=0
    )
    result = await llm.with_structured_output(Answer).ainvoke("Is Paris in France? Answer ok and a digit n.")
    assert isinstance(result, Answer)


# --- the Responses API -------------------------------------------------------------------------------


async def test_responses_create_with_text_format(client: openai.AsyncOpenAI, model: str) -> None:
    response = await client.responses.create(
        model=model,
        instructions="Answer in JSON.",
        input="Is Paris in France?",
        text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}},
        max_output_tokens=16,
        temperature=1.0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), ANSWER)
    assert response.usage.output_tokens > 0 and response.usage.input_tokens > 0


async def test_responses_function_call_then_output_item(client: openai.AsyncOpenAI, model: str) -> None:
    tools = [{"type": "function", "name": "w", "description": "Weather in a city", "parameters": WEATHER}]
    response = await client.responses.create(
        model=model, input=ASK, tools=tools, tool_choice="required", parallel_tool_calls=False, max_output_tokens=128
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "w"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    follow = [
        *ASK,
        {"type": "function_call", "call_id": call.call_id, "name": "w", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
    ]
    after = await client.responses.create(model=model, input=follow, tools=tools, max_output_tokens=4)
    assert after.status in ("completed", "incomplete")


async def test_responses_stream_event_order(client: openai.AsyncOpenAI, model: str) -> None:
    events = [
        event
        async for event in await client.responses.create(
            model=model, input="Say hi", max_output_tokens=4, temperature=0, stream=True
        )
    ]
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].response.output[0].content[0].text == text


async def test_responses_previous_response_id_is_refused(client: openai.AsyncOpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=model, input="hi", previous_response_id="resp_x")
    assert info.value.body["param"] == "previous_response_id"


# --- the Anthropic Messages API ----------------------------------------------------------------------


async def test_anthropic_messages_create_and_stream(controller: RunningController, model: str) -> None:
    import anthropic

    client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{controller.port}", api_key="none", max_retries=0)
    greedy = {"temperature": 0}  # older clients send it; the 2026 SDK has no parameter for it
    message = await client.messages.create(
        model=model,
        max_tokens=4,
        system="Be brief.",
        messages=[{"role": "user", "content": "Say hi"}],
        extra_body=greedy,
    )
    assert message.stop_reason == "max_tokens" and message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens == 4
    async with client.messages.stream(
        model=model,
        max_tokens=4,
        system="Be brief.",
        messages=[{"role": "user", "content": "Say hi"}],
        extra_body=greedy,
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == message.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens"


async def test_anthropic_forced_tool_use_and_result(controller: RunningController, model: str) -> None:
    import anthropic

    client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{controller.port}", api_key="none", max_retries=0)
    tools = [{"name": "w", "description": "Weather in a city", "input_schema": WEATHER}]
    message = await client.messages.create(
        model=model,
        max_tokens=64,
        messages=ASK,
        tools=tools,
        tool_choice={"type": "tool", "name": "w", "disable_parallel_tool_use": True},
    )
    assert message.stop_reason == "tool_use"
    (use,) = [block for block in message.content if block.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER)
    history = [
        *ASK,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": "w", "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}]},
    ]
    after = await client.messages.create(model=model, max_tokens=4, messages=history, tools=tools)
    assert after.stop_reason in ("end_turn", "max_tokens")
    structured = await client.messages.create(
        model=model, max_tokens=16, messages=ASK, output_config={"format": {"type": "json_schema", "schema": ANSWER}}
    )
    jsonschema.validate(json.loads(structured.content[0].text), ANSWER)
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(
            model=model, max_tokens=4, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024}
        )
    assert info.value.body["type"] == "error" and "thinking" in info.value.body["error"]["message"]
