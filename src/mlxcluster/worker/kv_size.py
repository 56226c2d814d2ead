"""What a request's KV cache will cost, read from a model dir before any weight is loaded.

Each layer of a model keeps one of three kinds of state, told apart from ``config.json`` (its
``text_config`` when nested) the way mlx-lm's model classes tell them apart:

- **full attention** (mlx-lm's ``KVCache``): keys and values of every token, ``2 × kv_heads × head_dim``
  elements a token, grown in steps of 256 tokens;
- **sliding window** (``RotatingKVCache``; ``layer_types`` naming ``sliding_attention``, or Gemma 3's
  ``sliding_window_pattern``): the same per token, but never more than the window (plus one prefill chunk
  while a prompt is prefilled);
- **linear attention** (``ArraysCache``; ``layer_types`` naming ``linear_attention``, or Qwen3-Next's
  ``full_attention_interval``): a fixed state, its convolution window and its recurrent state (float32).

The element size is the activation dtype, which is the dtype the weights are stored in (a quantized model's
scales): read from the weight files' headers, else ``torch_dtype``/``dtype`` in the config, else 2 bytes.

A layer the config does not place (a window with no pattern, a linear layer without its ``linear_*``
sizes) counts as full attention: the estimate errs high, never low. What it does not see: a batch pads
its shorter sequences to the longest one, and a copy of a longer prompt-cache entry keeps that entry's
buffer.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxcluster.worker.loaded_model import CONTEXT_KEYS

STEP = 256
"""Tokens mlx-lm's KV caches grow by (and the prefill chunk a rotating window holds beyond its size)."""
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes of a floating safetensors dtype."""
CONFIG_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_DTYPE_BYTES = 2
HEADER_LIMIT = 64 << 20
"""The largest safetensors header read (a sane file's is a few MB at most)."""


@dataclass(frozen=True, slots=True)
class KvSize:
    """KV bytes one request of a model takes, by kind of layer."""

    bytes_per_token: int
    """Full-attention layers: bytes of one token of context."""
    fixed_bytes: int = 0
    """State that does not grow with the context (linear-attention layers)."""
    window_bytes_per_token: int = 0
    """Sliding-window layers: bytes of one token, up to their window."""
    window_tokens: int = 0
    """The sliding window (tokens)."""
    context_length: int = 0
    """The model's context window (0: unknown)."""

    def projected(self, tokens: int) -> int:
        """The most bytes a request of ``tokens`` tokens (prompt and generated) may hold in its cache."""
        rounded = -(-max(0, tokens) // STEP) * STEP
        windowed = min(rounded, self.window_tokens + STEP)
        return self.fixed_bytes + rounded * self.bytes_per_token + windowed * self.window_bytes_per_token

    def tokens_within(self, nbytes: int) -> int:
        """The most tokens (a multiple of 256) whose projection fits in ``nbytes`` (0: not even one step)."""
        low, high = 0, max(1, self.context_length or 1 << 24) // STEP + 1
        while low < high:  # the largest step count that fits
            middle = (low + high + 1) // 2
            if self.projected(middle * STEP) <= nbytes:
                low = middle
            else:
                high = middle - 1
        return low * STEP

    @property
    def capped_fixed_bytes(self) -> int:
        """``fixed_bytes`` plus the sliding-window layers at their cap: the catalogue's ``kv_fixed_bytes``."""
        return self.fixed_bytes + (self.window_tokens + STEP) * self.window_bytes_per_token


def kv_size(model_dir: str | Path) -> KvSize | None:
    """The KV size of a local model dir (``None``: no ``config.json`` there)."""
    path = Path(model_dir).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    return kv_size_of(config, weights_dtype_bytes(path) or config_dtype_bytes(config))


def kv_size_of(config: dict[str, Any], dtype_bytes: int = DEFAULT_DTYPE_BYTES) -> KvSize:
    """The KV size a model config describes, its activations ``dtype_bytes`` wide."""
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    heads = _int(text, "num_attention_heads")
    kv_heads = _int(text, "num_key_value_heads") or heads
    head_dim = _int(text, "head_dim") or (_int(text, "hidden_size") // heads if heads else 0)
    token = 2 * kv_heads * head_dim * dtype_bytes
    full = window = 0
    fixed = 0
    window_size = _int(text, "sliding_window")
    for kind in layer_kinds(text):
        if kind == "sliding" and window_size:
            window += token
        elif kind == "linear" and (state := linear_state_bytes(text, dtype_bytes)):
            fixed += state
        else:
            full += token
    return KvSize(
        bytes_per_token=full,
        fixed_bytes=fixed,
        window_bytes_per_token=window,
        window_tokens=window_size if window else 0,
        context_length=next((v for key in CONTEXT_KEYS if (v := _int(text, key) or _int(config, key))), 0),
    )


def layer_kinds(text: dict[str, Any]) -> list[str]:
    """Each layer's kind: ``full``, ``sliding`` or ``linear``."""
    layers = _int(text, "num_hidden_layers") or _int(text, "n_layers")
    types = text.get("layer_types")
    pattern = _int(text, "sliding_window_pattern")
    interval = _int(text, "full_attention_interval")
    if pattern:  # Gemma 3: every pattern-th layer is global (mlx-lm reads this before layer_types)
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(layers)]
    if isinstance(types, list) and len(types) == layers:
        names = {"sliding_attention": "sliding", "linear_attention": "linear"}
        return [names.get(str(kind), "full") for kind in types]
    if interval:  # Qwen3-Next: every interval-th layer is full attention, the others linear
        return ["full" if (i + 1) % interval == 0 else "linear" for i in range(layers)]
    return ["full"] * layers


def linear_state_bytes(text: dict[str, Any], dtype_bytes: int) -> int:
    """One gated-delta (linear-attention) layer's state: its convolution window and float32 recurrent state
    (0: the config lacks the ``linear_*`` sizes)."""
    kernel = _int(text, "linear_conv_kernel_dim")
    key_dim = _int(text, "linear_key_head_dim")
    key_heads = _int(text, "linear_num_key_heads")
    value_dim = _int(text, "linear_value_head_dim")
    value_heads = _int(text, "linear_num_value_heads")
    if not (kernel and key_dim and key_heads and value_dim and value_heads):
        return 0
    conv = (kernel - 1) * (2 * key_dim * key_heads + value_dim * value_heads) * dtype_bytes
    recurrent = value_heads * value_dim * key_dim * 4
    return conv + recurrent


def weights_dtype_bytes(model_dir: Path) -> int:
    """Bytes of the floating dtype most weight elements have (0: no readable weight file)."""
    elements: dict[str, int] = {}
    for file in sorted(model_dir.glob("*.safetensors"))[:1]:
        try:
            with file.open("rb") as stream:
                (length,) = struct.unpack("<Q", stream.read(8))
                if length > HEADER_LIMIT:
                    return 0
                header: dict[str, Any] = json.loads(stream.read(length))
        except (OSError, ValueError, struct.error):
            return 0
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict) or tensor.get("dtype") not in DTYPE_BYTES:
                continue
            dtype = str(tensor["dtype"])
            elements[dtype] = elements.get(dtype, 0) + math.prod(tensor.get("shape") or [1])
    return DTYPE_BYTES[max(elements, key=elements.__getitem__)] if elements else 0


def config_dtype_bytes(config: dict[str, Any]) -> int:
    """Bytes of the config's ``torch_dtype`` (or ``dtype``), 2 when it names none."""
    nested = config.get("text_config")
    for source in (config, nested if isinstance(nested, dict) else {}):
        for key in ("torch_dtype", "dtype"):
            value = source.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in CONFIG_DTYPE_BYTES:
                return CONFIG_DTYPE_BYTES[value.removeprefix("torch.")]
    return DEFAULT_DTYPE_BYTES


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
