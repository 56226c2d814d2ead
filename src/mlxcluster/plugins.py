"""Plugin discovery: built-ins from :data:`DEFAULT_PLUGINS`, third parties from the ``mlxcluster`` entry points.

Built-ins and third-party plugins go through the same hooks. Entry points are loaded one at a time: a
plugin that fails to import, raises while importing, or implements a hook wrongly is logged and recorded
in :attr:`PluginManager.failures` by name with the reason, and the others still load. Plugins named in
``[plugins] disabled`` (entry-point or distribution name) are never imported. Directories in
``[plugins] paths`` and ``MLXCLUSTER_PLUGIN_PATH`` are added with :func:`site.addsitedir` before discovery,
so a ``pip install --target DIR`` folder works as a plugin directory.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import re
import site
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pluggy
from msgspec import Struct

from mlxcluster import __version__
from mlxcluster.api import hooks as hookspecs
from mlxcluster.config import PluginsSection

log = logging.getLogger(__name__)

DEFAULT_PLUGINS: tuple[str, ...] = ("mlxcluster.builtin.balancers", "mlxcluster.builtin.exporters")
ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
PLUGIN_PATH_ENV = "MLXCLUSTER_PLUGIN_PATH"

PluginSource = Literal["builtin", "entry point", "registered"]
PluginStatus = Literal["loaded", "failed", "disabled"]


class PluginOrigin(Struct, frozen=True, kw_only=True):
    """Where a plugin came from."""

    source: PluginSource
    package: str | None = None
    version: str | None = None


class PluginInfo(Struct, frozen=True, kw_only=True):
    """One row of ``mlxcluster plugins``."""

    name: str
    status: PluginStatus
    source: PluginSource
    package: str | None = None
    version: str | None = None
    hooks: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PluginEntry:
    """One thing a plugin registered through a ``register`` callback."""

    name: str
    factory: Callable[..., Any]
    description: str
    plugin: str


BalancerEntry = PluginEntry
ExporterEntry = PluginEntry


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from and which ones failed or were disabled."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginOrigin] = {}
        """Plugin name → where it came from (also for plugins that then failed)."""
        self.failures: dict[str, str] = {}
        """Plugin name → why it was not loaded (or why its hook failed)."""
        self.disabled: dict[str, PluginOrigin] = {}

    def fail(self, name: str, reason: str) -> None:
        """Record and log a plugin that did not load or whose hook raised."""
        log.warning("plugin %s failed: %s", name, reason)
        self.failures[name] = reason


def get_plugin_manager(config: PluginsSection | None = None, env: Mapping[str, str] = os.environ) -> PluginManager:
    """A new plugin manager with built-ins, plugin directories and entry-point plugins loaded.

    :param config: ``[plugins]``: extra ``paths`` and ``disabled`` names (default: none).
    :param env: where ``MLXCLUSTER_PLUGIN_PATH`` (``os.pathsep``-separated directories) is read.
    """
    config = config if config is not None else PluginsSection()
    pm = PluginManager()
    disabled = {_normalize(name) for name in config.disabled}
    for name in config.disabled:
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        name = builtin_plugin_name(module_name)
        origin = PluginOrigin(source="builtin", package=hookspecs.PROJECT_NAME, version=__version__)
        if _normalize(name) in disabled:
            pm.disabled[name] = origin
            continue
        _register(pm, name, functools.partial(importlib.import_module, module_name), origin)
    add_plugin_paths([*config.paths, *env_plugin_paths(env)])
    load_entry_points(pm, disabled)
    return pm


def builtin_plugin_name(module_name: str) -> str:
    """``mlxcluster.builtin.balancers`` → ``builtin-balancers``."""
    return "builtin-" + module_name.rsplit(".", 1)[-1]


def env_plugin_paths(env: Mapping[str, str]) -> list[str]:
    """The directories named by ``MLXCLUSTER_PLUGIN_PATH``."""
    return [part for part in env.get(PLUGIN_PATH_ENV, "").split(os.pathsep) if part.strip()]


def add_plugin_paths(paths: Iterable[str]) -> list[Path]:
    """``site.addsitedir`` each existing directory (``.pth`` files included); return those added."""
    added: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.is_dir():
            log.warning("plugin path %s is not a directory; skipped", path)
            continue
        site.addsitedir(str(path))
        added.append(path)
    if added:
        importlib.invalidate_caches()
    return added


def load_entry_points(pm: PluginManager, disabled: Iterable[str] = (), group: str = ENTRY_POINT_GROUP) -> int:
    """Load every entry point of ``group`` one by one, isolating failures; return how many loaded."""
    blocked = {_normalize(name) for name in disabled}
    count = 0
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != group or pm.has_plugin(ep.name) or ep.name in pm.failures or ep.name in pm.disabled:
                continue
            package = dist.metadata["Name"] or ""
            origin = PluginOrigin(source="entry point", package=package, version=dist.version)
            if pm.is_blocked(ep.name) or {_normalize(ep.name), _normalize(package)} & blocked:
                pm.disabled[ep.name] = origin
                log.info("plugin %s (%s) is disabled", ep.name, package)
                continue
            count += _register(pm, ep.name, ep.load, origin)
    return count


def _register(pm: PluginManager, name: str, load: Callable[[], object], origin: PluginOrigin) -> bool:
    """Import and register one plugin; on any failure record it and leave the manager unchanged."""
    pm.origins[name] = origin
    try:
        plugin = load()
    except (Exception, SystemExit) as exc:
        pm.fail(name, f"import failed: {type(exc).__name__}: {exc}")
        return False
    try:
        pm.register(plugin, name=name)
    except Exception as exc:
        pm.fail(name, f"invalid plugin: {exc}")
        return False
    unknown = _unknown_hooks(pm, plugin)
    if unknown:
        pm.unregister(plugin)
        pm.fail(
            name,
            f"unknown hook {', '.join(unknown)} (mark it @hookimpl(optionalhook=True) if it is for a newer mlxcluster)",
        )
        return False
    return True


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hooks the plugin implements that no spec declares (typos, or hooks of a newer version)."""
    return [
        caller.name
        for caller in pm.get_hookcallers(plugin) or ()
        if not caller.has_spec()
        and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
    ]


