"""Convert a llama-family GGUF file into an mlx-lm model directory.

MLX reads GGUF natively: Q4_0/Q4_1/Q8_0 tensors come back as MLX affine-quantized triples
(``weight``/``scales``/``biases``, group size 32) and F16/F32 tensors as plain arrays. This module
renames them to mlx-lm's llama layout, undoes llama.cpp's rotary row permutation of q/k, writes
``config.json`` from the ``llama.*`` metadata and rebuilds the tokenizer offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import mlx.core as mx

from .gguf_header import GGUFHeaderError, TensorInfo, read_header
from .gguf_tokenizer import TokenizerImportError, special_token, write_tokenizer
from .registry import write_model_metadata


class ProgressFn(Protocol):
    """Progress callback: ``(stage, done, total)``; ``total`` is 0 when unknown, ``unit`` is ``"bytes"`` when
    ``done`` and ``total`` count bytes (else they count items, tensors say)."""

    def __call__(self, stage: str, done: int, total: int, unit: str = "") -> None: ...


SUPPORTED_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
GROUP_SIZE = 32
"""Group size of every ggml block format MLX maps to affine quantization (Q4_0, Q4_1, Q8_0)."""

_DEQUANTIZE_DTYPES = {"f16": mx.float16, "f32": mx.float32}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)$")


class GGUFImportError(Exception):
    """A GGUF file cannot be imported; the message is one line meant for the user."""


class ModelExistsError(GGUFImportError):
    """The output directory already exists."""


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _float32_repr(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (so 1e-05, not 9.99999974e-06)."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


def mlx_module_name(gguf_name: str) -> str:
    """Map a GGUF tensor base name (no ``.weight``) to its mlx-lm llama module path."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise GGUFImportError(f"unexpected tensor {gguf_name}.weight (not a plain llama model?)")


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's ``permute(w, n_head)`` on the rows (output dim) of a q/k tensor.

    Works on plain weights and on quantized weight/scales/biases alike, since every row is
    permuted as a whole.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFImportError(f"cannot un-permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_config(metadata: Mapping[str, Any], infos: Mapping[str, TensorInfo]) -> dict[str, Any]:
    """Build mlx-lm's ``config.json`` (without ``quantization``) from ``llama.*`` metadata."""

    def need(key: str) -> Any:
        if key not in metadata:
            raise GGUFImportError(f"GGUF metadata lacks {key}")
        return _scalar(metadata[key])

    hidden = int(need("llama.embedding_length"))
    n_head = int(need("llama.attention.head_count"))
    n_kv = int(_scalar(metadata.get("llama.attention.head_count_kv", n_head)))
    if "llama.expert_count" in metadata and int(_scalar(metadata["llama.expert_count"])) > 0:
        raise GGUFImportError("mixture-of-experts llama GGUFs are not supported")
    embed = infos.get("token_embd.weight")
    if embed is None:
        raise GGUFImportError("GGUF has no token_embd.weight tensor")
    vocab_size = int(_scalar(metadata.get("llama.vocab_size", embed.shape[0])))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(need("llama.block_count")),
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": _float32_repr(float(need("llama.attention.layer_norm_rms_epsilon"))),
        "rope_theta": _float32_repr(float(_scalar(metadata.get("llama.rope.freq_base", 10000.0)))),
        "rope_traditional": False,
        "vocab_size": vocab_size,
        "max_position_embeddings": int(_scalar(metadata.get("llama.context_length", 2048))),
        "tie_word_embeddings": "output.weight" not in infos,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    head_dim = int(_scalar(metadata.get("llama.attention.key_length", hidden // n_head)))
    if head_dim != hidden // n_head:
        config["head_dim"] = head_dim
    scaling = metadata.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFImportError(f"unsupported rope scaling {scaling!r}")
        config["rope_scaling"] = {"type": "linear", "factor": float(need("llama.rope.scaling.factor"))}
    for kind in ("bos", "eos", "padding"):
        key = f"tokenizer.ggml.{kind}_token_id"
        if key in metadata:
            config[f"{'pad' if kind == 'padding' else kind}_token_id"] = int(_scalar(metadata[key]))
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    if eot is not None and "eos_token_id" in config and int(_scalar(eot)) != config["eos_token_id"]:
        config["eos_token_id"] = [config["eos_token_id"], int(_scalar(eot))]
    return config


def _check_tensors(infos: list[TensorInfo]) -> None:
    for info in infos:
        if info.ggml_type not in SUPPORTED_TYPES:
            raise GGUFImportError(
                f"tensor {info.name} is {info.type_name}, which is not supported"
                f" (supported: {', '.join(SUPPORTED_TYPES.values())})"
            )
        if not info.name.endswith(".weight"):
            raise GGUFImportError(f"unexpected tensor {info.name} (not a plain llama model?)")
        mlx_module_name(info.name.removesuffix(".weight"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _convert_tensors(
    raw: Mapping[str, mx.array],
    infos: list[TensorInfo],
    config: Mapping[str, Any],
    dequantize: str | None,
    progress: ProgressFn | None,
) -> tuple[dict[str, mx.array], dict[str, tuple[int, int]]]:
    """Rename, un-permute and optionally dequantize; return weights and per-module (bits, group)."""
    weights: dict[str, mx.array] = {}
    quantized: dict[str, tuple[int, int]] = {}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for done, info in enumerate(infos, start=1):
        base = info.name.removesuffix(".weight")
        module = mlx_module_name(base)
        kind = base.rsplit(".", 1)[-1]
        if info.name not in raw:
            raise GGUFImportError(f"MLX could not read tensor {info.name} ({info.type_name})")
        parts = {"weight": raw[info.name]}
        if f"{base}.scales" in raw:
            parts["scales"] = raw[f"{base}.scales"]
            parts["biases"] = raw[f"{base}.biases"]
        if kind in heads:
            parts = {k: unpermute_rows(v, heads[kind]) for k, v in parts.items()}
        if "scales" in parts:
            in_features = parts["scales"].shape[-1] * GROUP_SIZE
            bits = parts["weight"].shape[-1] * 32 // in_features
            if dequantize is None:
                quantized[module] = (bits, GROUP_SIZE)
            else:  # compute in the target dtype: float16 arithmetic would round f32 weights
                dtype = _DEQUANTIZE_DTYPES[dequantize]
                scales, biases = parts["scales"].astype(dtype), parts["biases"].astype(dtype)
                parts = {"weight": mx.dequantize(parts["weight"], scales, biases, group_size=GROUP_SIZE, bits=bits)}
        if dequantize is not None:
            parts = {k: v.astype(_DEQUANTIZE_DTYPES[dequantize]) for k, v in parts.items()}
        mx.eval(*parts.values())  # convert now, so that the progress counts the work (not saving later)
        for suffix, array in parts.items():
            weights[f"{module}.{suffix}"] = array
        if progress is not None:
            progress("converting tensors", done, len(infos))
    return weights, quantized


def _quantization_config(quantized: Mapping[str, tuple[int, int]]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` entry: the commonest (bits, group) plus per-module exceptions."""
    if not quantized:
        return None
    (bits, group), _ = Counter(quantized.values()).most_common(1)[0]
    config: dict[str, Any] = {"group_size": group, "bits": bits}
    for module, (m_bits, m_group) in sorted(quantized.items()):
        if (m_bits, m_group) != (bits, group):
            config[module] = {"group_size": m_group, "bits": m_bits}
    return config


def describe_dtype(infos: list[TensorInfo], dequantize: str | None) -> str:
    """A short label of the stored weights: ``float32``, or ggml types such as ``Q4_1+Q8_0``."""
    if dequantize is not None:
        return {"f16": "float16", "f32": "float32"}[dequantize]
    counts = Counter(i.type_name for i in infos if i.ggml_type not in (0, 1) or len(i.shape) > 1)
    return "+".join(name for name, _ in counts.most_common()) or "float32"


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    dequantize: str | None = None,
    progress: ProgressFn | None = None,
    source: str | None = None,
) -> Path:
    """Convert the llama-family GGUF at ``gguf_path`` into the mlx-lm model dir ``out_dir``.

    ``dequantize`` ("f16" or "f32") stores plain float weights; otherwise quantized tensors stay
    quantized. The dir is built next to ``out_dir`` and renamed into place, so it is either complete
    or absent. Raises :class:`GGUFImportError` (or :class:`ModelExistsError`) with a one-line message.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dequantize is not None and dequantize not in _DEQUANTIZE_DTYPES:
        raise GGUFImportError(f"dequantize must be one of {', '.join(_DEQUANTIZE_DTYPES)}, not {dequantize!r}")
    if not gguf_path.is_file():
        raise GGUFImportError(f"no such file: {gguf_path}")
    if out_dir.exists():
        raise ModelExistsError(f"{out_dir} already exists")
    try:
        header = read_header(gguf_path)
    except (GGUFHeaderError, OSError) as exc:
        raise GGUFImportError(f"cannot read {gguf_path.name}: {exc}") from exc
    arch = header.metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"{gguf_path.name}: architecture {arch!r} is not supported (only 'llama')")
    infos = header.tensors
    _check_tensors(infos)

    if progress is not None:
        progress("reading GGUF", 0, 0)
    try:
        loaded = mx.load(str(gguf_path), return_metadata=True)
        raw, metadata = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    except (RuntimeError, ValueError) as exc:
        raise GGUFImportError(f"MLX cannot read {gguf_path.name}: {exc}") from exc
    by_name = {info.name: info for info in infos}
    config = llama_config(metadata, by_name)
    weights, quantized = _convert_tensors(raw, infos, config, dequantize, progress)
    if (quantization := _quantization_config(quantized)) is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp_dir.chmod(0o755)
    try:
        if progress is not None:
            progress("writing weights", 0, 0)
        mx.save_safetensors(str(tmp_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if progress is not None:
            progress("rebuilding the tokenizer", 0, 0)
        try:
            write_tokenizer(metadata, tmp_dir, model_max_length=config["max_position_embeddings"])
        except (TokenizerImportError, KeyError) as exc:
            raise GGUFImportError(f"{gguf_path.name}: cannot rebuild tokenizer: {exc}") from exc
        write_model_metadata(
            tmp_dir,
            {
                "name": out_dir.name,
                "source": source or f"GGUF file {gguf_path.name}",
                "gguf": gguf_path.name,
                "gguf_sha256": _sha256(gguf_path),
                "gguf_name": metadata.get("general.name"),
                "eos_token": special_token(metadata, "eos"),
                "dtype": describe_dtype(infos, dequantize),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        try:
            os.rename(tmp_dir, out_dir)
        except OSError as exc:
            raise ModelExistsError(f"{out_dir} already exists") from exc
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
