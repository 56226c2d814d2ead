"""The agent features' parts without a model: output shaping (reasoning, tool calls, held markers), grammars
(compiled once, masks that only allow valid JSON, EOS exactly when complete) on the demo model's tokenizer, and
the control plane through the echo engine (refusals with the field named, x-api-key, Anthropic's error shape).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from cluster_harness import Cluster, RunningController, single_worker_cluster, wait_until, with_sections

from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import InferenceRequest, ResponseFormat, Token, ToolSpec
from mlxcluster.worker.grammar import GrammarCompiler, GrammarError, GrammarLogitsProcessor, request_grammar
from mlxcluster.worker.output import OutputShaper, merge_tokens
from mlxcluster.worker.tool_formats import fallback_format

THINK = ("<think>", "</think>")
TOOLS = fallback_format()


def shape(shaper: OutputShaper, pieces: list[str]) -> list[Token]:
    frames = [shaper.frame(piece, 1, final=i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    return [f for f in frames if f is not None]


def test_reasoning_goes_apart_even_when_markers_are_split() -> None:
    frames = shape(OutputShaper(think=THINK), ["<thi", "nk>plan ", "it</th", "ink>Answer", "."])
    merged = merge_tokens(frames, 0)
    assert merged.reasoning == "plan it"
    assert merged.text == "Answer."
    assert "<" not in merged.text


def test_prompt_that_opened_the_thinking_block() -> None:
    merged = merge_tokens(shape(OutputShaper(think=THINK, in_reasoning=True), ["hmm", "</think>", "ok"]), 0)
    assert (merged.reasoning, merged.text) == ("hmm", "ok")


def test_tool_calls_are_parsed_and_a_bad_one_is_shown() -> None:
    call = '<tool_call>\n{"name": "w", "arguments": {"city": "Paris"}}\n</tool_call>'
    frames = shape(
        OutputShaper(tools=TOOLS), ["Sure. ", call[:9], call[9:30], call[30:], "<tool_call>{oops</tool_call>"]
    )
    merged = merge_tokens(frames, 0)
    (parsed,) = merged.tool_calls
    assert parsed.name == "w" and json.loads(parsed.arguments) == {"city": "Paris"} and parsed.id.startswith("call_")
    assert merged.text == "Sure. <tool_call>{oops</tool_call>"


def test_one_call_only_when_parallel_calls_are_off() -> None:
    call = '<tool_call>{"name": "%s", "arguments": {}}</tool_call>'
    merged = merge_tokens(shape(OutputShaper(tools=TOOLS, parallel=False), [call % "a", call % "b"]), 0)
    assert [c.name for c in merged.tool_calls] == ["a"]
    merged = merge_tokens(shape(OutputShaper(tools=TOOLS), [call % "a", call % "b"]), 0)
    assert [c.name for c in merged.tool_calls] == ["a", "b"]


def test_an_unclosed_call_at_the_end_is_still_parsed() -> None:
    merged = merge_tokens(shape(OutputShaper(tools=TOOLS), ['<tool_call>{"name": "f", "arguments": {}}']), 0)
    assert [c.name for c in merged.tool_calls] == ["f"] and merged.text == ""


def test_a_lone_angle_bracket_is_released_at_the_end() -> None:
    merged = merge_tokens(shape(OutputShaper(think=THINK, tools=TOOLS), ["a <", "b", " <t"]), 0)
    assert merged.text == "a <b <t"


# --- grammars on the demo model's tokenizer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    from transformers import AutoTokenizer

    from mlxcluster.models.demo import ensure_demo_model
    from mlxcluster.models.registry import default_models_dir

    models_dir = Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_demo_model(models_dir)))
    return GrammarCompiler(tokenizer, 49152, [tokenizer.convert_tokens_to_ids("<|im_end|>")])


def request(**fields: object) -> InferenceRequest:
    return InferenceRequest(request_id="r", model="m", prompt="x", **fields)  # type: ignore[arg-type]


def allowed(processor: GrammarLogitsProcessor, tokens: list[int]) -> np.ndarray:
    import mlx.core as mx

    out = processor(mx.array(tokens), mx.zeros((1, 49152)))
    return np.isfinite(np.array(out[0]))


def test_a_schema_is_compiled_once(compiler: GrammarCompiler) -> None:
    grammar = request_grammar(
        request(response_format=ResponseFormat(type="json_schema", schema={"type": "boolean"})),
        fallback_format(),
        compiler.vocab(),
    )
    assert grammar is not None
    before = compiler.compiled
    first, second = compiler.matcher(grammar), compiler.matcher(grammar)
    assert compiler.compiled == before + 1 and first is not second


def test_the_mask_allows_only_the_schema_and_eos_when_done(compiler: GrammarCompiler) -> None:
    grammar = request_grammar(
        request(response_format=ResponseFormat(type="json_schema", schema={"enum": ["yes", "no"]})),
        fallback_format(),
        compiler.vocab(),
    )
    assert grammar is not None
    processor = GrammarLogitsProcessor(compiler.matcher(grammar), 49152, compiler.eos_ids)
    tokenizer = compiler._hf_tokenizer
    eos = compiler.eos_ids[0]
    prompt = [1, 2, 3]
    first = allowed(processor, prompt)
    quote = tokenizer.encode('"', add_special_tokens=False)[0]
    assert first[quote] and not first[eos] and first.sum() < 10
    sequence = prompt + [quote]
    for piece in tokenizer.encode('yes"', add_special_tokens=False):
        assert allowed(processor, sequence)[piece]
        sequence.append(piece)
    final = allowed(processor, sequence)
    assert final[eos] and final.sum() == 1


def test_a_grammar_judges_drafts_and_forgets_the_rejected_ones(compiler: GrammarCompiler) -> None:
    """Speculative decoding's use of a grammar: how much of a draft it allows, and a rollback after a partly
    accepted one leaves it where plain decoding of the accepted tokens would."""
    grammar = request_grammar(
        request(response_format=ResponseFormat(type="json_schema", schema={"enum": ["yes", "no"]})),
        fallback_format(),
        compiler.vocab(),
    )
    assert grammar is not None
    processor = GrammarLogitsProcessor(compiler.matcher(grammar), 49152, compiler.eos_ids)
    reference = GrammarLogitsProcessor(compiler.matcher(grammar), 49152, compiler.eos_ids)
    tokenizer = compiler._hf_tokenizer
    quote = tokenizer.encode('"', add_special_tokens=False)[0]
    yes = tokenizer.encode('yes"', add_special_tokens=False)
    wrong = tokenizer.encode("maybe", add_special_tokens=False)
    prompt = [1, 2, 3]
    allowed(processor, prompt)
    allowed(reference, prompt)
    assert processor.valid_prefix([quote, *yes]) == 1 + len(yes)
    assert processor.valid_prefix([quote, *wrong]) == 1  # a forbidden token ends the draft
    assert processor.valid_prefix([]) == 0
    sequence = [*prompt, quote]
    allowed(processor, sequence)  # the pending token
    for piece in yes:  # drafted positions, all consumed
        sequence.append(piece)
        allowed(processor, sequence)
    assert len(yes) >= 2
    processor.rollback(len(yes) - 1)  # only the first drafted token was accepted
    accepted = [*prompt, quote, yes[0]]
    for step in ([*prompt, quote], accepted, [*accepted, yes[1]]):  # plain decoding of the same tokens
        mask = allowed(reference, step)
    assert (allowed(processor, [*accepted, yes[1]]) == mask).all()
    assert mask[compiler.eos_ids[0]] and mask.sum() == 1  # after 'yes"' only the end is allowed


def test_forced_tools_need_a_known_name(compiler: GrammarCompiler) -> None:
    tools = [ToolSpec(name="w", parameters={"type": "object"})]
    with pytest.raises(GrammarError, match="not among the tools") as refused:
        request_grammar(
            request(tools=tools, tool_choice="function", tool_name="x"), fallback_format(), compiler.vocab()
        )
    assert refused.value.param == "tool_choice"
    grammar = request_grammar(request(tools=tools, tool_choice="required"), fallback_format(), compiler.vocab())
    assert grammar is not None and '"<tool_call>"' in grammar and "%json" in grammar


@pytest.mark.parametrize(
    ("arguments", "accepted"),
    [('{"city": "P"}', True), ('{"city":"P"}', False), ('{ "city": "P" }', False), ('{"city": "P"} ', False)],
)
def test_a_forced_tool_call_is_json_as_json_dumps_writes_it(
    compiler: GrammarCompiler, arguments: str, accepted: bool
) -> None:
    """No free blanks (a small model at temperature 1 would spend max_tokens on them), and the separators the
    model saw in its prompt (``tojson``), so a call re-rendered from its parse reads as the model wrote it."""
    tools = [ToolSpec(name="w", parameters={"type": "object", "properties": {"city": {"type": "string"}}})]
    grammar = request_grammar(request(tools=tools, tool_choice="required"), fallback_format(), compiler.vocab())
    assert grammar is not None
    text = f'<tool_call>\n{{"name": "w", "arguments": {arguments}}}\n</tool_call>'
    matcher = compiler.matcher(grammar)
    consumed = matcher.consume_tokens(compiler._hf_tokenizer.encode(text, add_special_tokens=False))
    assert (consumed and matcher.is_accepting()) is accepted


# --- the control plane (echo engine) ---------------------------------------------------------------------------


@pytest.fixture
async def controller(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[RunningController]:
    async with single_worker_cluster(cluster_config) as cluster:
        yield cluster.controller


async def post(controller: RunningController, path: str, body: object, **headers: str) -> tuple[int, dict]:
    async with controller.session().post(controller.url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi there"}]}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy"}),
        ("store", True),
        ("prediction", {"type": "content", "content": "x"}),
        ("modalities", ["text", "audio"]),
        ("service_tier", "flex"),
        ("reasoning_effort", "extreme"),
        ("chat_template_kwargs", ["enable_thinking", False]),
        ("logit_bias", {"\u00b2": 1}),
        ("n", 3),
        ("top_logprobs", 2),
    ],
)
async def test_chat_refuses_what_it_does_not_do(controller: RunningController, field: str, value: object) -> None:
    status, body = await post(controller, "/v1/chat/completions", {**CHAT, field: value})
    assert status == 400, body
    assert body["error"]["param"] == field


async def test_echo_refuses_to_pretend_to_enforce_a_schema(controller: RunningController) -> None:
    status, body = await post(controller, "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}})
    assert status == 400 and "cannot enforce" in body["error"]["message"]


async def test_echo_logprobs_are_certain(controller: RunningController) -> None:
    status, body = await post(controller, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 1})
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["hi", " there"] and all(e["logprob"] == 0.0 for e in content)


async def test_responses_on_echo_and_its_refusals(controller: RunningController) -> None:
    status, body = await post(controller, "/v1/responses", {"model": "echo", "input": "hello world"})
    assert status == 200, body
    assert body["output"][0]["content"][0]["text"] == "hello world" and body["status"] == "completed"
    for field, value in (("previous_response_id", "resp_1"), ("store", True), ("background", True)):
        status, body = await post(controller, "/v1/responses", {"model": "echo", "input": "x", field: value})
        assert status == 400 and body["error"]["param"] == field, body
    status, body = await post(controller, "/v1/responses", {"model": "echo", "input": [{"type": "web_search_call"}]})
    assert status == 400 and body["error"]["param"] == "input[0].type"


async def test_anthropic_errors_are_in_anthropic_shape(controller: RunningController) -> None:
    status, body = await post(controller, "/v1/messages", {"model": "echo", "messages": []})
    assert status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    ok = {"model": "echo", "max_tokens": 8, "system": "sys", "messages": [{"role": "user", "content": "hey you"}]}
    status, body = await post(controller, "/v1/messages", ok)
    assert (
        status == 200 and body["content"] == [{"type": "text", "text": "hey you"}] and body["stop_reason"] == "end_turn"
    )


async def test_x_api_key_is_accepted_like_bearer(cluster_config: Config, nats_server: EmbeddedNatsServer) -> None:
    config = with_sections(cluster_config, controller={"api_keys": ["sekret"]})
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller()
        body = {"model": "echo", "max_tokens": 8, "messages": [{"role": "user", "content": "hey"}]}

        async def served() -> bool:
            status, _ = await post(controller, "/v1/messages", body, **{"x-api-key": "sekret"})
            return status == 200  # 404 until the worker's registration is seen

        await wait_until(served, what="the keyed request served")
        status, _ = await post(controller, "/v1/messages", body, **{"x-api-key": "wrong"})
        assert status == 401
        status, _ = await post(controller, "/v1/messages", body)
        assert status == 401
