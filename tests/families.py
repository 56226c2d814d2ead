"""Tiny offline fixtures of the model families people run: Qwen3, Qwen3-Next, Gemma 3, Mistral 3, Llama 3.1.

Each fixture is an mlx-lm model dir built in about a second from mlx-lm's own model class with seeded random
weights (or, for ``qwen3_demo``, the demo model's real weights), the demo model's byte-level BPE tokenizer with
ids 0-16 renamed to the family's special tokens, and a chat template written from the family's documented format
(``family_templates.py``). Nothing is downloaded.

Random weights are shaped so that output is gibberish but printable: the embedding's hidden dim 0 is a constant
that no layer writes to (row 0 of every projection back into the residual stream is zero), the final norm scales
it up, and column 0 of the untied LM head turns it into a per-token bias: -10 bans special and non-printable
tokens (and the end-of-turn token unless ``eos_first``), +10 makes the end-of-turn token win at once.

Deliberate departures from the real families: every fixture uses SmolLM2's byte-level BPE (Gemma's real one is
SentencePiece), untied embeddings, float32 weights and 49,152 tokens.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import family_templates

SPECIAL_SLOTS = 17  # ids 0-16 of the demo tokenizer are its added tokens
HIDDEN = 64
BIAS_DIM_VALUE = 4.0  # hidden dim 0 of every embedding row
EMBED_SCALE = 8.0  # the other dims of the random embedding, to a standard deviation of about 1
FINAL_NORM_GAIN = 10.0  # the final norm's weight on dim 0
BAN = -10.0
HEAD_SCALE = 0.5

# Qwen's own order (tool markers before think markers). It matters to qwen3_demo: measured, SmolLM2's weights
# still answer after an empty think block only when "</think>" is id 6 (formerly <filename>).
QWEN3_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
    "<tool_response>", "</tool_response>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
)  # fmt: skip
GEMMA3_SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    *(f"<unused{i}>" for i in range(6)),
)  # fmt: skip
MISTRAL_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]", "[ARGS]",
)  # fmt: skip
LLAMA3_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 9)),
)  # fmt: skip
# Qwen marks its think and tool markers as added but not special, so a decode that skips specials keeps them.
QWEN3_PLAIN = frozenset({"<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"})


@dataclass(frozen=True)
class Family:
    """What a fixture is and what mlx-lm infers from it; tests assert these traits."""

    name: str
    model_type: str  # config.json's top-level model_type
    tool_parser: str | None  # the mlx_lm.tool_parsers module mlx-lm infers, None when none
    thinking: bool  # think markers in the vocab and the template's enable_thinking switch
    cache_kinds: frozenset[str]  # classes in make_prompt_cache(model)
    quantized_bits: int | None
    coherent: bool  # real demo weights (answers questions) rather than random ones
    eos: str  # the end-of-turn token's text
    special_tokens: tuple[str, ...]  # the vocab's ids 0-16, in order
    bos: str | None = None  # the text every rendered prompt starts with, also added by ``encode``
    think_start: str | None = None
    think_end: str | None = None
    opens_think: bool = False  # with thinking on, the generation prompt ends inside an open think block
    tool_call_start: str | None = None  # the text that opens a rendered tool call
    tool_call_end: str | None = None  # the text that closes it ("" when the turn's end closes it)
    tools_in_template: bool = True  # the template renders tools, tool calls and tool results
    nested_config: bool = False  # the text model's settings live in config.json's text_config
    sliding_window: int | None = None


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="qwen3", model_type="qwen3", tool_parser="json_tools", thinking=True,
            cache_kinds=frozenset({"KVCache"}), quantized_bits=None, coherent=False, eos="<|im_end|>",
            special_tokens=QWEN3_SPECIALS, think_start="<think>", think_end="</think>", opens_think=True,
            tool_call_start="<tool_call>", tool_call_end="</tool_call>",
        ),
        Family(
            name="qwen3_demo", model_type="llama", tool_parser="json_tools", thinking=True,
            cache_kinds=frozenset({"KVCache"}), quantized_bits=None, coherent=True, eos="<|im_end|>",
            special_tokens=QWEN3_SPECIALS, think_start="<think>", think_end="</think>", opens_think=True,
            tool_call_start="<tool_call>", tool_call_end="</tool_call>",
        ),
        Family(
            name="gemma3", model_type="gemma3_text", tool_parser=None, thinking=False,
            cache_kinds=frozenset({"KVCache", "RotatingKVCache"}), quantized_bits=None, coherent=False,
            eos="<end_of_turn>", special_tokens=GEMMA3_SPECIALS, bos="<bos>", tools_in_template=False,
            sliding_window=16,
        ),
        Family(
            name="qwen3_next", model_type="qwen3_next", tool_parser="json_tools", thinking=True,
            cache_kinds=frozenset({"KVCache", "ArraysCache"}), quantized_bits=None, coherent=False,
            eos="<|im_end|>", special_tokens=QWEN3_SPECIALS, think_start="<think>", think_end="</think>",
            tool_call_start="<tool_call>", tool_call_end="</tool_call>",
        ),
        Family(
            name="mistral", model_type="mistral3", tool_parser="mistral", thinking=False,
            cache_kinds=frozenset({"KVCache"}), quantized_bits=4, coherent=False, eos="</s>",
            special_tokens=MISTRAL_SPECIALS, bos="<s>", tool_call_start="[TOOL_CALLS]", tool_call_end="",
            nested_config=True,
        ),
        Family(
            name="llama3", model_type="llama", tool_parser=None, thinking=False,
            cache_kinds=frozenset({"KVCache"}), quantized_bits=8, coherent=False, eos="<|eot_id|>",
            special_tokens=LLAMA3_SPECIALS, bos="<|begin_of_text|>",
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class _Recipe:
    """How a family's dir is written: template, tokenizer settings, config."""

    template: str
    token_config: dict[str, str | None]  # bos_token, eos_token, pad_token, unk_token
    eos_tokens: tuple[str, ...] = ()  # config.json's eos_token_id, by text (empty: the tokenizer's eos only)
    plain_tokens: frozenset[str] = frozenset()  # added tokens not marked special
    config: Callable[[int], dict[str, Any]] | None = None  # vocab size -> config.json (None: the demo's)
    one_plus_norm: bool = False  # the model's RMSNorm multiplies by 1 + weight


