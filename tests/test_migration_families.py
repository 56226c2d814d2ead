"""A moved stream keeps what was said: the stream is cut on one engine mid-reasoning, mid-JSON and after a tool
call, the controller's :class:`StreamSoFar` builds the continuing request from the frames relayed, and a second
engine on the same model finishes it. The client's whole answer must be what the request asked for: JSON that
parses and follows the schema (the grammar advanced over the continuation, not restarted), the reasoning
continued rather than repeated, a finished tool call not called again."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import jsonschema
import pytest
from families import FamilyModels

from mlxcluster.controller.routing.migration import StreamSoFar
from mlxcluster.protocol import (
    ChatMessage,
    Done,
    Error,
    InferenceRequest,
    Progress,
    ReasoningParams,
    ResponseFormat,
    SamplingParams,
    Token,
    ToolSpec,
)
from mlxcluster.worker.engine import MlxEngine

ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 24},
        "score": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["answer", "score"],
    "additionalProperties": False,
}
TOOL = ToolSpec(
    name="lookup",
    parameters={
        "type": "object",
        "properties": {"query": {"type": "string", "maxLength": 16}},
        "required": ["query"],
        "additionalProperties": False,
    },
)


@pytest.fixture
async def engines(family_models: FamilyModels) -> AsyncIterator[tuple[MlxEngine, MlxEngine]]:
    """Two engines on the qwen3 fixture: the one that is lost and the one that continues."""
    path = str(family_models.path("qwen3"))
    pair = (MlxEngine(path, prompt_cache_bytes=0), MlxEngine(path, prompt_cache_bytes=0))
    for engine in pair:
        await engine.start()
    yield pair
    for engine in pair:
        await engine.stop()


def request(**fields: Any) -> InferenceRequest:
    fields.setdefault("sampling", SamplingParams(temperature=0.0))
    return InferenceRequest(
        request_id="moved", model="qwen3", messages=[ChatMessage(role="user", content="Go.")], max_tokens=80, **fields
    )


async def moved(
    engines: tuple[MlxEngine, MlxEngine], original: InferenceRequest, cut: Callable[[StreamSoFar], bool]
) -> tuple[StreamSoFar, Done]:
    """Relay ``original`` from the first engine until ``cut`` says so, then finish it on the second engine."""
    so_far = StreamSoFar(original)
    frames = engines[0].generate(original)
    async for frame in frames:
        if isinstance(frame, Progress):
            continue  # the controller's timers take these; nothing is relayed
        assert isinstance(frame, Token), frame  # the cut comes before the end
        so_far.relayed(frame)
        if cut(so_far):
            break
    await frames.aclose()  # the worker is lost
    continuation = so_far.continuation()
    assert continuation.said is not None
    last: Any = None
    async for frame in engines[1].generate(continuation):
        last = so_far.relayed(frame) if isinstance(frame, Token | Done | Error) else frame
    assert isinstance(last, Done), last
    return so_far, last


def content(so_far: StreamSoFar) -> str:
    return "".join(part.text for part in so_far.continuation().said or [] if part.kind == "content")


def reasoning(so_far: StreamSoFar) -> str:
    return "".join(part.text for part in so_far.continuation().said or [] if part.kind == "reasoning")


def calls(so_far: StreamSoFar) -> list[Any]:
    return [part.call for part in so_far.continuation().said or [] if part.kind == "tool_call"]


async def test_a_stream_moved_mid_json_comes_out_valid(engines: tuple[MlxEngine, MlxEngine]) -> None:
    original = request(
        response_format=ResponseFormat(type="json_schema", schema=ANSWER),
        chat_template_kwargs={"enable_thinking": False},
    )
    so_far, done = await moved(engines, original, lambda s: len(s.text) >= 8)  # inside the first string
    assert done.finish_reason == "stop"
    jsonschema.validate(json.loads(content(so_far)), ANSWER)


async def test_a_stream_moved_mid_reasoning_goes_on_thinking_then_answers(
    engines: tuple[MlxEngine, MlxEngine],
) -> None:
    original = request(
        response_format=ResponseFormat(type="json_schema", schema=ANSWER),
        reasoning=ReasoningParams(enabled=True, budget_tokens=12),
    )
    so_far, done = await moved(engines, original, lambda s: s.tokens >= 4)  # 4 of the 12 reasoning tokens
    assert done.finish_reason == "stop"
    said = so_far.continuation().said or []
    assert [part.kind for part in said] == ["reasoning", "content"]  # one run of reasoning, continued
    assert len(reasoning(so_far)) > 0
    assert done.usage.reasoning_tokens <= 12 + 2  # one budget for the whole stream (and the forced end marker)
    jsonschema.validate(json.loads(content(so_far)), ANSWER)


async def test_a_stream_moved_after_a_tool_call_does_not_call_it_again(
    engines: tuple[MlxEngine, MlxEngine],
) -> None:
    original = request(
        tools=[TOOL], tool_choice="required", parallel_tool_calls=False, chat_template_kwargs={"enable_thinking": False}
    )
    so_far, done = await moved(engines, original, lambda s: bool(calls(s)))  # the call came, its Done not yet
    assert done.finish_reason == "stop"
    (call,) = calls(so_far)
    jsonschema.validate(json.loads(call.arguments), TOOL.parameters)  # type: ignore[arg-type]
    assert done.usage.completion_tokens - so_far.tokens_before_segment <= 2  # the second engine only ended the turn
