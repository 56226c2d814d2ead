"""Plugin discovery: fixture-registered plugins, installed entry points from a plugin dir, broken and disabled ones."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlxcluster.api import WorkerView, hookimpl
from mlxcluster.cli.balancers import balancers_app
from mlxcluster.config import Config, LoadBalancingSection, PluginsSection
from mlxcluster.controller.routing.balancing import build_balancer
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.plugins import (
    DEFAULT_PLUGINS,
    PLUGIN_PATH_ENV,
    PluginManager,
    collect_balancers,
    collect_exporters,
    get_plugin_manager,
    list_plugins,
)
from mlxcluster.protocol import InferenceRequest

BUILTIN_NAMES = {"cache_aware", "round_robin", "least_loaded", "hardware_aware", "random", "prefix_affinity"}

GOOD_PLUGIN = '''
from mlxcluster.api import hookimpl


class Last:
    """Always the worker with the greatest id."""

    def pick(self, workers, request):
        return max(workers, key=lambda w: w.id) if workers else None


@hookimpl
def mlxcluster_register_balancers(register):
    register("last_worker", Last, "Always the worker with the greatest id.\\nSecond line is dropped.")
'''

MakePlugin = Callable[..., tuple[Path, str]]


@pytest.fixture
def make_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakePlugin]:
    """Write an installed-looking distribution (dist-info + module) into a plugin dir; undo sys.path/modules after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules: list[str] = []

    def make(
        source: str, entry_name: str = "test-plugin", dist: str = "mlxcluster-test-plugin", directory: str = "plugins"
    ) -> tuple[Path, str]:
        site_dir = tmp_path / directory
        site_dir.mkdir(exist_ok=True)
        module = f"mlxcluster_test_plugin_{uuid.uuid4().hex[:8]}"
        modules.append(module)
        (site_dir / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        info = site_dir / f"{dist.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[mlxcluster]\n{entry_name} = {module}\n", encoding="utf-8")
        return site_dir, module

    yield make
    for module in modules:
        sys.modules.pop(module, None)


class FixturePlugin:
    """A plugin object registered directly, as a test or an embedding application would."""

    @hookimpl
    def mlxcluster_register_balancers(self, register):  # type: ignore[no-untyped-def]
        register("first_worker", FirstWorker, "Always the first worker.")

    @hookimpl
    def mlxcluster_register_exporters(self, register):  # type: ignore[no-untyped-def]
        register("null", object, "Discards everything.")


class FirstWorker:
    def pick(self, workers, request):  # type: ignore[no-untyped-def]
        return workers[0] if workers else None


@pytest.fixture
def pm_with_fixture_plugin() -> Iterator[PluginManager]:
    pm = get_plugin_manager(env={})
    plugin = FixturePlugin()
    pm.register(plugin, name="fixture-plugin")
    yield pm
    if pm.is_registered(plugin):
        pm.unregister(plugin)


def workers() -> list[WorkerView]:
    return [WorkerView(id=i, status="online") for i in ("a", "c", "b")]


def request() -> InferenceRequest:
    return InferenceRequest(request_id="r", model="m", prompt="hi")


def test_builtins_load_through_the_hook() -> None:
    pm = get_plugin_manager(env={})
    assert DEFAULT_PLUGINS == ("mlxcluster.builtin.balancers", "mlxcluster.builtin.exporters")
    entries = collect_balancers(pm)
    assert BUILTIN_NAMES <= set(entries)
    assert {entries[name].plugin for name in BUILTIN_NAMES} == {"builtin-balancers"}
    assert all(entries[name].description for name in BUILTIN_NAMES)
    (row,) = [p for p in list_plugins(pm) if p.name == "builtin-balancers"]
    assert row.status == "loaded" and row.source == "builtin" and row.package == "mlxcluster"
    assert row.hooks == ("mlxcluster_register_balancers",) and row.version
    exporters = collect_exporters(pm)
    assert {exporters[name].plugin for name in ("prometheus", "log")} == {"builtin-exporters"}
    (row,) = [p for p in list_plugins(pm) if p.name == "builtin-exporters"]
    assert row.status == "loaded" and row.hooks == ("mlxcluster_register_exporters",)
    assert pm.failures == {}
    assert get_plugin_manager(env={}) is not pm  # a new manager each call