def _attention(heads: int = 4, kv_heads: int = 2) -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": HIDDEN // heads,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }


def _qwen3_config(vocab: int) -> dict[str, Any]:
    return {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **_attention(), "num_hidden_layers": 2,
        "intermediate_size": 2 * HIDDEN, "vocab_size": vocab, "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0,
    }  # fmt: skip


def _gemma3_config(vocab: int) -> dict[str, Any]:
    return {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **_attention(), "num_hidden_layers": 4,
        "intermediate_size": 2 * HIDDEN, "vocab_size": vocab, "query_pre_attn_scalar": HIDDEN // 4,
        "sliding_window": 16, "sliding_window_pattern": 2, "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    }  # fmt: skip


def _qwen3_next_config(vocab: int) -> dict[str, Any]:
    return {
        "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], **_attention(),
        "num_hidden_layers": 4, "full_attention_interval": 4, "intermediate_size": 2 * HIDDEN, "vocab_size": vocab,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
        "decoder_sparse_step": 1, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [], "norm_topk_prob": True, "partial_rotary_factor": 0.25,
        "max_position_embeddings": 262144, "rope_theta": 10_000_000.0,
    }  # fmt: skip


def _mistral_config(vocab: int) -> dict[str, Any]:
    text_config = {
        "model_type": "ministral3", **_attention(), "num_hidden_layers": 2, "intermediate_size": 2 * HIDDEN,
        "vocab_size": vocab, "max_position_embeddings": 262144, "sliding_window": None,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        },
    }  # fmt: skip
    return {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"], "text_config": text_config}


def _llama3_config(vocab: int) -> dict[str, Any]:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], **_attention(), "num_hidden_layers": 2,
        "intermediate_size": 2 * HIDDEN, "vocab_size": vocab, "max_position_embeddings": 131072,
        "rope_theta": 500_000.0,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }  # fmt: skip


_QWEN3_TOKENS = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}

