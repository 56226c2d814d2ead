"""``mlxcluster doctor``: what this machine offers a worker, checked rather than assumed."""

from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import dataclass

from mlxcluster import __version__
from mlxcluster.config import Config


@dataclass
class Check:
    """One line of the report: ok, a warning (works, but slower or limited) or a problem."""

    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str


def run_checks(config: Config) -> list[Check]:
    """Python, mlx and its device, BLAS, nats-server, models dir and demo model."""
    checks = [
        Check(
            "mlxcluster",
            "ok",
            f"{__version__} on Python {platform.python_version()} ({sys.platform}-{platform.machine()})",
        )
    ]
    checks.append(_mlx())
    checks.append(_blas())
    checks.append(_nats_server())
    checks.extend(_models(config))
    return checks


def _mlx() -> Check:
    try:
        import mlx.core as mx
        import mlx_lm
    except Exception as exc:  # an import error is exactly what doctor is for
        return Check("mlx", "fail", f"cannot import mlx/mlx-lm: {exc}")
    device = "metal" if mx.metal.is_available() else "cpu"
    return Check(
        "mlx",
        "ok",
        f"mlx {getattr(mx, '__version__', '?')}, mlx-lm {getattr(mlx_lm, '__version__', '?')}, device {device}",
    )


def _blas() -> Check:
    from mlxcluster.worker.blas import openblas_path

    if sys.platform == "darwin":
        return Check("blas", "ok", "Accelerate (macOS)")
    path = openblas_path()
    if path is None:
        return Check(
            "blas",
            "warn",
            "system OpenBLAS not found: CPU workers use mlx-cpu's slow reference BLAS; "
            "install libopenblas0-pthread (Debian/Ubuntu) for several times the speed",
        )
    return Check("blas", "ok", f"system OpenBLAS {path}: workers preload it (float32 fast path)")


def _nats_server() -> Check:
    from mlxcluster.embedded import EmbeddedServerError, nats_server_binary

    try:
        binary = nats_server_binary()
    except EmbeddedServerError as exc:
        return Check("nats-server", "fail", str(exc))
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=5, check=False)
        version = out.stdout.strip() or out.stderr.strip()
    except OSError as exc:
        return Check("nats-server", "fail", f"{binary}: {exc}")
    return Check("nats-server", "ok", f"{version} ({binary})")


def _models(config: Config) -> list[Check]:
    from mlxcluster.models.demo import default_model_path
    from mlxcluster.models.registry import is_complete, list_models

    models_dir = config.models_dir
    installed = list_models(models_dir) if models_dir.is_dir() else []
    names = ", ".join(m.name for m in installed) or "none"
    checks = [Check("models dir", "ok" if installed else "warn", f"{models_dir}: {names}")]
    demo = default_model_path(models_dir)
    if is_complete(demo):
        checks.append(Check("demo model", "ok", str(demo)))
    else:
        checks.append(Check("demo model", "warn", "not prepared yet: run `mlxcluster models demo`"))
    return checks