def test_fixture_registered_plugin(pm_with_fixture_plugin: PluginManager) -> None:
    pm = pm_with_fixture_plugin
    entries = collect_balancers(pm)
    assert entries["first_worker"].plugin == "fixture-plugin"
    assert build_balancer(pm, LoadBalancingSection(strategy="first_worker")).pick(workers(), request()).id == "a"
    exporters = collect_exporters(pm)
    assert exporters["null"].plugin == "fixture-plugin" and {"prometheus", "log"} <= set(exporters)
    (row,) = [p for p in list_plugins(pm) if p.name == "fixture-plugin"]
    assert row.source == "registered" and row.hooks == (
        "mlxcluster_register_balancers",
        "mlxcluster_register_exporters",
    )


def test_fixture_plugin_is_gone_after_unregister(pm_with_fixture_plugin: PluginManager) -> None:
    pm = pm_with_fixture_plugin
    pm.unregister(name="fixture-plugin")
    assert "first_worker" not in collect_balancers(pm)
    assert "fixture-plugin" not in {row.name for row in list_plugins(pm)}


def test_entry_point_plugin_from_plugin_path(make_plugin: MakePlugin) -> None:
    site_dir, module = make_plugin(GOOD_PLUGIN)
    pm = get_plugin_manager(PluginsSection(paths=[str(site_dir)]), env={})
    assert pm.failures == {}
    entries = collect_balancers(pm)
    assert BUILTIN_NAMES <= set(entries)
    entry = entries["last_worker"]
    assert entry.plugin == "test-plugin" and entry.description == "Always the worker with the greatest id."
    balancer = build_balancer(pm, LoadBalancingSection(strategy="last_worker"))
    assert balancer.pick(workers(), request()).id == "c"
    (row,) = [p for p in list_plugins(pm) if p.name == "test-plugin"]
    assert (row.status, row.source, row.package, row.version) == (
        "loaded",
        "entry point",
        "mlxcluster-test-plugin",
        "1.2.3",
    )
    assert row.hooks == ("mlxcluster_register_balancers",)


def test_entry_point_plugin_from_env_path(make_plugin: MakePlugin, tmp_path: Path) -> None:
    site_dir, _ = make_plugin(GOOD_PLUGIN)
    env = {PLUGIN_PATH_ENV: os.pathsep.join([str(tmp_path / "missing"), str(site_dir)])}
    pm = get_plugin_manager(env=env)
    assert "last_worker" in collect_balancers(pm)


BROKEN_PLUGINS = {
    "import-error": ("import not_a_real_module_xyz\n", "ModuleNotFoundError"),
    "raises": ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    "bad-signature": (
        "from mlxcluster.api import hookimpl\n\n"
        "@hookimpl\ndef mlxcluster_register_balancers(register, extra):\n    pass\n",
        "extra",
    ),
    "unknown-hook": (
        "from mlxcluster.api import hookimpl\n\n@hookimpl\ndef mlxcluster_register_balancer(register):\n    pass\n",
        "unknown hook mlxcluster_register_balancer",
    ),
}