_RECIPES: dict[str, _Recipe] = {
    "qwen3": _Recipe(family_templates.QWEN3_OPEN_THINK, _QWEN3_TOKENS, ("<|im_end|>",), QWEN3_PLAIN, _qwen3_config),
    "qwen3_demo": _Recipe(family_templates.QWEN3_OPEN_THINK, _QWEN3_TOKENS, plain_tokens=QWEN3_PLAIN),
    "gemma3": _Recipe(
        family_templates.GEMMA3,
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        ("<eos>", "<end_of_turn>"),
        config=_gemma3_config,
        one_plus_norm=True,
    ),
    "qwen3_next": _Recipe(
        family_templates.QWEN3_HYBRID, _QWEN3_TOKENS, ("<|im_end|>",), QWEN3_PLAIN, _qwen3_next_config
    ),
    "mistral": _Recipe(
        family_templates.MISTRAL,
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
        config=_mistral_config,
    ),
    "llama3": _Recipe(
        family_templates.LLAMA3,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None, "unk_token": None},
        ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        config=_llama3_config,
    ),
}


class FamilyModels:
    """Family model dirs under ``root``, each built on first use and then reused."""

    def __init__(self, root: Path, demo_model: Path) -> None:
        self.root = root
        self.demo_model = demo_model
        self.build_seconds: dict[str, float] = {}
        self._paths: dict[tuple[str, bool], Path] = {}

    def path(self, name: str, *, eos_first: bool = False) -> Path:
        """The dir of family ``name`` (its ``eos_first`` variant when asked), built on the first call."""
        key = (name, eos_first)
        if key not in self._paths:
            started = time.perf_counter()
            self._paths[key] = build_family(name, self.root, demo_model=self.demo_model, eos_first=eos_first)
            self.build_seconds[self._paths[key].name] = time.perf_counter() - started
        return self._paths[key]


def find_demo_model() -> Path | None:
    """The demo model dir (f32 first, then any variant), or None when it has not been made."""
    from mlxcluster.models.demo import VARIANTS, demo_model_name
    from mlxcluster.models.registry import default_models_dir, is_complete

    models_dir = Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir())
    for variant in sorted(VARIANTS, key=lambda v: v != "f32"):
        candidate = models_dir / demo_model_name(variant)
        if is_complete(candidate):
            return candidate
    return None


def build_family(
    name: str, root: Path, *, demo_model: Path | None = None, eos_first: bool = False, seed: int = 0
) -> Path:
    """Write the mlx-lm model dir of family ``name`` at ``root/name`` (``root/name-eos`` with ``eos_first``).

    ``demo_model`` is the demo model dir that lends its tokenizer (and, to ``qwen3_demo``, its weights);
    found with :func:`find_demo_model` when not given. ``eos_first`` makes a random model end every turn at
    once. The same arguments write the same bytes.
    """
    family = FAMILIES[name]
    recipe = _RECIPES[name]
    demo = demo_model or find_demo_model()
    if demo is None:
        raise FileNotFoundError("the demo model has not been made (mlxcluster models demo)")
    if family.coherent and eos_first:
        raise ValueError(f"{name} has real weights; eos_first needs random ones")
    out = root / (f"{name}-eos" if eos_first else name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab = _write_tokenizer(demo, out, family, recipe)
    if recipe.config is None:
        shutil.copyfile(demo / "config.json", out / "config.json")
        for weights in sorted(demo.glob("model*.safetensors")):
            (out / weights.name).symlink_to(weights.resolve())
        return out
    config = recipe.config(vocab)
    if recipe.eos_tokens:
        eos_ids = [family.special_tokens.index(token) for token in recipe.eos_tokens]
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    bias = _token_bias(demo / "tokenizer.json", family.special_tokens.index(family.eos), eos_first)
    family_seed = seed + zlib.crc32(name.encode())  # families of the same shape still differ
    _write_random_model(out, config, bias, family.quantized_bits, one_plus_norm=recipe.one_plus_norm, seed=family_seed)
    return out


def _write_tokenizer(demo: Path, out: Path, family: Family, recipe: _Recipe) -> int:
    """Write tokenizer.json and tokenizer_config.json with the family's special tokens and template; return the
    vocabulary size."""
    tokenizer = json.loads((demo / "tokenizer.json").read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    if len(family.special_tokens) != SPECIAL_SLOTS:
        raise ValueError(f"{family.name}: {len(family.special_tokens)} special tokens, need {SPECIAL_SLOTS}")
    decoder: dict[str, dict[str, Any]] = {}
    for token_id, content in enumerate(family.special_tokens):
        entry = tokenizer["added_tokens"][token_id]
        if entry["id"] != token_id:
            raise ValueError(f"added token {token_id} of {demo} is {entry}")
        if vocab.get(content, token_id) != token_id:
            raise ValueError(f"{content!r} is already token {vocab[content]} of {demo}")
        del vocab[entry["content"]]
        vocab[content] = token_id
        entry.update(content=content, special=content not in recipe.plain_tokens)
        decoder[str(token_id)] = {key: entry[key] for key in ("content", "lstrip", "normalized", "rstrip")} | {
            "single_word": entry["single_word"],
            "special": entry["special"],
        }
    if family.bos is not None:  # like the real tokenizers, encode() adds the bos token
        bos_id = family.special_tokens.index(family.bos)
        tokenizer["post_processor"] = _with_bos(tokenizer["post_processor"], family.bos, bos_id)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tokenizer_config = json.loads((demo / "tokenizer_config.json").read_text())
    tokenizer_config.update(recipe.token_config, added_tokens_decoder=decoder, chat_template=recipe.template)
    tokenizer_config["add_bos_token"] = family.bos is not None
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").unlink(missing_ok=True)
    return len(vocab)


def _with_bos(post_processor: dict[str, Any], bos: str, bos_id: int) -> dict[str, Any]:
    """``post_processor`` followed by one that puts ``bos`` first, as in Llama 3's tokenizer.json."""
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    return {"type": "Sequence", "processors": [post_processor, template]}


@functools.lru_cache(maxsize=4)
def _printable_tokens(tokenizer_json: Path) -> tuple[bool, ...]:
    """For each id of the demo tokenizer: does it decode, alone, to printable ASCII (added tokens never do)?"""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    texts = tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())], skip_special_tokens=False)
    return tuple(i >= SPECIAL_SLOTS and text.isascii() and text.isprintable() for i, text in enumerate(texts))


