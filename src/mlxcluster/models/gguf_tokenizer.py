"""Build a Hugging Face ``tokenizer.json`` (and its config) offline from GGUF tokenizer metadata.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported; the pre-tokenizer
is chosen from ``tokenizer.ggml.pre`` the way llama.cpp does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# Token types of ``tokenizer.ggml.token_type`` (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerImportError(ValueError):
    """The GGUF's tokenizer cannot be rebuilt offline."""


def _scalar(value: Any) -> Any:
    """Turn an MLX 0-d array from GGUF metadata into a Python scalar."""
    return value.item() if hasattr(value, "item") else value


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre == pre``."""
    if pre in ("default", "gpt-2", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise TokenizerImportError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre)")


def build_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer described by GGUF ``metadata``."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerImportError(
            f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); only byte-level BPE 'gpt2' is"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    if "tokenizer.ggml.token_type" in metadata:
        token_types = [int(t) for t in metadata["tokenizer.ggml.token_type"].tolist()]
    else:
        token_types = [TOKEN_NORMAL] * len(tokens)

    tokenizer = Tokenizer(
        models.BPE(
            vocab={tok: i for i, tok in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tok, special=(ttype == TOKEN_CONTROL), normalized=False)
        for tok, ttype in zip(tokens, token_types, strict=True)
        if ttype in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    tokenizer.add_tokens(added)

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if bool(_scalar(metadata.get("tokenizer.ggml.add_bos_token", False))) and bos_id is not None:
        bos = tokens[int(_scalar(bos_id))]
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, int(_scalar(bos_id)))],
                ),
            ]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def special_token(metadata: Mapping[str, Any], kind: str) -> str | None:
    """The text of special token ``kind`` (bos, eos, unk, padding, eot) or None if the GGUF has none."""
    token_id = metadata.get(f"tokenizer.ggml.{kind}_token_id")
    if token_id is None:
        return None
    tokens = metadata["tokenizer.ggml.tokens"]
    index = int(_scalar(token_id))
    return tokens[index] if 0 <= index < len(tokens) else None


def tokenizer_config(metadata: Mapping[str, Any], model_max_length: int | None) -> dict[str, Any]:
    """The ``tokenizer_config.json`` contents: special tokens and the GGUF chat template."""
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type")
    decoder: dict[str, dict[str, Any]] = {}
    if token_types is not None:
        for i, ttype in enumerate(token_types.tolist()):
            if ttype in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                decoder[str(i)] = {
                    "content": tokens[i],
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": ttype == TOKEN_CONTROL,
                }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_scalar(metadata.get("tokenizer.ggml.add_bos_token", False))),
        "add_eos_token": bool(_scalar(metadata.get("tokenizer.ggml.add_eos_token", False))),
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
    }
    for kind, key in (
        ("bos", "bos_token"),
        ("eos", "eos_token"),
        ("unknown", "unk_token"),
        ("padding", "pad_token"),
    ):
        if (text := special_token(metadata, kind)) is not None:
            config[key] = text
    if model_max_length:
        config["model_max_length"] = model_max_length
    if template := metadata.get("tokenizer.chat_template"):
        config["chat_template"] = str(template)
    return config


def write_tokenizer(metadata: Mapping[str, Any], out_dir: Path, model_max_length: int | None = None) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``."""
    build_tokenizer(metadata).save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(metadata, model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
