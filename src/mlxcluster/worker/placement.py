"""Placement checks made before any weight is loaded: does the model fit this worker, or this group?

Two questions, answered from ``config.json`` and the sizes of the ``*.safetensors`` files alone:

* does a group of ``size`` ranks divide the model (tensor parallel: every rank gets whole attention
  heads; pipeline parallel: every rank gets at least one layer)?
* do this worker's weights (the whole model, or about ``1/size`` of it in a group) fit the memory it
  may use (``worker.memory_budget_gb``, else the machine's available memory)?

Each failure is a :class:`PlacementError` whose message says what to change.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMORY_HEADROOM = 0.9
"""Share of the budget the weights may take; the rest is for the KV cache, activations and the process."""


class PlacementError(Exception):
    """The model cannot be placed on this worker or group as configured."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What placement needs to know about a model."""

    weights_bytes: int
    attention_heads: int
    kv_heads: int
    layers: int


def model_shape(model_dir: str | Path) -> ModelShape | None:
    """Read a local model dir (``None`` when it is not one, e.g. a Hugging Face id not downloaded yet)."""
    path = Path(model_dir).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    heads = int(text.get("num_attention_heads") or 0)
    return ModelShape(
        weights_bytes=weights_bytes(path),
        attention_heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        layers=int(text.get("num_hidden_layers") or text.get("n_layers") or 0),
    )


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of a model dir's ``*.safetensors`` files (0: none, or not a local dir)."""
    return sum(f.stat().st_size for f in Path(model_dir).expanduser().glob("*.safetensors"))


def check_group_fits(shape: ModelShape, size: int, parallel: str) -> None:
    """Raise when ``size`` ranks cannot split the model this way."""
    if size <= 1:
        return
    if parallel == "tensor":
        for what, count in (("attention heads", shape.attention_heads), ("KV heads", shape.kv_heads)):
            if count and count % size:
                sizes = [n for n in range(2, count + 1) if shape.attention_heads % n == 0 and shape.kv_heads % n == 0]
                raise PlacementError(
                    f"a tensor-parallel group of {size} does not divide the model's {count} {what}; "
                    f"use a group size that divides both {shape.attention_heads} attention and {shape.kv_heads} "
                    f"KV heads ({', '.join(map(str, sizes)) or 'none'}), or --parallel pipeline"
                )
    elif shape.layers and size > shape.layers:
        raise PlacementError(
            f"a pipeline-parallel group of {size} has more ranks than the model's {shape.layers} layers; "
            f"use at most {shape.layers} members"
        )


def check_sharding_supported(model_dir: str | Path, parallel: str) -> None:
    """Raise when mlx-lm cannot shard this architecture that way (read from ``config.json``, nothing loaded)."""
    import sys

    from mlx_lm.models.pipeline import PipelineMixin
    from mlx_lm.utils import _get_classes

    path = Path(model_dir).expanduser()
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    try:
        model_class, _ = _get_classes(config)
    except ValueError as exc:
        raise PlacementError(f"cannot tell how to shard this model: {exc}") from None
    kind = config.get("model_type", "?")
    if parallel == "tensor" and not hasattr(model_class, "shard"):
        raise PlacementError(f"mlx-lm has no tensor parallelism for {kind} models; try --parallel pipeline")
    if parallel == "pipeline":
        module = vars(sys.modules[model_class.__module__]).values()
        if not any(isinstance(c, type) and issubclass(c, PipelineMixin) for c in module):
            raise PlacementError(f"mlx-lm has no pipeline parallelism for {kind} models; use --parallel tensor")
        if not (path / "model.safetensors.index.json").is_file():
            raise PlacementError(
                "pipeline parallelism needs model.safetensors.index.json next to the weights (mlx_lm.convert writes it)"
            )


def check_memory_fits(shape: ModelShape, available_bytes: int, *, size: int = 1) -> None:
    """Raise when this worker's share of the weights exceeds what it may use."""
    if available_bytes <= 0 or shape.weights_bytes <= 0:
        return
    share = shape.weights_bytes / max(1, size)
    usable = available_bytes * MEMORY_HEADROOM
    if share <= usable:
        return
    needed = math.ceil(shape.weights_bytes / usable)
    where = "this worker" if size == 1 else f"each of the group's {size} members"
    raise PlacementError(
        f"the model's weights ({_gb(shape.weights_bytes)}"
        + (f", {_gb(share)} per member" if size > 1 else "")
        + f") do not fit the memory {where} may use ({_gb(available_bytes)}, {MEMORY_HEADROOM:.0%} of it for "
        f"weights); serve it with a worker group of at least {max(needed, size + 1)} machines "
        f"(--group NAME --group-size N on each), or a smaller or quantized model"
    )


def available_memory_bytes(budget_gb: float | None) -> int:
    """``worker.memory_budget_gb`` when set, else the memory this machine has available now."""
    if budget_gb is not None:
        return int(budget_gb * 1024**3)
    import psutil

    return int(psutil.virtual_memory().available)


def _gb(count: float) -> str:
    return f"{count / 1024**3:.2f} GB"
