"""Random requests for ``bench fuzz``: every field the mlx engine reads, valid values and invalid ones mixed.

The engine is asked directly (no controller validates first), so values the API would refuse reach it too:
sampling parameters out of range, ``logit_bias`` ids outside the vocabulary and values outside -100..100,
``max_tokens`` of 0 or far past the context window, unsupported schemas, tool choices naming no tool,
reasoning on models that cannot reason, odd template arguments, continuations of moved streams. Each of those
must end as a request error, never as an engine fault. Outputs stay short (``max_tokens`` ≤ 24, ≤ 64 with tools or
a schema, or a value no context window holds), so a fuzz of thousands of requests runs in minutes on the tiny
fixtures.
"""

from __future__ import annotations

import json
import random
from typing import Any, Literal

import msgspec

from mlxcluster.bench.strict_json import WEATHER
from mlxcluster.protocol import (
    ChatMessage,
    InferenceRequest,
    ReasoningParams,
    ResponseFormat,
    SaidPart,
    SamplingParams,
    ToolCall,
    ToolSpec,
)

WORDS = (
    "the cat sat on a mat while rain fell over old town bridges and quiet rivers ran north past mills "
    "seven golden apples { } [ ] \" ' : , < > / \\ café naïve 東京 🙂 \n \t"
).split(" ")
STOPS = ("e", " the", "\n", "}", "ab", "é", "<", "</tool_call>", "a very long stop string that never comes", " ")
SCHEMAS: tuple[dict[str, Any], ...] = (
    {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "n"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
    {"type": "string", "maxLength": 6},
    {"type": "object"},
    {"type": "nonsense"},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}, "required": ["when"]},
    {"$ref": "#/$defs/missing"},
)
"""Bounded schemas (a random model ends inside them), an open one, and some that cannot compile."""
TOOLS: tuple[ToolSpec, ...] = (
    WEATHER,
    ToolSpec(
        name="lookup",
        description="Look a word up",
        parameters={
            "type": "object",
            "properties": {"word": {"enum": ["cat", "mat"]}},
            "required": ["word"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(name="ping", description="No arguments", parameters={"type": "object", "properties": {}}),
    ToolSpec(name="loose", description="Any arguments", parameters=None),
)
EFFORTS = ("", "none", "minimal", "low", "medium", "high", "extreme")
REASONING_PARAMS = ("reasoning_effort", "reasoning.effort", "thinking")
FAR_PAST_ANY_CONTEXT = 10**7
INVALID_VALUES: dict[str, Any] = {
    "temperature": -0.5,
    "top_p": 1.5,
    "top_k": -1,
    "min_p": -0.1,
    "repetition_penalty": -1.0,
}
INVALID_SAMPLING = (*INVALID_VALUES, "logit_bias", "logit_bias")


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _sampling(rng: random.Random, vocab: int) -> SamplingParams:
    """Valid values mostly; now and then one field out of range (each alone, so the others still run)."""
    bias: dict[int, float] | None = None
    if rng.random() < 0.3:
        bias = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randint(1, 4))}
    params = SamplingParams(
        temperature=rng.choice((0.0, 0.0, 0.2, 0.7, 1.0, 1.3, 2.0, rng.uniform(0, 2), 1e30)),
        top_p=rng.choice((1.0, 1.0, 0.9, 0.5, 0.01, 0.0)),
        top_k=rng.choice((0, 0, 1, 5, 40, 1000, 10**6)),
        min_p=rng.choice((0.0, 0.0, 0.05, 0.3, 1.0)),
        repetition_penalty=rng.choice((1.0, 1.0, 1.1, 1.5, 0.5, 0.0)),
        presence_penalty=rng.choice((0.0, 0.0, 0.5, -0.5, 2.0, -2.0, 3.0)),
        frequency_penalty=rng.choice((0.0, 0.0, 0.5, -0.5, 2.0, -2.0, 3.0)),
        logit_bias=bias,
    )
    if rng.random() < 0.15:
        invalid = rng.choice(INVALID_SAMPLING)
        if invalid == "logit_bias":
            token = rng.choice((vocab, vocab + 100, -1, 10**9)) if rng.random() < 0.6 else rng.randrange(vocab)
            value = rng.uniform(-100, 100) if not 0 <= token < vocab else rng.choice((150.0, -1000.0))
            return msgspec.structs.replace(params, logit_bias={**(bias or {}), token: value})
        return msgspec.structs.replace(params, **{invalid: INVALID_VALUES[invalid]})
    return params


def _messages(rng: random.Random) -> list[ChatMessage]:
    messages = []
    if rng.random() < 0.5:
        messages.append(ChatMessage(role="system", content=_text(rng, 1, 30)))
    if rng.random() < 0.2:  # a tool call and its result in the history
        call = ToolCall(name=rng.choice(TOOLS).name, arguments=json.dumps({"city": "Oslo", "days": 2}), id="call_1")
        messages += [
            ChatMessage(role="user", content=_text(rng, 1, 10)),
            ChatMessage(role="assistant", content=rng.choice(("", _text(rng, 1, 5))), tool_calls=[call]),
            ChatMessage(role="tool", content=_text(rng, 1, 10), tool_call_id="call_1"),
        ]
    if rng.random() < 0.15:  # an earlier turn
        messages += [
            ChatMessage(role="user", content=_text(rng, 1, 10)),
            ChatMessage(role="assistant", content=_text(rng, 1, 10)),
        ]
    messages.append(ChatMessage(role="user", content=_text(rng, 1, 40)))
    return messages


def _reasoning(rng: random.Random) -> ReasoningParams | None:
    if rng.random() < 0.7:
        return None
    return ReasoningParams(
        enabled=rng.choice((None, True, False)),
        effort=rng.choice(EFFORTS),
        budget_tokens=rng.choice((None, 0, 4, 16)),
        param=rng.choice(REASONING_PARAMS),
    )


def _template_kwargs(rng: random.Random) -> dict[str, Any] | None:
    return rng.choice(
        (None, None, None, {"enable_thinking": False}, {"enable_thinking": True}, {"unknown_key": 1},
         {"enable_thinking": "yes"})
    )  # fmt: skip


def _said(rng: random.Random) -> tuple[str | None, list[SaidPart] | None]:
    """A moved stream's continuation now and then: content, reasoning, or a finished call."""
    if rng.random() < 0.93:
        return None, None
    content = _text(rng, 1, 6)
    parts = [SaidPart(kind="content", text=content)]
    if rng.random() < 0.4:
        parts.insert(0, SaidPart(kind="reasoning", text=_text(rng, 1, 6)))
    if rng.random() < 0.3:
        parts.append(SaidPart(kind="tool_call", call=ToolCall(name="ping", arguments="{}", id="call_9")))
    return content, parts


def fuzz_request(rng: random.Random, index: int, vocab: int) -> InferenceRequest:
    """One random request (``vocab``: the model's logits width, around which ``logit_bias`` ids are drawn)."""
    fields: dict[str, Any] = {}
    if rng.random() < 0.15:
        fields["prompt"] = _text(rng, 1, 30)
    else:
        fields["messages"] = _messages(rng)
        fields["reasoning"] = _reasoning(rng)
        fields["chat_template_kwargs"] = _template_kwargs(rng)
        if rng.random() < 0.35:
            tools = rng.sample(TOOLS, rng.randint(1, 3))
            if rng.random() < 0.3:
                tools = [ToolSpec(t.name, t.description, t.parameters, strict=True) for t in tools]
            choice = rng.choice(("auto", "auto", "none", "required", "function"))
            named = rng.choice((tools[0].name, "missing_tool")) if choice == "function" else None
            fields.update(tools=tools, tool_choice=choice, tool_name=named, parallel_tool_calls=rng.random() < 0.5)
    if rng.random() < 0.3:
        kind: Literal["text", "json_object", "json_schema"] = rng.choice(
            ("json_object", "json_schema", "json_schema", "text")
        )
        schema = rng.choice(SCHEMAS) if kind == "json_schema" else None
        fields["response_format"] = ResponseFormat(type=kind, schema=schema)
    fields["continuation"], fields["said"] = _said(rng)
    constrained = fields.get("tools") is not None or fields.get("response_format") is not None
    longest = 64 if constrained else 24  # room for a forced call or a schema's object to end
    max_tokens = rng.randint(1, longest) if rng.random() < 0.95 else rng.choice((0, FAR_PAST_ANY_CONTEXT))
    if rng.random() < 0.1:
        fields["max_tokens_auto"] = True
        max_tokens = rng.randint(1, 24)
    if rng.random() < 0.3:
        fields["logprobs"] = True
        fields["top_logprobs"] = rng.randint(0, 20)
    return InferenceRequest(
        request_id=f"fuzz-{index}",
        model="fuzz",
        sampling=_sampling(rng, vocab),
        max_tokens=max_tokens,
        stop=rng.sample(STOPS, rng.randint(0, 3)) if rng.random() < 0.3 else [],
        seed=rng.choice((None, rng.randrange(2**32), 0, 2**63 - 1)),
        **fields,
    )


def injected_request(index: int, seed: int) -> InferenceRequest:
    """A plain request carrying the seed whose sampler :func:`~mlxcluster.bench.fuzz.injected_fault` breaks."""
    return InferenceRequest(
        request_id=f"fuzz-{index}-injected",
        model="fuzz",
        messages=[ChatMessage(role="user", content="This request's sampler raises.")],
        sampling=SamplingParams(temperature=0.7),
        max_tokens=8,
        seed=seed,
    )
