"""``mlxcluster balancers ...``: the load-balancing strategies that built-in and installed plugins provide.

Imports only the plugin machinery (never mlx, aiohttp or nats), so it starts fast.
"""

from __future__ import annotations

import json

import typer
from msgspec import Struct, to_builtins

from mlxcluster.cli.common import ConfigOption, JsonOption, get_config
from mlxcluster.cli.plugins import marked_table, source_of
from mlxcluster.plugins import BalancerEntry, PluginManager, collect_balancers, get_plugin_manager

balancers_app = typer.Typer(
    name="balancers",
    help="Load-balancing strategies from built-in and installed plugins.",
    no_args_is_help=True,
    add_completion=False,
)


class BalancerRow(Struct, frozen=True, kw_only=True):
    """One line of ``balancers list``."""

    name: str
    plugin: str
    package: str | None
    version: str | None
    description: str
    selected: bool


@balancers_app.callback()
def balancers_callback() -> None:
    """Load-balancing strategies from built-in and installed plugins."""


def balancer_rows(pm: PluginManager, entries: dict[str, BalancerEntry], selected: str) -> list[BalancerRow]:
    """Rows sorted by name, with the package and version of the plugin that registered each one."""
    rows = []
    for name in sorted(entries):
        entry = entries[name]
        origin = pm.origins.get(entry.plugin)
        rows.append(
            BalancerRow(
                name=name,
                plugin=entry.plugin,
                package=origin.package if origin else None,
                version=origin.version if origin else None,
                description=entry.description,
                selected=name == selected,
            )
        )
    return rows


def format_table(rows: list[BalancerRow]) -> str:
    """Name (``*`` marks the configured strategy), source, description."""
    return marked_table([(r.selected, r.name, source_of(r.plugin, r.package, r.version), r.description) for r in rows])


@balancers_app.command("list")
def list_balancers(
    config_path: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """List balancers: name, the plugin and package that provide it, and what it does."""
    config = get_config(config_path)
    pm = get_plugin_manager(config.plugins)
    rows = balancer_rows(pm, collect_balancers(pm), config.load_balancing.strategy)
    for name, reason in pm.failures.items():
        typer.echo(f"warning: plugin {name} failed: {reason}", err=True)
    if as_json:
        typer.echo(json.dumps(to_builtins(rows), indent=2, ensure_ascii=False))
    else:
        typer.echo(format_table(rows))
