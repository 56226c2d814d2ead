"""A layer-skip self-draft: a model cut to its first layers, to measure a draft model without a second download.

The draft keeps the model's embeddings, its first ``layers`` transformer layers, its final norm and (tied or
not) its output head, and the same tokenizer files: a small model whose vocabulary is the model's by
construction (``worker.draft_model``). Its drafts are those of an early exit from the full model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def make_layer_skip_draft(model_path: str | Path, layers: int, out: str | Path) -> Path:
    """Write the model at ``model_path`` cut to its first ``layers`` layers into ``out``; the dir written.

    :raises ValueError: ``layers`` is not fewer than the model's layers, or the model keeps them elsewhere
        than ``model.layers``.
    """
    import mlx_lm
    from mlx_lm.utils import save_config, save_model

    source, target = Path(model_path), Path(out)
    model, _, config = mlx_lm.load(str(source), return_config=True)  # type: ignore[misc]
    config = dict(config)
    inner: Any = getattr(model, "model", None)
    total = config.get("num_hidden_layers")
    if inner is None or not hasattr(inner, "layers") or not isinstance(total, int):
        raise ValueError(f"{source}: no model.layers / num_hidden_layers to cut")
    if not 0 < layers < total:
        raise ValueError(f"a layer-skip draft keeps 1 to {total - 1} of {source.name}'s {total} layers, not {layers}")
    inner.layers = inner.layers[:layers]
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:layers]
    target.mkdir(parents=True, exist_ok=True)
    save_model(target, model)
    save_config(config, target / "config.json")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target
