"""``mlxcluster doctor``: check this machine (mlx and its device, BLAS, nats-server, models)."""

from __future__ import annotations

import typer

from mlxcluster.cli.common import ConfigOption, JsonOption, get_config
from mlxcluster.tables import table


def doctor_command(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Check this machine: mlx and its device, BLAS fast path, nats-server, models."""
    import json
    from dataclasses import asdict

    from mlxcluster.doctor import run_checks

    checks = run_checks(get_config(config_path))
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        marks = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
        typer.echo(table(None, [[marks[c.status], c.name, c.detail] for c in checks]))
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)
