"""The ``mlxcluster`` command line (typer). The only place that reads argv; side effects start here.

This module only assembles the app from the command modules beside it (one per command group). Heavy
modules (mlx, mlx-lm, aiohttp) are imported inside the commands that need them, so ``--help``,
``config`` and ``balancers`` start fast.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Annotated

import typer

from mlxcluster import __version__
from mlxcluster.cli.balancers import balancers_app
from mlxcluster.cli.bench import bench_app
from mlxcluster.cli.config import config_app
from mlxcluster.cli.doctor import doctor_command
from mlxcluster.cli.keys import keys_app
from mlxcluster.cli.models import models_app
from mlxcluster.cli.plugins import exporters_app, plugins_command
from mlxcluster.cli.run import run_command
from mlxcluster.cli.status import status_command
from mlxcluster.cli.workers import requests_command, workers_app

app = typer.Typer(
    name="mlxcluster",
    help="A distributed LLM inference cluster: OpenAI API → NATS → mlx-lm workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models", help="Prepare, import and list models.")
app.add_typer(balancers_app, name="balancers", help="Load-balancing strategies (plugins).")
app.add_typer(exporters_app, name="exporters", help="Metrics exporters (plugins).")
app.command("plugins")(plugins_command)
app.add_typer(workers_app, name="workers", help="List and manage a running cluster's workers.")
app.command("requests")(requests_command)
app.add_typer(keys_app, name="keys", help="API keys: list, create, revoke, rotate; usage.")
app.command("run")(run_command)
app.command("status")(status_command)
app.command("doctor")(doctor_command)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


def version_text() -> str:
    """Version, the Python and platform it runs on, and in a zipapp (platform-specific) what it was built for."""
    from mlxcluster.buildinfo import read_build_info

    impl = f"{platform.python_implementation()} {platform.python_version()}"
    runs_on = f"{impl}, {sys.platform}-{platform.machine()}"
    build = read_build_info()
    if build is not None:
        built_with = ", ".join(filter(None, [build.get("python"), build.get("libc")]))
        runs_on += f"; zipapp built for {build.get('tag', '?')} with {built_with}"
    return f"mlxcluster {__version__} ({runs_on})"


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """mlxcluster: one controller, many mlx-lm workers, NATS in between."""


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
