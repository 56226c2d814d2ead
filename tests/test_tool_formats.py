"""One tool format per model, on tokenizers of each family (mlx-lm infers the parser from the template):
the prompt shows the format that is parsed, forced and constrained; history renders for every family;
a call written back parses to itself; families we cannot force refuse, naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tokenizer_families import family_features

from mlxcluster.json_grammar import GrammarError
from mlxcluster.protocol import ChatMessage, InferenceRequest, ReasoningParams, ToolCall, ToolSpec
from mlxcluster.worker.features import EngineFeatures
from mlxcluster.worker.output import OutputShaper, merge_tokens, tool_dicts
from mlxcluster.worker.tool_format_base import ToolFormat

WEATHER = ToolSpec(
    name="get_weather",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "units": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city"],
    },
)
NOOP = ToolSpec(name="noop", parameters={"type": "object", "properties": {}})
CALL = ToolCall(
    id="call_abc", name="get_weather", arguments=json.dumps({"city": 'Pa"ris\n<x> é', "days": 3}, ensure_ascii=False)
)
OTHER = ToolCall(id="call_def", name="noop", arguments="{}")
CONSTRAINABLE = ["qwen3", "mistral", "qwen3_coder", "pythonic", "plain"]
"""One tokenizer per format we can force (``plain``: our fallback, markers that are text, not special tokens)."""


@pytest.fixture(scope="module")
def features() -> dict[str, EngineFeatures]:
    families = ["qwen3", "mistral", "qwen3_coder", "pythonic", "plain", "llama3", "function_gemma"]
    return {family: family_features(family) for family in families}


def chat(*tools: ToolSpec, **fields: Any) -> InferenceRequest:
    messages = [ChatMessage(role="user", content="Weather in Paris?")]
    return InferenceRequest(request_id="r", model="m", messages=messages, tools=list(tools), **fields)


def accepts(engine: EngineFeatures, request: InferenceRequest, text: str) -> bool:
    """Whether the request's grammar accepts ``text`` as a whole output."""
    prepared = engine.prepare(request, engine.prompt(request))
    assert prepared.grammar is not None
    matcher = prepared.grammar.matcher
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return bool(matcher.consume_tokens(ids) and matcher.is_accepting())


def two_calls(fmt: ToolFormat, first: ToolCall, second: ToolCall) -> str:
    """Two calls as the model writes them (one block each, or both in one block)."""
    a, b = fmt.render_call(first), fmt.render_call(second)
    if fmt.calls_in_one_block:
        return a[: -len(fmt.end) - 1] + ", " + b[len(fmt.start) + 1 :]
    return a + ("\n" if fmt.separator else "") + b


def test_each_family_gets_the_format_mlx_lm_parses(features: dict[str, EngineFeatures]) -> None:
    found = {family: (engine.tool_format.name, engine.tool_format.native) for family, engine in features.items()}
    assert found == {
        "qwen3": ("json_tools", True),
        "mistral": ("mistral", True),
        "qwen3_coder": ("qwen3_coder", True),
        "pythonic": ("pythonic", True),
        "function_gemma": ("function_gemma", True),
        "llama3": ("fallback", False),  # its template renders tools, but mlx-lm has no parser for its calls
        "plain": ("fallback", False),
    }


@pytest.mark.parametrize("family", CONSTRAINABLE)
def test_a_call_written_back_parses_to_itself(features: dict[str, EngineFeatures], family: str) -> None:
    fmt = features[family].tool_format
    text = fmt.render_call(CALL)
    inner = text[len(fmt.start) : len(text) - len(fmt.end)]
    (parsed,) = fmt.parse(inner, tool_dicts([WEATHER])) or []
    assert (parsed.name, parsed.arguments) == (CALL.name, CALL.arguments)


@pytest.mark.parametrize("family", CONSTRAINABLE)
def test_a_forced_call_is_the_families_markup_and_nothing_else(
    features: dict[str, EngineFeatures], family: str
) -> None:
    engine = features[family]
    fmt = engine.tool_format
    required = chat(WEATHER, NOOP, tool_choice="required")
    assert accepts(engine, required, fmt.render_call(CALL))
    assert accepts(engine, required, two_calls(fmt, CALL, OTHER))
    assert not accepts(
        engine, chat(WEATHER, NOOP, tool_choice="required", parallel_tool_calls=False), two_calls(fmt, CALL, OTHER)
    )
    assert not accepts(engine, required, "Sure. " + fmt.render_call(CALL))
    wrong_type = ToolCall(name="get_weather", arguments='{"city": "Paris", "days": "three"}')
    assert not accepts(engine, required, fmt.render_call(wrong_type))
    named = chat(WEATHER, NOOP, tool_choice="function", tool_name="noop")
    assert accepts(engine, named, fmt.render_call(OTHER)) and not accepts(engine, named, fmt.render_call(CALL))


