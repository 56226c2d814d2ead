"""What every command module shares: the ``--config``/``--json`` options and loading the config.

Kept apart from the main app (``cli/__init__.py``) so every command module uses the same options and the
same one-line config errors without importing the main app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from mlxcluster.config import Config, ConfigError
from mlxcluster.config import load as load_config

DEFAULT_CONFIG_FILE = "cluster.toml"
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="MLXCLUSTER_CONFIG",
        help="Config file (default: ./cluster.toml when it exists).",
        dir_okay=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
UrlOption = Annotated[str | None, typer.Option("--url", help="Controller URL (default: from the config).")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def resolve_config_path(path: Path | None) -> Path | None:
    """The explicit path, else ``./cluster.toml`` if present, else ``None`` (defaults)."""
    if path is not None:
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def get_config(path: Path | None) -> Config:
    """Load config or exit 2 with the one-line reason."""
    try:
        return load_config(resolve_config_path(path))
    except ConfigError as exc:
        fail(str(exc))
