"""A model loaded for the mlx engine, and what the engine needs to know about it.

Everything model-specific comes from the model's own files and mlx-lm: the logits width and context
window from its config (top level, or ``text_config`` for VLM-derived and Gemma 3 configs), the end-of-
sequence tokens and think markers from mlx-lm's tokenizer wrapper, the cache classes its
``make_cache`` builds (a sliding window or a linear-attention state cannot be trimmed to an arbitrary
prefix, so the prompt cache keeps checkpoints on turn boundaries instead), and how many tokens its
chat template's generation prompt adds (where such a checkpoint goes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

log = logging.getLogger(__name__)

CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length", "n_ctx")


def config_value(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, or the same key in its nested ``text_config`` (VLM-derived and Gemma 3 configs)."""
    value = config.get(key)
    if value is None:
        nested = config.get("text_config")
        value = nested.get(key) if isinstance(nested, dict) else None
    return value


def vocab_size(config: dict[str, Any], tokenizer: Any) -> int:
    """The model's logits width: ``vocab_size`` from its config (which may exceed the tokenizer's length)."""
    value = config_value(config, "vocab_size")
    return int(value) if isinstance(value, int) and value > 0 else len(tokenizer)


def context_window(config: dict[str, Any], tokenizer: Any) -> int:
    """The model's context window in tokens (0: unknown), from its config or its tokenizer."""
    for key in CONTEXT_KEYS:
        value = config_value(config, key)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else 0


def weights_dtype(model: Any) -> str:
    """The floating dtype holding most parameters (quantized packs and scales aside)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    sizes: dict[str, int] = {}
    parameters = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    for name, value in parameters:
        if not mx.issubdtype(value.dtype, mx.floating) or name.endswith((".scales", ".biases")):
            continue
        key = str(value.dtype).removeprefix("mlx.core.")
        sizes[key] = sizes.get(key, 0) + value.size
    if not sizes:
        return "unknown"
    quantized = any(name.endswith(".scales") for name, _ in parameters)
    dtype = max(sizes, key=sizes.__getitem__)
    return f"{dtype} (+ quantized)" if quantized else dtype


def quantization(config: dict[str, Any]) -> str:
    """``none`` or e.g. ``4-bit group 32 (mixed per layer)`` from the model config."""
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict) or "bits" not in quant:
        return "none"
    text = f"{quant['bits']}-bit group {quant.get('group_size', '?')}"
    if quant.get("mode") and quant["mode"] != "affine":
        text += f" {quant['mode']}"
    if any(isinstance(value, dict) for value in quant.values()):
        text += " (mixed per layer)"
    return text


def cache_kinds(model: Any) -> list[str]:
    """The class names of the caches the model makes for one sequence (``KVCache``, ``RotatingKVCache``...)."""
    from mlx_lm.models.cache import make_prompt_cache

    return sorted({type(layer).__name__ for layer in make_prompt_cache(model)})


TRIMMABLE_KINDS = frozenset({"KVCache", "QuantizedKVCache", "ConcatenateKVCache"})
"""Cache classes that can always drop tokens from their end (a rotating window only until it rolls)."""


def generation_prompt_tokens(tokenizer: Any, enable_thinking: bool) -> list[int]:
    """The tokens the chat template appends for ``add_generation_prompt`` after a user turn (may be empty)."""
    messages = [{"role": "user", "content": "x"}]
    try:
        bare = list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=False, enable_thinking=enable_thinking)
        )
        full = list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        )
    except Exception:  # a template that cannot render a lone user turn: no checkpoints
        log.debug("cannot render a generation prompt", exc_info=True)
        return []
    if full[: len(bare)] != bare:
        return []
    return full[len(bare) :]


def thinking_switch(tokenizer: Any) -> bool:
    """Whether the chat template can switch thinking on and off (it reads ``enable_thinking`` or ``thinking``)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and ("enable_thinking" in template or "thinking" in template)


@dataclass
class LoadedModel:
    """A model, its tokenizer and the facts the engine uses, read once at load."""

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    vocab_size: int
    context_window: int
    eos_ids: list[int]
    cache_kinds: list[str]
    thinking: bool
    """The vocabulary has think markers (mlx-lm's ``has_thinking``)."""
    thinking_switch: bool
    """The template has a switch for thinking (``enable_thinking``)."""
    generation_prompts: dict[bool, list[int]] = field(default_factory=dict)
    """The generation prompt's tokens with thinking on (True) and off (False)."""
    details: dict[str, str] = field(default_factory=dict)

    @property
    def trimmable_cache(self) -> bool:
        """Every layer's cache can be trimmed to any prefix (else the prompt cache keeps checkpoints)."""
        return set(self.cache_kinds) <= TRIMMABLE_KINDS

    @classmethod
    def from_parts(cls, model: Any, tokenizer: Any, config: dict[str, Any]) -> LoadedModel:
        """Read the facts of an already loaded model."""
        thinking = bool(getattr(tokenizer, "has_thinking", False))
        switch = thinking and thinking_switch(tokenizer)
        prompts = {}
        if getattr(tokenizer, "has_chat_template", False):
            prompts = {on: generation_prompt_tokens(tokenizer, on) for on in (True, False)}
        return cls(
            model=model,
            tokenizer=tokenizer,
            config=config,
            vocab_size=vocab_size(config, tokenizer),
            context_window=context_window(config, tokenizer),
            eos_ids=sorted(tokenizer.eos_token_ids),
            cache_kinds=cache_kinds(model),
            thinking=thinking,
            thinking_switch=switch,
            generation_prompts=prompts,
        )


def describe(loaded: LoadedModel, model_path: str, started: float, extra: dict[str, str]) -> dict[str, str]:
    """The engine's details (logged at start, shown by ``doctor`` and the registration)."""
    import mlx.core as mx
    import mlx_lm

    from mlxcluster.worker.blas import blas_in_use

    device = mx.default_device()
    device_name = "cpu" if device.type == mx.DeviceType.cpu else "gpu"
    try:
        device_name += f" ({mx.device_info().get('device_name', '')})".replace(" ()", "")
    except Exception:  # informational only
        pass
    path = Path(model_path).expanduser()
    return {
        "weights_dtype": weights_dtype(loaded.model),
        "quantization": quantization(loaded.config),
        "blas": blas_in_use() if device.type == mx.DeviceType.cpu else "n/a (gpu)",
        "mlx_version": getattr(mx, "__version__", ""),
        "mlx_lm_version": getattr(mlx_lm, "__version__", ""),
        "device": device_name,
        "model_path": str(path.resolve()) if path.exists() else model_path,
        "context_window": str(loaded.context_window),
        "cache": "+".join(loaded.cache_kinds),
        "thinking": "switch" if loaded.thinking_switch else ("always" if loaded.thinking else "no"),
        **extra,
        "load_seconds": f"{time.perf_counter() - started:.2f}",
    }
