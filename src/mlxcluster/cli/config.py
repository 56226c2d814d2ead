"""``mlxcluster config init|validate|show``: write, check and print ``cluster.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlxcluster.cli.common import (
    DEFAULT_CONFIG_FILE,
    ConfigOption,
    JsonOption,
    fail,
    get_config,
    resolve_config_path,
)

config_app = typer.Typer(help="Create, check and show cluster.toml.", no_args_is_help=True)


@config_app.command("init")
def config_init(
    path: Annotated[Path, typer.Argument(help="Where to write it.")] = Path(DEFAULT_CONFIG_FILE),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    secure: Annotated[
        bool,
        typer.Option("--secure", help="Write a two-machine set-up instead: NATS users per role, an admin API key."),
    ] = False,
    controller_host: Annotated[
        str, typer.Option("--controller-host", help="With --secure: the address workers use to reach NATS.")
    ] = "controller.local",
    worker_ids: Annotated[
        str | None,
        typer.Option("--workers", help="With --secure: worker ids (a,b) that get their own NATS user and config."),
    ] = None,
) -> None:
    """Write a commented default cluster.toml (or, with --secure, a directory of credentials and configs)."""
    from mlxcluster.config_template import DEFAULT_CONFIG_TOML

    if secure:
        from mlxcluster.nats_auth import secure_setup

        directory = path if path != Path(DEFAULT_CONFIG_FILE) else Path("mlxcluster-secure")
        try:
            ids = [w.strip() for w in (worker_ids or "").split(",") if w.strip()]
            written = secure_setup(directory, controller_host, workers=ids)
        except (FileExistsError, ValueError) as exc:
            fail(str(exc))
        typer.echo(f"wrote {written['controller']} (this machine: controller + NATS)")
        typer.echo(f"wrote {written['worker']} (copy to each worker machine)")
        for name, extra in written.items():
            if name.startswith("worker-"):
                typer.echo(f"wrote {extra} (only for worker {name.removeprefix('worker-')})")
        typer.echo(f"wrote {written['users']} (NATS users per role) and {written['api_key']} (the admin API key)")
        return
    if path.exists() and not force:
        fail(f"{path} exists; use --force to overwrite it")
    path.write_text(DEFAULT_CONFIG_TOML, encoding="utf-8")
    typer.echo(f"wrote {path}")


@config_app.command("validate")
def config_validate(
    path: Annotated[Path | None, typer.Argument(help="File to check (default: ./cluster.toml).")] = None,
) -> None:
    """Check a config file (and MLXCLUSTER_* overrides); exit 2 with the key path when it is wrong."""
    from mlxcluster.config import ConfigError
    from mlxcluster.controller.metering.keys import KeyRing
    from mlxcluster.nats_auth import load_users

    resolved = resolve_config_path(path)
    config = get_config(resolved)
    try:  # what the controller checks when it starts: key entries (key_env set), the NATS users file
        KeyRing.from_config(config.controller)
        if config.nats.embedded.users_file is not None:
            load_users(config.nats.embedded.users_file)
    except ConfigError as exc:
        fail(f"{resolved or '<defaults>'}: {exc}")
    typer.echo(f"{resolved or '<defaults>'}: ok")


@config_app.command("show")
def config_show(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Print the effective config (file + environment overrides), secrets masked."""
    import json

    import tomli_w

    from mlxcluster.config import to_dict

    data = to_dict(get_config(config_path), mask_secrets=True)
    typer.echo(json.dumps(data, indent=2) if as_json else tomli_w.dumps(data).rstrip())
