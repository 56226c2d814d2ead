"""The family fixtures of ``families.py``: what mlx-lm infers from them, what their templates render, how they
generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from families import FAMILIES, FamilyModels
from jinja2 import TemplateError
from mlx_lm import load, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

NAMES = list(FAMILIES)
RANDOM_NAMES = [name for name, family in FAMILIES.items() if not family.coherent]
TOOL_NAMES = [name for name, family in FAMILIES.items() if family.tools_in_template]
PARSER_NAMES = [name for name, family in FAMILIES.items() if family.tool_parser is not None]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = {"role": "user", "content": "What is the capital of France?"}
CALL_HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        ],
    },
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "tool", "content": "rainy, 12 C"},
]

Loaded = tuple[Any, Any]  # (model, TokenizerWrapper)


@pytest.fixture(scope="module")
def loaded(family_models: FamilyModels) -> Callable[[str], Loaded]:
    """``mlx_lm.load`` of a family, once per module."""
    cache: dict[str, Loaded] = {}

    def get(name: str) -> Loaded:
        if name not in cache:
            cache[name] = load(str(family_models.path(name)))
            print(f"{name}: built in {family_models.build_seconds[name]:.2f}s")
        return cache[name]

    return get


def render(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """The template's text (through mlx-lm's wrapper, which passes ``enable_thinking`` when not given)."""
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return text


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_its_config(name: str, family_models: FamilyModels, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    model, _ = loaded(name)
    path = family_models.path(name)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family.model_type
    if family.nested_config:
        assert "vocab_size" not in config and "max_position_embeddings" not in config
        assert config["text_config"]["vocab_size"] == 49152 and config["text_config"]["max_position_embeddings"] > 0
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if family.coherent:  # the demo's own config and weights, whichever variant it is
        assert config == json.loads((family_models.demo_model / "config.json").read_text())
    elif family.quantized_bits is None:
        assert "quantization" not in config and not quantized
    else:
        assert config["quantization"] == {"group_size": 64, "bits": family.quantized_bits, "mode": "affine"}
        assert quantized and all(m.bits == family.quantized_bits for m in quantized)
    assert (path / "model.safetensors").is_symlink() == family.coherent


@pytest.mark.parametrize("name", NAMES)
def test_mlx_lm_infers_parser_thinking_and_eos(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    _, tokenizer = loaded(name)
    parser = tokenizer.tool_parser
    assert (parser.__module__.rsplit(".", 1)[-1] if parser else None) == family.tool_parser
    assert tokenizer.has_thinking == family.thinking
    assert (tokenizer.think_start, tokenizer.think_end) == (family.think_start, family.think_end)
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == (
        (family.tool_call_start, family.tool_call_end) if parser else (None, None)
    )
    assert tokenizer.convert_tokens_to_ids(family.eos) in tokenizer.eos_token_ids
    for token_id, token in enumerate(family.special_tokens):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    bos = [tokenizer.convert_tokens_to_ids(family.bos)] if family.bos else []
    assert tokenizer.encode("hi") == bos + tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("name", NAMES)
def test_template_renders_chat_and_system(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    _, tokenizer = loaded(name)
    plain = render(tokenizer, [QUESTION])
    assert plain.startswith(family.bos or "")
    assert plain.count("What is the capital of France?") == 1
    with_system = render(tokenizer, [{"role": "system", "content": "Answer in French."}, QUESTION])
    assert with_system.count("Answer in French.") == 1
    if name == "gemma3":  # no system role: folded into the first user turn
        assert "<start_of_turn>user\nAnswer in French.\n\nWhat is the capital" in with_system
        assert plain.endswith("<end_of_turn>\n<start_of_turn>model\n")
    history = [QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    rendered = render(tokenizer, history)
    assert rendered.index("Paris.") < rendered.index("And Spain?")
    assert family.eos in rendered[rendered.index("Paris.") :]


@pytest.mark.parametrize("name", NAMES)
def test_template_lists_tools(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    _, tokenizer = loaded(name)
    text = render(tokenizer, [QUESTION], tools=[WEATHER_TOOL])
    assert ("get_weather" in text) == family.tools_in_template
    markers = {
        "qwen3": ("<tools>\n", "\n</tools>"), "qwen3_demo": ("<tools>\n", "\n</tools>"),
        "qwen3_next": ("<tools>\n", "\n</tools>"), "mistral": ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"),
        "llama3": ("<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions", "\n\nWhat is"),
    }  # fmt: skip
    if name in markers:
        opening, closing = markers[name]
        listed = text[text.index(opening) + len(opening) : text.index(closing)]
        expected = [WEATHER_TOOL] if name == "mistral" else WEATHER_TOOL  # Mistral lists them as one array
        assert json.loads(listed.split("\n\n")[-1] if name == "llama3" else listed) == expected
    if name == "llama3":
        assert "Environment: ipython" in text


@pytest.mark.parametrize("name", NAMES)
def test_template_renders_call_history(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    _, tokenizer = loaded(name)
    if not family.tools_in_template:  # Gemma 3's template refuses roles it does not know
        with pytest.raises(TemplateError):
            render(tokenizer, CALL_HISTORY, tools=[WEATHER_TOOL])
        return
    text = render(tokenizer, CALL_HISTORY, tools=[WEATHER_TOOL])
    assert text.index('"Paris"') < text.index("sunny, 21 C")
    if family.tool_call_start == "<tool_call>":  # both results in one user turn
        assert text.count("<|im_start|>user") == 2
        assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>\n<tool_response>\nrainy" in text
    if name == "mistral":
        assert "[TOOL_RESULTS]sunny, 21 C[/TOOL_RESULTS][TOOL_RESULTS]rainy, 12 C[/TOOL_RESULTS]" in text
    if name == "llama3":  # the bare JSON call with "parameters"; a string result is quoted, as in Llama 3.1's own
        call = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
        assert json.loads(call) == {"name": "get_weather", "parameters": {"city": "Paris"}}
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n"sunny, 21 C"<|eot_id|>' in text


@pytest.mark.parametrize("name", PARSER_NAMES)
def test_mlx_lm_parses_the_rendered_call(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    _, tokenizer = loaded(name)
    text = render(tokenizer, CALL_HISTORY[:2])
    assert family.tool_call_start is not None and family.tool_call_end is not None
    body = text.split(family.tool_call_start, 1)[1].split(family.tool_call_end or family.eos, 1)[0]
    call = tokenizer.tool_parser(body, [WEATHER_TOOL])
    assert {key: call[key] for key in ("name", "arguments")} == {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize("name", NAMES)
def test_thinking_switch(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    _, tokenizer = loaded(name)
    on = render(tokenizer, [QUESTION], enable_thinking=True)
    off = render(tokenizer, [QUESTION], enable_thinking=False)
    if not family.thinking:
        assert on == off
        return
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n<think>\n" if family.opens_think else "<|im_start|>assistant\n")
    undefined = tokenizer._tokenizer.apply_chat_template([QUESTION], tokenize=False, add_generation_prompt=True)
    assert undefined == on
    reasoned = [QUESTION, {"role": "assistant", "content": "<think>\nFrance... Paris.\n</think>\n\nParis."}]
    later = render(tokenizer, [*reasoned, {"role": "user", "content": "And Spain?"}])
    assert "France..." not in later and "<|im_start|>assistant\nParis.<|im_end|>" in later
    current = render(tokenizer, reasoned, add_generation_prompt=False)  # the last turn keeps its reasoning
    assert "<think>\nFrance... Paris.\n</think>\n\nParis." in current


@pytest.mark.parametrize("name", NAMES)
def test_prompt_cache_kinds(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    model, tokenizer = loaded(name)
    cache = make_prompt_cache(model)
    assert {type(c).__name__ for c in cache} == family.cache_kinds
    if family.sliding_window is None:
        return
    prompt = tokenizer.encode(" ".join(["word"] * 3 * family.sliding_window), add_special_tokens=False)
    model(mx.array([prompt]), cache=cache)
    model(mx.array([[prompt[-1]]]), cache=cache)
    seen = len(prompt) + 1
    held = {type(c).__name__: (c.offset, c.size()) for c in cache}
    assert held == {"RotatingKVCache": (seen, family.sliding_window), "KVCache": (seen, seen)}
    assert all(c.keys.shape[2] == family.sliding_window for c in cache if type(c).__name__ == "RotatingKVCache")


def greedy(model: Any, tokenizer: Any, prompt: list[int], max_tokens: int = 8) -> list[int]:
    return [response.token for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_greedy_is_deterministic_and_printable(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    model, tokenizer = loaded(name)
    prompt = tokenizer.apply_chat_template([QUESTION], add_generation_prompt=True)
    tokens = greedy(model, tokenizer, prompt)
    assert tokens == greedy(model, tokenizer, prompt)
    assert len(tokens) == 8 and min(tokens) >= len(family.special_tokens)
    assert all(tokenizer.decode([t]).isascii() and tokenizer.decode([t]).isprintable() for t in tokens)
    other = tokenizer.apply_chat_template([{"role": "user", "content": "Something else"}], add_generation_prompt=True)
    assert greedy(model, tokenizer, other) != tokens  # the output depends on the input


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_special_tokens_are_banned_by_a_wide_margin(name: str, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    model, tokenizer = loaded(name)
    prompt = tokenizer.apply_chat_template(CALL_HISTORY[:1], add_generation_prompt=True)
    logits = model(mx.array([prompt]))[0]  # every position of the prompt
    special = len(family.special_tokens)
    margin = mx.max(logits[:, special:], axis=-1) - mx.max(logits[:, :special], axis=-1)
    assert mx.min(margin).item() > 50  # so sampling at any usual temperature never picks one


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_eos_first_ends_at_once(name: str, family_models: FamilyModels, loaded: Callable[[str], Loaded]) -> None:
    family = FAMILIES[name]
    _, tokenizer = loaded(name)  # the variant's tokenizer files are the same
    model, _ = load_model(family_models.path(name, eos_first=True))
    print(f"{name}-eos: built in {family_models.build_seconds[name + '-eos']:.2f}s")
    prompt = tokenizer.apply_chat_template([QUESTION], add_generation_prompt=True)
    assert greedy(model, tokenizer, prompt) == [tokenizer.convert_tokens_to_ids(family.eos)]


def test_builds_are_the_same_in_another_process(family_models: FamilyModels, tmp_path: Path) -> None:
    names = ["qwen3_next", "mistral"]  # the seeded init is one mechanism; these two are MoE and quantized
    script = (
        "import sys; from pathlib import Path; from families import build_family\n"
        "for name in sys.argv[3:]: build_family(name, Path(sys.argv[1]), demo_model=Path(sys.argv[2]))\n"
    )
    tests_dir = str(Path(__file__).parent)
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(family_models.demo_model), *names],
        check=True, timeout=120, env={**os.environ, "PYTHONPATH": tests_dir},
    )  # fmt: skip
    for name in names:
        for file in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / name / file).read_bytes() == (family_models.path(name) / file).read_bytes(), file


@pytest.mark.model
def test_qwen3_demo_answers_paris(loaded: Callable[[str], Loaded]) -> None:
    model, tokenizer = loaded("qwen3_demo")
    prompt = tokenizer.apply_chat_template([QUESTION], add_generation_prompt=True, enable_thinking=False)
    text = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=12))
    assert "Paris" in text
