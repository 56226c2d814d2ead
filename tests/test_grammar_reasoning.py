"""Grammars that respect reasoning, on a Qwen3-style tokenizer (``<think>`` / ``</think>`` special tokens):
nothing but the end of the sequence is masked inside a think block (it is never allowed there);
the first token may open the block when thinking is on; after the think-end marker the grammar applies; a model
without thinking, or a request that switched it off, is masked from the first token."""

from __future__ import annotations

import json
from typing import Any

import pytest
from grammar_run import Run
from tokenizer_families import family_features

from mlxcluster.protocol import ChatMessage, InferenceRequest, ReasoningParams, ResponseFormat, ToolSpec

JSON = ResponseFormat(type="json_schema", schema={"type": "object", "properties": {"a": {"type": "integer"}}})


def chat(**fields: Any) -> InferenceRequest:
    messages = [ChatMessage(role="user", content="Give me JSON")]
    return InferenceRequest(request_id="r", model="m", messages=messages, response_format=JSON, **fields)


def test_inside_a_think_block_the_prompt_opened_nothing_is_masked_until_it_ends() -> None:
    run = Run(family_features("qwen3_open"), chat())
    assert run.allows("Hello") and run.allows(" {") and run.allows("</think>")
    assert not run.allows_eos  # the answer has not come yet
    run.write("Let me think: {not json} </tool_call> maybe")
    assert run.allows("</think>") and not run.allows_eos
    run.write("</think>")
    assert run.allows("{") and not run.allows("Hello") and not run.allows("\n")
    run.write('{"a":1}')
    merged = run.finish()
    assert merged.reasoning == "Let me think: {not json} </tool_call> maybe"
    assert json.loads(merged.text) == {"a": 1}


def test_the_first_token_may_open_a_think_block_when_thinking_is_on() -> None:
    run = Run(family_features("qwen3"), chat())
    assert run.allows("<think>") and run.allows("{") and not run.allows("Hello") and not run.allows_eos
    run.write("<think>")
    assert run.allows("Hello") and not run.allows_eos
    run.write("\nplan\n</think>")
    assert not run.allows("Hello") and not run.allows("<think>")
    run.write('{"a":2}')
    merged = run.finish()
    assert (merged.reasoning, json.loads(merged.text)) == ("\nplan\n", {"a": 2})


def test_an_answer_without_thinking_is_fine_too() -> None:
    run = Run(family_features("qwen3"), chat())
    run.write('{"a":3}')
    merged = run.finish()
    assert (merged.reasoning, json.loads(merged.text)) == ("", {"a": 3})


@pytest.mark.parametrize(
    "fields",
    [{"reasoning": ReasoningParams(enabled=False)}, {"chat_template_kwargs": {"enable_thinking": False}}],
)
def test_thinking_switched_off_is_masked_from_the_first_token(fields: dict[str, Any]) -> None:
    run = Run(family_features("qwen3"), chat(**fields))
    assert run.tokens[-2:] != [run.id("<think>")]  # the template closed its empty think block
    assert run.allows("{") and not run.allows("<think>") and not run.allows("Hello")


def test_a_model_without_thinking_is_masked_from_the_first_token() -> None:
    run = Run(family_features("plain"), chat())
    assert run.allows("{") and not run.allows("Hello") and not run.allows_eos


def test_a_forced_call_comes_after_the_reasoning() -> None:
    tool = ToolSpec(name="f", parameters={"type": "object", "properties": {"x": {"type": "integer"}}})
    request = InferenceRequest(
        request_id="r",
        model="m",
        messages=[ChatMessage(role="user", content="call f")],
        tools=[tool],
        tool_choice="required",
    )
    run = Run(family_features("qwen3_open"), request)
    assert run.allows("<tool_call>") and not run.allows_eos  # in reasoning, it is reasoning
    run.write("I will call f.</think>")
    assert run.allows("<tool_call>") and not run.allows("I")
    run.write('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    merged = run.finish()
    assert merged.reasoning == "I will call f." and merged.text == ""
    assert [(c.name, json.loads(c.arguments)) for c in merged.tool_calls or []] == [("f", {"x": 1})]


def test_a_think_end_marker_that_is_text_ends_reasoning_at_its_first_occurrence() -> None:
    from mlxcluster.worker.thinking import ThinkMarkers, with_reasoning

    engine = family_features("plain")  # "<think>" / "</think>" are plain text to this tokenizer
    vocab = engine.grammars.vocab()
    markers = ThinkMarkers("<think>", "</think>", (), ())
    grammar = with_reasoning('answer: "ok"\n', "may_open", markers, vocab)

    def accepts(text: str) -> bool:
        matcher = engine.grammars.matcher(grammar)
        return bool(matcher.consume_tokens(engine.tokenizer.encode(text, add_special_tokens=False)))

    assert accepts("<think>a < b </thin k></think>ok") and accepts("ok")
    assert not accepts("<think>a</think>b</think>ok")  # the first marker ended the reasoning


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "response_format"),
        ({"tools": [ToolSpec(name="f")], "tool_choice": "required", "response_format": None}, "tool_choice"),
        ({"tools": [ToolSpec(name="f", strict=True)], "response_format": None}, "tools"),
    ],
)
def test_a_grammar_that_does_not_compile_names_its_field(
    fields: dict[str, Any], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxcluster.json_grammar import GrammarError
    from mlxcluster.worker.grammar import GrammarCompiler

    features = family_features("qwen3")

    def refuse(_self: GrammarCompiler, _grammar: str) -> Any:
        raise GrammarError("unsupported schema: too deep")

    monkeypatch.setattr(GrammarCompiler, "matcher", refuse)
    messages = [ChatMessage(role="user", content="Give me JSON")]
    request = InferenceRequest(request_id="r", model="m", messages=messages, **{"response_format": JSON, **fields})
    with pytest.raises(GrammarError, match="too deep") as refused:
        features.prepare(request, features.prompt(request))
    assert refused.value.param == field
