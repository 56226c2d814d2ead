"""The models directory: which mlx-lm model dirs it holds, their size, source and weight type.

Pure standard library (no MLX), so ``mlxcluster models list`` starts fast.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

METADATA_FILE = "mlxcluster.json"
"""Written last into every model dir this package makes; its presence marks the dir complete."""


@dataclass(frozen=True)
class ModelInfo:
    """One model dir found in the models directory."""

    name: str
    path: Path
    size_bytes: int
    source: str
    dtype: str
    """Weight storage, e.g. ``float32`` or ``Q4_1+Q8_0`` (GGUF types) or ``q4`` (mlx-lm quantized)."""
    complete: bool
    """False for a dir without ``mlxcluster.json`` (made by some other tool, or unfinished)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {**asdict(self), "path": str(self.path)}


def default_models_dir() -> Path:
    """``~/.cache/mlxcluster/models``, the models dir when none is configured."""
    return Path.home() / ".cache" / "mlxcluster" / "models"


def is_complete(model_dir: Path) -> bool:
    """True once a model dir made by this package has its metadata marker."""
    return (Path(model_dir) / METADATA_FILE).is_file()


def write_model_metadata(out_dir: Path, fields: Mapping[str, Any]) -> None:
    """Write the ``mlxcluster.json`` metadata (and completion marker) into ``out_dir``."""
    (Path(out_dir) / METADATA_FILE).write_text(json.dumps(dict(fields), indent=2) + "\n")


def read_model_metadata(model_dir: Path) -> dict[str, Any]:
    """The ``mlxcluster.json`` of ``model_dir``, or ``{}`` if absent or unreadable."""
    try:
        data = json.loads((Path(model_dir) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _safetensors_dtype(model_dir: Path) -> str:
    """The commonest tensor dtype in the safetensors headers (read without loading any data)."""
    counts: Counter[str] = Counter()
    for path in model_dir.glob("*.safetensors"):
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            continue
        counts.update(v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return names.get(counts.most_common(1)[0][0], "unknown") if counts else "unknown"


def _dtype(model_dir: Path, config: Mapping[str, Any]) -> str:
    quantization = config.get("quantization")
    if isinstance(quantization, dict) and "bits" in quantization:
        bits = {quantization["bits"]}
        bits.update(v["bits"] for v in quantization.values() if isinstance(v, dict) and "bits" in v)
        return "+".join(f"q{b}" for b in sorted(bits))
    return _safetensors_dtype(model_dir)


def model_info(model_dir: Path) -> ModelInfo | None:
    """Describe ``model_dir`` if it looks like an mlx-lm model dir (has ``config.json``), else None."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    meta = read_model_metadata(model_dir)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    return ModelInfo(
        name=model_dir.name,
        path=model_dir,
        size_bytes=size,
        source=str(meta.get("source", "local")),
        dtype=str(meta.get("dtype") or _dtype(model_dir, config)),
        complete=bool(meta),
    )


def list_models(models_dir: Path) -> list[ModelInfo]:
    """The model dirs directly inside ``models_dir`` (hidden and temporary dirs skipped), by name."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    found = []
    for child in sorted(models_dir.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            info = model_info(child)
            if info is not None:
                found.append(info)
    return found
