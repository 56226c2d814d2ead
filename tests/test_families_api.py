"""Every family fixture served end to end: a controller and an mlx worker on the real nats-server, asked by the
official ``openai`` client, streamed and not, for a forced tool call and a JSON schema answer with thinking on
and off; and a long non-streamed tool call on a slowed engine that outlasts ``first_token_timeout_s`` three times.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from cluster_harness import Cluster, single_worker_cluster, with_sections
from families import FAMILIES, FamilyModels

from mlxcluster.config import Config
from mlxcluster.protocol import InferenceRequest, ToolSpec
from mlxcluster.worker.engine import MlxEngine

RANDOM_FAMILIES = ("qwen3", "gemma3", "qwen3_next", "mistral", "llama3")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 10}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


@pytest.fixture
async def served(
    request: pytest.FixtureRequest, cluster_config: Config, nats_server: Any, family_models: FamilyModels
) -> AsyncIterator[tuple[str, Cluster]]:
    family = request.param
    engine = MlxEngine(str(family_models.path(family)), served_name=family, max_concurrent=4, prompt_cache_bytes=0)
    await engine.start()
    config = with_sections(  # shared, loaded cores: the model's threads may delay heartbeats past 1 s
        cluster_config,
        controller={"first_token_timeout_s": 300.0},
        discovery={"heartbeat_interval_ms": 500, "offline_timeout_ms": 30_000},
    )
    try:
        async with single_worker_cluster(config, engine=engine) as cluster:
            yield family, cluster
    finally:
        await engine.stop()


def thinking_off(family: str) -> dict[str, Any]:
    return {"chat_template_kwargs": {"enable_thinking": False}} if FAMILIES[family].thinking else {}


@pytest.mark.parametrize("served", RANDOM_FAMILIES, indirect=True)
async def test_forced_calls_and_schemas_on_every_family(served: tuple[str, Cluster]) -> None:
    family, cluster = served
    client = cluster.controller.client()
    messages = [{"role": "user", "content": "What is the weather in Paris for two days?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    common: dict[str, Any] = {"model": family, "messages": messages, "max_tokens": 60, "temperature": 1.0, "seed": 3}
    reply = await client.chat.completions.create(
        **common, tools=[WEATHER], tool_choice=forced, parallel_tool_calls=False, extra_body=thinking_off(family)
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]

    stream = await client.chat.completions.create(
        **common,
        tools=[WEATHER],
        tool_choice=forced,
        parallel_tool_calls=False,
        stream=True,
        extra_body=thinking_off(family),
    )
    pieces: dict[int, str] = {}
    finish = None
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            pieces[delta.index] = pieces.get(delta.index, "") + (delta.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and set(pieces) == {0}
    jsonschema.validate(json.loads(pieces[0]), WEATHER["function"]["parameters"])  # type: ignore[index]

    schema_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    answer = await client.chat.completions.create(
        **common, response_format=schema_format, extra_body=thinking_off(family)
    )
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), ANSWER)
    if FAMILIES[family].thinking:  # thinking on, within a budget: the JSON comes after the reasoning
        thought = await client.chat.completions.create(
            **common, response_format=schema_format, reasoning_effort="low", extra_body={"chat_template_kwargs": {}}
        )
        message = thought.choices[0].message
        jsonschema.validate(json.loads(message.content or ""), ANSWER)
        assert thought.usage is not None and thought.usage.completion_tokens_details is not None
        if FAMILIES[family].opens_think:  # the random weights only think where the template opens the block
            assert getattr(message, "reasoning_content", None)
            assert (thought.usage.completion_tokens_details.reasoning_tokens or 0) > 0


@pytest.fixture
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch step takes 50 ms more (a slowed engine)."""
    from mlxcluster.worker import generation_loop

    step = generation_loop.GenerationLoop.step

    def slow(self: generation_loop.GenerationLoop) -> None:
        import time

        time.sleep(0.05)
        step(self)

    monkeypatch.setattr(generation_loop.GenerationLoop, "step", slow)


async def test_a_long_held_tool_call_outlasts_the_first_token_timeout(
    cluster_config: Config, nats_server: Any, family_models: FamilyModels, slow_steps: None
) -> None:
    """A non-streamed forced call is held whole by the parser: nothing but Progress frames reach the controller
    until it is complete, which here takes several times ``first_token_timeout_s``; the call still arrives."""
    config = with_sections(
        cluster_config,
        controller={"first_token_timeout_s": 0.4},
        discovery={"heartbeat_interval_ms": 500, "offline_timeout_ms": 30_000},  # heartbeats may lag on loaded cores
    )
    engine = MlxEngine(  # held output reports Progress every 50 ms; one token a (slowed) step: no speculation
        str(family_models.path("qwen3")),
        served_name="qwen3",
        prompt_cache_bytes=0,
        held_progress_s=0.05,
        speculative_tokens=0,
    )
    await engine.start()
    try:
        warm_up = InferenceRequest(
            request_id="warm",
            model="qwen3",
            prompt="x",
            max_tokens=1,
            tools=[ToolSpec(name="f")],
            tool_choice="required",
        )
        _ = [frame async for frame in engine.generate(warm_up)]  # the grammar engine's tokenizer is built once
        async with single_worker_cluster(config, engine=engine) as cluster:
            client = cluster.controller.client()
            started = asyncio.get_running_loop().time()
            reply = await client.chat.completions.create(
                model="qwen3",
                messages=[{"role": "user", "content": "weather?"}],
                tools=[WEATHER],
                tool_choice="required",
                parallel_tool_calls=False,
                max_tokens=60,
                temperature=0,
                extra_body={"chat_template_kwargs": {"enable_thinking": False}},
            )
            elapsed = asyncio.get_running_loop().time() - started
            assert reply.choices[0].finish_reason == "tool_calls", reply
            assert reply.usage is not None and reply.usage.completion_tokens * 0.05 >= 3 * 0.4
            assert elapsed >= 3 * 0.4
    finally:
        await engine.stop()
