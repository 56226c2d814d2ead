"""Vision models: which model dirs are ones, and loading mlx-vlm (the optional extra ``mlxcluster[vision]``).

A model dir is a vision model when its ``config.json`` has a ``vision_config`` (Qwen2/2.5/3-VL, Gemma 3,
Mistral Small 3.x, LLaVA, PaliGemma, SmolVLM all do). Such a model runs on mlx-vlm, imported only when one
loads; without the extra installed the load is refused with a message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from mlxcluster.errors import NodeError

EXTRA_HINT = "pip install 'mlxcluster[vision]'"


def is_vision_model(path: str | Path) -> bool:
    """Whether the model dir at ``path`` is a vision model (its config has a ``vision_config``)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def import_mlx_vlm() -> ModuleType:
    """The ``mlx_vlm`` package, or a :class:`NodeError` naming the extra that brings it."""
    try:
        import mlx_vlm
    except ImportError as exc:
        raise NodeError(
            f"this is a vision model, which runs on mlx-vlm, and mlx-vlm is not installed ({exc}); {EXTRA_HINT}"
        ) from None
    return mlx_vlm  # type: ignore[no-any-return]