@pytest.mark.parametrize("family", CONSTRAINABLE)
def test_strict_tools_constrain_their_calls_and_leave_text_free(
    features: dict[str, EngineFeatures], family: str
) -> None:
    engine = features[family]
    fmt = engine.tool_format
    strict = ToolSpec(name=WEATHER.name, parameters=WEATHER.parameters, strict=True)
    loose = ToolSpec(name="noop", parameters={"type": "object", "properties": {"x": {"type": "integer"}}})
    request = chat(strict, loose)
    assert accepts(engine, request, "It is sunny, no call needed.")
    assert accepts(engine, request, "Let me check. " + fmt.render_call(CALL))
    assert not accepts(
        engine, request, "Let me check. " + fmt.render_call(ToolCall(name="get_weather", arguments="{}"))
    )
    assert accepts(engine, request, fmt.render_call(ToolCall(name="noop", arguments='{"x": "not an integer"}')))
    assert not accepts(engine, request, fmt.render_call(ToolCall(name="unknown", arguments="{}")))
    assert accepts(engine, request, fmt.render_call(CALL) + " Done.") is fmt.text_after_calls
    assert not accepts(engine, chat(strict, loose, parallel_tool_calls=False), two_calls(fmt, CALL, OTHER))


def test_a_family_we_cannot_force_refuses_naming_the_field(features: dict[str, EngineFeatures]) -> None:
    engine = features["function_gemma"]
    with pytest.raises(GrammarError, match="tool_choice 'auto'") as forced:
        engine.prepare(chat(WEATHER, tool_choice="required"), [1])
    assert forced.value.param == "tool_choice"
    strict = ToolSpec(name=WEATHER.name, parameters=WEATHER.parameters, strict=True)
    with pytest.raises(GrammarError, match="strict") as constrained:
        engine.prepare(chat(strict), [1])
    assert constrained.value.param == "tools"
    prepared = engine.prepare(chat(WEATHER), [1])  # under auto its calls are still parsed
    assert prepared.grammar is None
    text = "<start_function_call>call:get_weather{city:<escape>Paris<escape>}<end_function_call>"
    (call,) = merge_tokens([f for f in [prepared.frame(text, 1, final=True)] if f], 0).tool_calls or []
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})


def test_what_a_format_cannot_enforce_is_refused_naming_tools(features: dict[str, EngineFeatures]) -> None:
    pattern = ToolSpec(
        name="f", parameters={"type": "object", "properties": {"s": {"type": "string", "pattern": "a+"}}}
    )
    with pytest.raises(GrammarError, match="pattern") as refused:
        features["qwen3_coder"].prepare(chat(pattern, tool_choice="required"), [1])
    assert refused.value.param == "tools"
    with pytest.raises(GrammarError, match="letters") as refused:
        features["mistral"].prepare(chat(ToolSpec(name="a.b"), tool_choice="required"), [1])
    assert refused.value.param == "tools"


HISTORY = [
    ChatMessage(role="user", content="Weather in Paris?"),
    ChatMessage(role="assistant", content="", tool_calls=[CALL]),
    ChatMessage(role="tool", content="sunny, 21C", tool_call_id=CALL.id),
    ChatMessage(role="user", content="And tomorrow?"),
]


@pytest.mark.parametrize("family", [*CONSTRAINABLE, "llama3", "function_gemma"])
def test_tool_history_renders_for_every_family(features: dict[str, EngineFeatures], family: str) -> None:
    engine = features[family]
    request = InferenceRequest(request_id="r", model="m", messages=HISTORY, tools=[WEATHER])
    text = engine.tokenizer.decode(engine.prompt(request))
    assert "sunny, 21C" in text and "And tomorrow?" in text
    if engine.tool_format.constrainable:  # the call reads as the model writes it (and as a moved stream resumes)
        assert engine.tool_format.render_call(CALL) in text
    if family == "mistral":  # its template wants 9-character ids: the call's and its result's are the same
        ident = engine.tool_format.history_id(CALL.id)
        assert len(ident) == 9 and ident.isalnum() and f"[TOOL_RESULTS]{ident}[TOOL_CONTENT]" in text


