"""``mlxcluster plugins`` and ``mlxcluster exporters list``: what built-in and installed plugins provide.

Imports only the plugin machinery (never mlx, aiohttp, nats or prometheus-client), so both start fast.
"""

from __future__ import annotations

import json

import typer
from msgspec import Struct, to_builtins

from mlxcluster.cli.common import ConfigOption, JsonOption, get_config
from mlxcluster.plugins import (
    ExporterEntry,
    PluginInfo,
    PluginManager,
    collect_exporters,
    get_plugin_manager,
    list_plugins,
)
from mlxcluster.tables import table

exporters_app = typer.Typer(
    name="exporters",
    help="Metrics exporters from built-in and installed plugins.",
    no_args_is_help=True,
    add_completion=False,
)


class ExporterRow(Struct, frozen=True, kw_only=True):
    """One line of ``exporters list``."""

    name: str
    plugin: str
    package: str | None
    version: str | None
    description: str
    enabled: bool


def source_of(plugin: str, package: str | None, version: str | None) -> str:
    """``plugin (package version)``, or the plugin name alone when no package is known."""
    return f"{plugin} ({package} {version})" if package else plugin


def marked_table(rows: list[tuple[bool, str, str, str]]) -> str:
    """NAME (``*`` marks the chosen ones), SOURCE, DESCRIPTION: what ``balancers list`` and ``exporters list``
    show for ``(marked, name, source, description)`` rows."""
    cells = [[("* " if marked else "  ") + name, source, description] for marked, name, source, description in rows]
    return table(["  NAME", "SOURCE", "DESCRIPTION"], cells)


def format_plugins(rows: list[PluginInfo]) -> str:
    """NAME, VERSION, STATUS, SOURCE, HOOKS; the reason of a failure on the line below its plugin."""
    cells: list[list[str]] = []
    reasons: dict[int, str] = {}
    for row in rows:
        source = row.source + (f" ({row.package})" if row.package and row.source != "builtin" else "")
        hooks = ", ".join(hook.removeprefix("mlxcluster_") for hook in row.hooks) or "-"
        cells.append([row.name, row.version or "-", row.status, source, hooks])
        if row.error:
            reasons[len(cells) - 1] = row.error
    return table(["NAME", "VERSION", "STATUS", "SOURCE", "HOOKS"], cells, notes=reasons)


def plugins_command(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List every plugin: name, version, hooks, where it came from, loaded / failed / disabled (and why)."""
    config = get_config(config_path)
    pm = get_plugin_manager(config.plugins)
    rows = list_plugins(pm)
    if as_json:
        typer.echo(json.dumps(to_builtins(rows), indent=2, ensure_ascii=False))
    else:
        typer.echo(format_plugins(rows))


def exporter_rows(pm: PluginManager, entries: dict[str, ExporterEntry], enabled: list[str]) -> list[ExporterRow]:
    """Rows sorted by name, with the package and version of the plugin that registered each one."""
    rows = []
    for name in sorted(entries):
        entry = entries[name]
        origin = pm.origins.get(entry.plugin)
        rows.append(
            ExporterRow(
                name=name,
                plugin=entry.plugin,
                package=origin.package if origin else None,
                version=origin.version if origin else None,
                description=entry.description,
                enabled=name in enabled,
            )
        )
    return rows


@exporters_app.callback()
def exporters_callback() -> None:
    """Metrics exporters from built-in and installed plugins."""


@exporters_app.command("list")
def list_exporters(config_path: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List exporters: name (``*``: enabled in ``[metrics] exporters``), the plugin that provides it, what it does."""
    config = get_config(config_path)
    pm = get_plugin_manager(config.plugins)
    entries = collect_exporters(pm)
    rows = exporter_rows(pm, entries, config.metrics.exporters)
    for name, reason in pm.failures.items():
        typer.echo(f"warning: plugin {name} failed: {reason}", err=True)
    for name in config.metrics.exporters:
        if name not in entries:
            typer.echo(f"warning: metrics.exporters names {name!r}, which no plugin registers", err=True)
    if as_json:
        typer.echo(json.dumps(to_builtins(rows), indent=2, ensure_ascii=False))
        return
    entries_shown = [(r.enabled, r.name, source_of(r.plugin, r.package, r.version), r.description) for r in rows]
    typer.echo(marked_table(entries_shown))