def test_broken_plugins_are_reported_and_the_rest_still_load(
    make_plugin: MakePlugin, caplog: pytest.LogCaptureFixture
) -> None:
    site_dir, _ = make_plugin(GOOD_PLUGIN)
    for name, (source, _) in BROKEN_PLUGINS.items():
        make_plugin(source, entry_name=name, dist=f"broken-{name}")
    with caplog.at_level(logging.WARNING, logger="mlxcluster.plugins"):
        pm = get_plugin_manager(PluginsSection(paths=[str(site_dir)]), env={})
    assert set(pm.failures) == set(BROKEN_PLUGINS)
    for name, (_, reason) in BROKEN_PLUGINS.items():
        assert reason in pm.failures[name], pm.failures[name]
        assert f"plugin {name} failed" in caplog.text
    assert {"last_worker", *BUILTIN_NAMES} <= set(collect_balancers(pm))
    rows = {row.name: row for row in list_plugins(pm)}
    assert rows["raises"].status == "failed" and "boom" in (rows["raises"].error or "")
    assert (rows["raises"].package, rows["raises"].version) == ("broken-raises", "1.2.3")
    assert not pm.has_plugin("unknown-hook") and not pm.has_plugin("bad-signature")


def test_plugin_whose_hook_raises_contributes_nothing(make_plugin: MakePlugin) -> None:
    source = (
        "from mlxcluster.api import hookimpl\n\n"
        "@hookimpl\ndef mlxcluster_register_balancers(register):\n"
        "    register('half', object, 'registered before the error')\n"
        "    register('', object, 'invalid name')\n"
    )
    site_dir, _ = make_plugin(source, entry_name="half-broken")
    pm = get_plugin_manager(PluginsSection(paths=[str(site_dir)]), env={})
    entries = collect_balancers(pm)
    assert "half" not in entries and BUILTIN_NAMES <= set(entries)
    assert "non-empty string" in pm.failures["half-broken"]


@pytest.mark.parametrize("disabled", ["test-plugin", "mlxcluster_test_plugin"])
def test_disabled_plugin_is_never_imported(make_plugin: MakePlugin, disabled: str) -> None:
    site_dir, module = make_plugin(GOOD_PLUGIN)
    pm = get_plugin_manager(PluginsSection(paths=[str(site_dir)], disabled=[disabled]), env={})
    assert "last_worker" not in collect_balancers(pm)
    assert module not in sys.modules
    (row,) = [p for p in list_plugins(pm) if p.name == "test-plugin"]
    assert row.status == "disabled" and row.package == "mlxcluster-test-plugin"


def test_builtins_can_be_disabled_too() -> None:
    pm = get_plugin_manager(PluginsSection(disabled=["builtin-balancers"]), env={})
    assert not BUILTIN_NAMES & set(collect_balancers(pm))  # installed plugins' strategies remain
    assert [p.status for p in list_plugins(pm) if p.name == "builtin-balancers"] == ["disabled"]