def test_the_prompt_shows_the_format_that_is_parsed(features: dict[str, EngineFeatures]) -> None:
    llama = features["llama3"].tokenizer.decode(features["llama3"].prompt(chat(WEATHER)))
    assert "You can call functions" in llama and "<tool_call>" in llama and "Environment: ipython" not in llama
    qwen = features["qwen3"].tokenizer.decode(features["qwen3"].prompt(chat(WEATHER)))
    assert "<tools>" in qwen and "You can call functions" not in qwen


@pytest.mark.parametrize(
    ("fields", "think_block"),
    [
        ({}, False),
        ({"chat_template_kwargs": {"enable_thinking": False}}, True),
        ({"reasoning": ReasoningParams(enabled=False)}, True),
        ({"reasoning": ReasoningParams(enabled=False), "chat_template_kwargs": {"enable_thinking": True}}, False),
    ],
)
def test_the_thinking_switch_reaches_the_template(
    features: dict[str, EngineFeatures], fields: dict[str, Any], think_block: bool
) -> None:
    engine = features["qwen3"]
    text = engine.tokenizer.decode(engine.prompt(chat(**fields)))
    assert text.endswith("<think>\n\n</think>\n\n") is think_block


@pytest.mark.parametrize("family", CONSTRAINABLE)
def test_the_shaper_parses_what_the_grammar_forces(features: dict[str, EngineFeatures], family: str) -> None:
    fmt = features[family].tool_format
    shaper = OutputShaper(tools=fmt, tool_dicts=tool_dicts([WEATHER, NOOP]))
    text = two_calls(fmt, CALL, OTHER)
    frames = [shaper.frame(text[i : i + 3], 1, final=False) for i in range(0, len(text), 3)]
    merged = merge_tokens([f for f in [*frames, shaper.frame("", 0, final=True)] if f is not None], 0)
    assert [(c.name, c.arguments) for c in merged.tool_calls or []] == [
        (CALL.name, CALL.arguments),
        (OTHER.name, OTHER.arguments),
    ]
    assert merged.text == ""


def test_a_qwen3_coder_string_is_never_the_null_its_parser_reads_as_none(features: dict[str, EngineFeatures]) -> None:
    engine = features["qwen3_coder"]
    strict = ToolSpec(name=WEATHER.name, parameters=WEATHER.parameters, strict=True)
    request = chat(strict, NOOP)

    def call(name: str, value: str) -> str:
        return f"<tool_call>\n<function={name}>\n<parameter=city>\n{value}\n</parameter>\n</function>\n</tool_call>"

    assert accepts(engine, request, call("get_weather", "nullish"))
    assert not accepts(engine, request, call("get_weather", "Null"))
    assert accepts(engine, request, call("noop", "null"))  # a tool that is not strict: any value


def item_tool(name: str, field: str) -> ToolSpec:
    """A tool whose arguments refer to a definition, as pydantic writes them (the same name in each tool)."""
    item = {"type": "object", "properties": {field: {"type": "integer"}}, "required": [field]}
    return ToolSpec(
        name=name,
        parameters={
            "type": "object",
            "$defs": {"Item": item},
            "properties": {"item": {"$ref": "#/$defs/Item"}},
            "required": ["item"],
        },
    )


@pytest.mark.parametrize("family", ["qwen3", "mistral", "pythonic", "plain"])
def test_arguments_that_refer_to_their_definitions_are_enforced(
    features: dict[str, EngineFeatures], family: str
) -> None:
    engine = features[family]
    fmt = engine.tool_format
    request = chat(item_tool("add", "qty"), item_tool("remove", "sku"), tool_choice="required")
    assert accepts(engine, request, fmt.render_call(ToolCall(name="add", arguments='{"item": {"qty": 2}}')))
    assert accepts(engine, request, fmt.render_call(ToolCall(name="remove", arguments='{"item": {"sku": 7}}')))
    assert not accepts(engine, request, fmt.render_call(ToolCall(name="add", arguments='{"item": {"sku": 2}}')))
    assert not accepts(engine, request, fmt.render_call(ToolCall(name="add", arguments='{"item": {"qty": "x"}}')))
