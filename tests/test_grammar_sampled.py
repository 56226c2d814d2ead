"""Everything a grammar lets through is strict JSON that follows its schema: sampled at temperature 1.

No model: each step samples (temperature 1) from logits that favour what ends JSON values, the markup of
the family's calls, the end of the sequence and raw control characters (what Python's strict ``json.loads``
rejects inside a string), masked by the request's grammar processor exactly as mlx-lm calls it. Over a few
hundred short generations, across ``json_object``, ``json_schema`` (also after reasoning) and forced calls in
every format, every finished output passes ``json.loads`` (strict) and the schema; a call's arguments as its
format's parser reads them back.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jsonschema
import numpy as np
import pytest
from tokenizer_families import VOCAB_SIZE, family_features

from mlxcluster.protocol import ChatMessage, InferenceRequest, ResponseFormat, ToolSpec
from mlxcluster.worker.features import EngineFeatures
from mlxcluster.worker.output import merge_tokens

RUNS = 16  # bench grammar --parts strict samples 1,000
MAX_TOKENS = 64
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "n": {"type": "integer"},
        "x": {"type": "number"},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["a", "b\n", None]},
        "list": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}
ARGUMENTS = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "n": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tag": {"type": "string", "enum": ["a", "b\n"]},
        "list": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["name", "n"],
}
"""What every format can enforce (qwen3_coder's string values have no length limits)."""
TOOLS = [
    ToolSpec(name="lookup", parameters=ARGUMENTS),
    ToolSpec(name="note", parameters={"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}),
]
MARKUP = ["\n</parameter>\n", "</function>", "</tool_call>", ")]", "<|tool_call_end|>"]
"""What ends reasoning, values and calls in the families' markup (the grammar allows it where it may come)."""


@functools.cache
def logits_of(family: str) -> np.ndarray:
    """Per token: 8 for what closes a string or a container and for raw control characters, 10 for the markup's
    tokens, 4 for other short punctuation and digits, 0 for the rest; 12 for the end of the sequence and 16 for
    the think-end marker (reasoning is free: the grammar waits for it)."""
    engine = family_features(family)
    tokenizer = engine.tokenizer
    out = np.zeros(VOCAB_SIZE, dtype=np.float32)
    short = set(",:.-0123456789 \n")
    for ident, text in enumerate(tokenizer.batch_decode([[i] for i in range(VOCAB_SIZE)])):
        if not 0 < len(text) <= 3:
            continue
        if set(text) & set('"}]'):
            out[ident] = 8.0
        elif any(ord(c) < 32 or c == "\x7f" for c in text):
            out[ident] = 8.0
        elif set(text) <= short:
            out[ident] = 4.0
    for text in MARKUP:
        out[tokenizer.encode(text, add_special_tokens=False)] = 10.0
    out[engine.grammars.eos_ids] = 12.0
    if engine.markers is not None:
        out[list(engine.markers.end_ids)] = 16.0
    return out


@functools.cache
def levels_of(family: str) -> list[tuple[float, np.ndarray]]:
    logits = logits_of(family)
    return [(float(level), np.flatnonzero(logits == level)) for level in np.unique(logits[np.isfinite(logits)])]


def sample(family: str, request: InferenceRequest, rng: np.random.Generator, *, masked: bool = True) -> Any:
    """One generation: the merged Token of its text, or None when it did not end within MAX_TOKENS (unmasked:
    the text of MAX_TOKENS tokens, the end of the sequence never drawn)."""
    import mlx.core as mx

    engine: EngineFeatures = family_features(family)
    prompt = engine.prompt(request)
    prepared = engine.prepare(request, prompt)
    assert prepared.grammar is not None
    base = logits_of(family).copy()
    eos = engine.grammars.eos_ids
    if not masked:
        base[eos] = -np.inf
    logits = mx.array(base[None, :])
    tokens = list(prompt)
    for _ in range(MAX_TOKENS):
        allowed = np.isfinite(np.array(prepared.grammar(mx.array(tokens), logits)[0]) if masked else base)
        token = draw(levels_of(family), allowed, rng)
        if token in eos:
            text = engine.tokenizer.decode(tokens[len(prompt) :])
            frame = prepared.frame(text, len(tokens) - len(prompt), final=True)
            return merge_tokens([frame], 0) if frame is not None else None
        tokens.append(token)
    return engine.tokenizer.decode(tokens[len(prompt) :]) if not masked else None


def draw(levels: list[tuple[float, np.ndarray]], allowed: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from softmax(logits) over the allowed ones (``levels``: the logits' few values, each with
    its tokens)."""
    candidates = [ids[allowed[ids]] for _, ids in levels]
    weights = np.array([len(ids) * np.exp(level) for (level, _), ids in zip(levels, candidates, strict=True)])
    chosen = candidates[int(rng.choice(len(levels), p=weights / weights.sum()))]
    return int(rng.choice(chosen))


def chat(**fields: Any) -> InferenceRequest:
    messages = [ChatMessage(role="user", content="go")]
    return InferenceRequest(request_id="r", model="m", messages=messages, **fields)


def finished(family: str, request: InferenceRequest, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    outputs = [out for out in (sample(family, request, rng) for _ in range(RUNS)) if out is not None]
    assert len(outputs) >= RUNS // 2, f"only {len(outputs)} of {RUNS} generations ended: too few to say anything"
    return outputs


@pytest.mark.parametrize(
    ("family", "kind"),
    [("plain", "json_object"), ("plain", "json_schema"), ("qwen3", "json_schema"), ("qwen3_open", "json_schema")],
)
def test_sampled_json_is_strict_and_follows_its_schema(family: str, kind: str) -> None:
    schema = SCHEMA if kind == "json_schema" else {"type": "object"}
    request = chat(response_format=ResponseFormat(type=kind, schema=SCHEMA if kind == "json_schema" else None))  # type: ignore[arg-type]
    for out in finished(family, request, seed=7):
        jsonschema.validate(json.loads(out.text), schema)  # strict: no raw control character inside a string


@pytest.mark.parametrize("family", ["qwen3", "mistral", "qwen3_coder", "pythonic", "plain"])
def test_sampled_forced_calls_parse_to_strict_json_arguments(family: str) -> None:
    schemas = {tool.name: tool.parameters for tool in TOOLS}
    for out in finished(family, chat(tools=TOOLS, tool_choice="required"), seed=11):
        assert out.text == "" and out.tool_calls, out
        for call in out.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_unmasked_the_same_sampler_writes_raw_control_characters() -> None:
    """So the checks above can fail: it is the grammar that keeps these characters out of the strings."""
    rng = np.random.default_rng(3)
    request = chat(response_format=ResponseFormat(type="json_object"))
    texts = [sample("plain", request, rng, masked=False) for _ in range(5)]
    assert all(any(ord(c) < 32 and c not in "\n" for c in text) for text in texts)