def _normalize(name: str) -> str:
    """PEP 503 name normalization, so ``My_Plugin`` and ``my-plugin`` match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every plugin: loaded ones with their hooks, then failed and disabled ones."""
    origins = getattr(pm, "origins", {})
    failures: dict[str, str] = getattr(pm, "failures", {})
    disabled: dict[str, PluginOrigin] = getattr(pm, "disabled", {})
    rows: list[PluginInfo] = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        origin = origins.get(name, PluginOrigin(source="registered"))
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        error = failures.get(name)
        rows.append(
            PluginInfo(
                name=name,
                status="failed" if error else "loaded",
                source=origin.source,
                package=origin.package,
                version=origin.version,
                hooks=hooks,
                error=error,
            )
        )
    loaded = {row.name for row in rows}
    for name, reason in failures.items():
        if name not in loaded:
            origin = origins.get(name, PluginOrigin(source="entry point"))
            rows.append(
                PluginInfo(
                    name=name,
                    status="failed",
                    source=origin.source,
                    package=origin.package,
                    version=origin.version,
                    error=reason,
                )
            )
    for name, origin in disabled.items():
        rows.append(
            PluginInfo(
                name=name, status="disabled", source=origin.source, package=origin.package, version=origin.version
            )
        )
    return rows


def collect_balancers(pm: pluggy.PluginManager) -> dict[str, BalancerEntry]:
    """Call every ``mlxcluster_register_balancers`` implementation; return name → entry.

    Plugins are called in registration order (built-ins first). When two register the same name, the
    later one wins and a warning is logged, so a plugin can replace a built-in strategy on purpose. A
    hook that raises, or registers something invalid, contributes nothing and is recorded as a failure.
    """
    return _collect(pm, "mlxcluster_register_balancers")


def collect_exporters(pm: pluggy.PluginManager) -> dict[str, ExporterEntry]:
    """Call every ``mlxcluster_register_exporters`` implementation; same rules as :func:`collect_balancers`."""
    return _collect(pm, "mlxcluster_register_exporters")


def _collect(pm: pluggy.PluginManager, hook_name: str) -> dict[str, PluginEntry]:
    entries: dict[str, PluginEntry] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        try:
            found = _call_registration_hook(impl)
        except Exception as exc:
            reason = f"{hook_name} raised {type(exc).__name__}: {exc}"
            if isinstance(pm, PluginManager):
                pm.fail(impl.plugin_name, reason)
            else:
                log.warning("plugin %s failed: %s", impl.plugin_name, reason)
            continue
        for name, entry in found.items():
            if name in entries:
                previous = entries[name].plugin
                log.warning("%s %r from plugin %s replaces the one from %s", hook_name, name, entry.plugin, previous)
            entries[name] = entry
    return entries


def _call_registration_hook(impl: pluggy.HookImpl) -> dict[str, PluginEntry]:
    """Call one plugin's registration hook with a ``register`` that validates and collects."""
    found: dict[str, PluginEntry] = {}

    def register(name: str, factory: Callable[..., Any], description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"register(name, ...): name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"register({name!r}, factory, ...): factory must be callable, got {factory!r}")
        text = str(description).strip()
        first_line = text.splitlines()[0] if text else ""
        found[name] = PluginEntry(name=name, factory=factory, description=first_line, plugin=impl.plugin_name)

    impl.function(**dict.fromkeys(impl.argnames, register))
    return found