def _token_bias(tokenizer_json: Path, eos_id: int, eos_first: bool) -> list[float]:
    """Column 0 of the LM head: 0 for printable tokens, a ban for the rest, the eos token first when asked."""
    bias = [0.0 if printable else BAN for printable in _printable_tokens(tokenizer_json)]
    bias[eos_id] = -BAN if eos_first else BAN
    return bias


def _write_random_model(
    out: Path, config: dict[str, Any], bias: list[float], bits: int | None, *, one_plus_norm: bool, seed: int
) -> None:
    """Build the model class with seeded random weights, shape them (see the module docstring), quantize, save."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import quantize_model, save_config, save_model

    mx.random.seed(seed)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(json.loads(json.dumps(config))))  # from_dict may edit it
    weights = dict(tree_flatten(model.parameters()))
    (embed_key,) = [key for key in weights if key.endswith("embed_tokens.weight")]
    prefix = embed_key.removesuffix("model.embed_tokens.weight")
    embed = weights[embed_key]
    weights[embed_key] = mx.concatenate(
        [mx.full((embed.shape[0], 1), BIAS_DIM_VALUE), embed[:, 1:] * EMBED_SCALE], axis=1
    )
    for key, value in weights.items():  # no layer writes to dim 0 of the residual stream
        if key.endswith((".o_proj.weight", ".down_proj.weight", ".out_proj.weight")):
            value[..., 0, :] = 0.0
    norm = weights[prefix + "model.norm.weight"]
    norm[0] = FINAL_NORM_GAIN - 1.0 if one_plus_norm else FINAL_NORM_GAIN
    head = mx.random.normal((len(bias), HIDDEN)) * HEAD_SCALE
    weights[prefix + "lm_head.weight"] = mx.concatenate([mx.array(bias)[:, None], head[:, 1:]], axis=1)
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    if bits is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints the bits per weight
            model, config = quantize_model(model, config, group_size=64, bits=bits)
    save_model(out, model)
    save_config(config, out / "config.json")


def main(argv: list[str]) -> int:
    """``python tests/families.py DIR [NAMES...]``: build the named fixtures (default: all) under ``DIR``, for the
    benchmarks that run on them (``mlxcluster bench ... --families-dir DIR``)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python tests/families.py DIR [NAMES...]\nnames: {' '.join(FAMILIES)}")
        return 0 if argv else 2
    root, names = Path(argv[0]), argv[1:] or list(FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        print(f"unknown families: {' '.join(unknown)} (known: {' '.join(FAMILIES)})")
        return 2
    demo = find_demo_model()
    if demo is None:
        print("the demo model (whose tokenizer the families share) has not been made: mlxcluster models demo")
        return 1
    for name in names:
        started = time.perf_counter()
        path = build_family(name, root, demo_model=demo)
        print(f"{name}: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
