"""Which model a worker serves, and under what name.

``worker.model`` may be unset (the demo model, prepared on first use), the name of a model in the
models dir, a local model dir, or a Hugging Face repo id (loaded by mlx-lm, which may download it).
The demo model is served as ``SmolLM2-135M-Instruct`` whichever variant (f32 on CPU, q4 on Apple
silicon) a machine prepared, so a mixed fleet serves one model name.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlxcluster.config import Config

log = logging.getLogger(__name__)


def resolve_model(config: Config) -> tuple[str, str]:
    """Return ``(path or repo id, served model name)`` for ``worker.model``."""
    from mlxcluster.models.demo import DEMO_BASE_NAME, ensure_demo_model

    name = config.worker.model
    models_dir = config.models_dir
    if name is None or name == DEMO_BASE_NAME:
        log.info("no worker.model set: using the demo model %s", DEMO_BASE_NAME)
        return str(ensure_demo_model(models_dir)), DEMO_BASE_NAME
    installed = models_dir / name
    if "/" not in name and installed.is_dir():
        return str(installed), name
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve()), local.name
    return name, name  # a Hugging Face repo id
