"""A moved stream continues from what it said: the said parts written back as the model wrote them, the grammar
and the shaper advanced over them (inside reasoning, mid-JSON, after a call), or a clear refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest
from grammar_run import Run
from tokenizer_families import family_features

from mlxcluster.protocol import ChatMessage, InferenceRequest, ResponseFormat, SaidPart, ToolCall, ToolSpec
from mlxcluster.worker.continuation import ContinuationError, said_text
from mlxcluster.worker.tool_formats import fallback_format

THINK = ("<think>", "</think>")
CALL = ToolCall(id="call_1", name="f", arguments='{"x": 1}')
TOOL = ToolSpec(name="f", parameters={"type": "object", "properties": {"x": {"type": "integer"}}})
JSON = ResponseFormat(type="json_schema", schema={"type": "object", "properties": {"a": {"type": "integer"}}})


def moved(said: list[SaidPart], **fields: Any) -> InferenceRequest:
    messages = [ChatMessage(role="user", content="go")]
    return InferenceRequest(request_id="r", model="m", messages=messages, said=said, **fields)


def test_what_was_said_is_written_back_as_the_model_wrote_it() -> None:
    said = [
        SaidPart(kind="reasoning", text="plan"),
        SaidPart(kind="content", text="Sure. "),
        SaidPart(kind="tool_call", call=CALL),
    ]
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert said_text(said, fallback_format(), THINK) == "<think>plan</think>Sure. " + call
    assert said_text(said, fallback_format(), THINK, opened=True) == "plan</think>Sure. " + call
    assert said_text(said[:1], None, THINK) == "<think>plan"  # lost mid-reasoning: the block stays open
    assert said_text([SaidPart(text="Hi")], None, THINK, opened=True) == "</think>Hi"


def test_a_stream_moved_mid_json_resumes_inside_the_value() -> None:
    said = [SaidPart(kind="reasoning", text="r"), SaidPart(kind="content", text='{"a":')]
    run = Run(family_features("qwen3"), moved(said, response_format=JSON))
    assert run.allows("4") and not run.allows('"') and not run.allows("<think>") and not run.allows_eos
    run.write("42}")
    merged = run.finish()
    assert (merged.reasoning, merged.text) == ("", "42}")  # nothing said is sent again


def test_a_stream_moved_mid_reasoning_resumes_in_the_reasoning() -> None:
    run = Run(family_features("qwen3_open"), moved([SaidPart(kind="reasoning", text="half of")], response_format=JSON))
    assert run.allows(" it") and not run.allows_eos
    run.write(" it</think>")
    run.write('{"a":1}')
    merged = run.finish()
    assert (merged.reasoning, merged.text) == (" it", '{"a":1}')


@pytest.mark.parametrize("parallel", [True, False])
def test_a_stream_moved_after_a_call_resumes_after_it(parallel: bool) -> None:
    request = moved(
        [SaidPart(kind="tool_call", call=CALL)], tools=[TOOL], tool_choice="required", parallel_tool_calls=parallel
    )
    run = Run(family_features("qwen3"), request)
    assert run.allows_eos and run.allows("<tool_call>") is parallel
    assert run.prepared.shaper.made_tool_call
    if parallel:
        run.write('\n<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>')
    merged = run.finish()
    assert [json.loads(c.arguments) for c in merged.tool_calls or []] == ([{"x": 2}] if parallel else [])


def test_the_content_only_continuation_of_older_controllers_advances_the_grammar_too() -> None:
    request = InferenceRequest(
        request_id="r",
        model="m",
        messages=[ChatMessage(role="user", content="go")],
        continuation='{"a":',
        response_format=JSON,
        chat_template_kwargs={"enable_thinking": False},
    )
    run = Run(family_features("qwen3"), request)
    assert run.allows("7") and not run.allows("{")


def test_what_the_grammar_rejects_is_not_continued() -> None:
    with pytest.raises(ContinuationError, match="grammar"):
        Run(family_features("plain"), moved([SaidPart(text="not json")], response_format=JSON))


def test_a_call_this_format_cannot_write_back_is_not_continued() -> None:
    engine = family_features("function_gemma")
    request = moved([SaidPart(kind="tool_call", call=CALL)], tools=[TOOL])
    with pytest.raises(ContinuationError, match="cannot be written back"):
        engine.continuation(request, engine.prompt(request))