def test_duplicate_balancer_name_later_plugin_wins(
    pm_with_fixture_plugin: PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    class Override:
        @hookimpl
        def mlxcluster_register_balancers(self, register):  # type: ignore[no-untyped-def]
            register("round_robin", FirstWorker, "My round robin.")

    pm_with_fixture_plugin.register(Override(), name="override")
    with caplog.at_level(logging.WARNING):
        entries = collect_balancers(pm_with_fixture_plugin)
    assert entries["round_robin"].plugin == "override"
    assert "'round_robin' from plugin override replaces the one from builtin-balancers" in caplog.text


def test_balancers_list_cli(make_plugin: MakePlugin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site_dir, _ = make_plugin(GOOD_PLUGIN)
    make_plugin("raise ImportError('missing native lib')\n", entry_name="broken", dist="broken-dist")
    config = tmp_path / "cluster.toml"
    config.write_text(f'[plugins]\npaths = ["{site_dir}"]\n[load_balancing]\nstrategy = "last_worker"\n')
    monkeypatch.delenv(PLUGIN_PATH_ENV, raising=False)
    monkeypatch.delenv("MLXCLUSTER_CONFIG", raising=False)
    runner = CliRunner()
    result = runner.invoke(balancers_app, ["list", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert BUILTIN_NAMES | {"last_worker"} <= set(rows)
    assert rows["last_worker"] == {
        "name": "last_worker",
        "plugin": "test-plugin",
        "package": "mlxcluster-test-plugin",
        "version": "1.2.3",
        "description": "Always the worker with the greatest id.",
        "selected": True,
    }
    assert rows["least_loaded"]["package"] == "mlxcluster" and not rows["least_loaded"]["selected"]
    assert "plugin broken failed: import failed: ImportError: missing native lib" in result.stderr
    table = runner.invoke(balancers_app, ["list", "-c", str(config)])
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "DESCRIPTION"]
    assert any(
        line.startswith("* last_worker") and "test-plugin (mlxcluster-test-plugin 1.2.3)" in line for line in lines
    )
    bad = runner.invoke(balancers_app, ["list", "-c", str(tmp_path / "nope.toml")])
    assert bad.exit_code == 2 and "cannot read" in bad.stderr


def test_balancers_list_imports_no_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mlxcluster.cli.balancers import balancers_app\n"
        "result = CliRunner().invoke(balancers_app, ['list'])\n"
        "assert result.exit_code == 0, result.output\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'mlx', 'mlx_lm', 'aiohttp', 'nats'})\n"
        "print(heavy)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


CONTROLLER_WITH_PLUGINS = """
import asyncio, json, sys
from mlxcluster.bus import Bus
from mlxcluster.config import from_dict
from mlxcluster.controller.app import create_app
from mlxcluster.plugins import get_plugin_manager, list_plugins


async def main():
    config = from_dict(json.loads(sys.argv[1]))
    pm = get_plugin_manager(config.plugins, env={})
    bus = await Bus.connect(config.nats, name="plugin-isolation", attempts=5)
    try:
        create_app(config, bus, pm)
    finally:
        await bus.close()
    print(json.dumps({
        "builtin_modules": sorted(m for m in sys.modules if m.startswith("mlxcluster.builtin")),
        "status": {p.name: p.status for p in list_plugins(pm) if p.name.startswith("builtin-")},
    }))


asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("disabled", "imported"),
    [
        (
            [],
            [
                "mlxcluster.builtin",
                "mlxcluster.builtin.balancers",
                "mlxcluster.builtin.cache_aware",
                "mlxcluster.builtin.exporters",
                "mlxcluster.builtin.telemetry_metrics",  # the prometheus exporter's bus and accelerator series
            ],
        ),
        (
            ["builtin-balancers"],
            ["mlxcluster.builtin", "mlxcluster.builtin.exporters", "mlxcluster.builtin.telemetry_metrics"],
        ),
        (["builtin-balancers", "builtin-exporters"], []),
    ],
)
async def test_a_disabled_builtin_is_never_imported_by_a_controller(
    make_plugin: MakePlugin,
    cluster_config: Config,
    nats_server: EmbeddedNatsServer,
    disabled: list[str],
    imported: list[str],
) -> None:
    """A controller built with built-ins disabled (and a plugin's strategy) never imports their modules."""
    site_dir, _ = make_plugin(GOOD_PLUGIN)
    settings = {
        "nats": {"url": cluster_config.nats.url},
        "load_balancing": {"strategy": "last_worker"},
        "plugins": {"paths": [str(site_dir)], "disabled": disabled},
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CONTROLLER_WITH_PLUGINS, json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["builtin_modules"] == imported
    assert found["status"] == {
        name: "disabled" if name in disabled else "loaded" for name in ("builtin-balancers", "builtin-exporters")
    }


def test_importing_mlxcluster_loads_no_heavy_modules() -> None:
    """``import mlxcluster`` (and its plugin API) loads neither aiohttp, NATS, MLX nor the controller."""
    code = (
        "import sys\n"
        "import mlxcluster, mlxcluster.api\n"
        "assert mlxcluster.WorkerView is mlxcluster.api.WorkerView and mlxcluster.hookimpl is mlxcluster.api.hookimpl\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'mlx', 'mlx_lm', 'aiohttp', 'nats'}\n"
        "               or m.startswith(('mlxcluster.controller', 'mlxcluster.worker', 'mlxcluster.builtin')))\n"
        "print(heavy)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
