"""The tool formats and grammars on the family fixtures (``families.py``): each gets the format its template and
mlx-lm's parser agree on, its history shows calls as its grammar forces them, and sampled generations of its
tiny model through mlx-lm's BatchGenerator (as the engine runs them), at temperature 1, end in strict JSON."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from families import FAMILIES, FamilyModels

from mlxcluster.protocol import ChatMessage, InferenceRequest, ResponseFormat, SamplingParams, ToolCall, ToolSpec
from mlxcluster.worker.features import EngineFeatures, RequestFeatures
from mlxcluster.worker.output import merge_tokens

FORMATS = {"qwen3": "json_tools", "qwen3_demo": "json_tools", "qwen3_next": "json_tools", "mistral": "mistral"}
RANDOM = [name for name, family in FAMILIES.items() if not family.coherent]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOL = ToolSpec(name="get_weather", parameters=SCHEMA)
CALL = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris", "days": 2}')
SAMPLES = 4


@functools.cache
def _loaded(path: Path) -> tuple[Any, EngineFeatures]:
    import mlx_lm

    model, tokenizer, config = mlx_lm.load(str(path), return_config=True)  # type: ignore[misc]
    vocab = (config.get("text_config") or config)["vocab_size"]
    return model, EngineFeatures(tokenizer, vocab, sorted(tokenizer.eos_token_ids))


def engine_of(family_models: FamilyModels, name: str) -> tuple[Any, EngineFeatures]:
    return _loaded(family_models.path(name))


def chat(**fields: Any) -> InferenceRequest:
    return InferenceRequest(
        request_id="r", model="m", messages=[ChatMessage(role="user", content="Weather in Paris?")], **fields
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_fixture_gets_the_format_its_template_and_parser_agree_on(family_models: FamilyModels, name: str) -> None:
    _, engine = engine_of(family_models, name)
    assert (engine.tool_format.name, engine.tool_format.native) == (
        (FORMATS[name], True) if name in FORMATS else ("fallback", False)
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_fixtures_forced_call_reads_as_its_history_shows_calls(family_models: FamilyModels, name: str) -> None:
    _, engine = engine_of(family_models, name)
    fmt = engine.tool_format
    history = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", content="", tool_calls=[CALL]),
        ChatMessage(role="tool", content="sunny", tool_call_id=CALL.id),
        ChatMessage(role="user", content="And tomorrow?"),
    ]
    request = InferenceRequest(request_id="r", model="m", messages=history, tools=[TOOL], tool_choice="required")
    prompt = engine.prompt(request)
    if fmt.native:
        assert fmt.render_call(CALL) in engine.tokenizer.decode(prompt)
    prepared = engine.prepare(request, prompt)
    assert prepared.grammar is not None
    opened = FAMILIES[name].opens_think
    text = ("Checking.</think>" if opened else "") + fmt.render_call(CALL)
    matcher = prepared.grammar.matcher
    assert matcher.consume_tokens(engine.tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()


def generate(
    model: Any, engine: EngineFeatures, requests: list[InferenceRequest]
) -> list[tuple[RequestFeatures, list[int], str | None]]:
    """Each request's tokens and finish reason, sampled at temperature 1 in one batch, as the engine runs it."""
    from mlx_lm.generate import BatchGenerator, make_stop_sequences

    from mlxcluster.worker.sampling import make_request_sampler

    generator = BatchGenerator(model, completion_batch_size=len(requests), prefill_batch_size=len(requests))
    prepared = []
    for seed, request in enumerate(requests):
        prompt = engine.prompt(request)
        features = engine.prepare(request, prompt)
        sampler = make_request_sampler(SamplingParams(temperature=1.0), seed, engine.vocab_size)
        (uid,) = generator.insert(
            [prompt],
            max_tokens=[request.max_tokens],
            samplers=[sampler],
            logits_processors=[features.processors],
            stop_sequences=[make_stop_sequences(engine.tokenizer)],
        )
        prepared.append((uid, features))
    out: dict[int, tuple[list[int], str | None]] = {uid: ([], None) for uid, _ in prepared}
    while any(reason is None for _, reason in out.values()):
        for response in generator.next_generated():
            tokens, _ = out[response.uid]
            if response.finish_reason != "stop":
                tokens.append(response.token)
            out[response.uid] = (tokens, response.finish_reason)
    generator.close()
    return [(features, *out[uid]) for uid, features in prepared]


def shaped(engine: EngineFeatures, features: RequestFeatures, tokens: list[int]) -> Any:
    frame = features.frame(engine.tokenizer.decode(tokens), len(tokens), final=True)
    return merge_tokens([frame] if frame is not None else [], 0)


@pytest.mark.parametrize("name", RANDOM)
def test_sampled_schema_output_of_each_fixture_is_strict_json(family_models: FamilyModels, name: str) -> None:
    model, engine = engine_of(family_models, name)
    request = chat(
        response_format=ResponseFormat(type="json_schema", schema=SCHEMA),
        chat_template_kwargs={"enable_thinking": False},  # random weights never end a think block
        max_tokens=64,
    )
    results = generate(model, engine, [request] * SAMPLES)
    finished = [(features, tokens) for features, tokens, reason in results if reason == "stop"]
    assert len(finished) >= SAMPLES // 2
    for features, tokens in finished:
        jsonschema.validate(json.loads(shaped(engine, features, tokens).text), SCHEMA)


@pytest.mark.parametrize("name", RANDOM)
def test_sampled_forced_calls_of_each_fixture_parse(family_models: FamilyModels, name: str) -> None:
    model, engine = engine_of(family_models, name)
    request = chat(
        tools=[TOOL],
        tool_choice="required",
        parallel_tool_calls=False,  # one call, then the end (random weights would call on and on)
        chat_template_kwargs={"enable_thinking": False},
        max_tokens=96,
    )
    results = generate(model, engine, [request] * SAMPLES)
    finished = [(features, tokens) for features, tokens, reason in results if reason == "stop"]
    assert len(finished) >= SAMPLES // 2
    for features, tokens in finished:
        merged = shaped(engine, features, tokens)
        assert merged.text == "" and merged.tool_calls
        for call in merged.tool_calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMA)
