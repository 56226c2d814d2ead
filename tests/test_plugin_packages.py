"""The real plugin packages in plugins/: installed in the venv (entry points), and loaded at run time from a
``pip install --target`` folder named by ``[plugins] paths`` or ``MLXCLUSTER_PLUGIN_PATH`` in a fresh process
whose environment has mlxcluster but not the plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cluster_harness import Cluster, with_sections
from typer.testing import CliRunner

from mlxcluster.cli import app as cli_app
from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer

ROOT = Path(__file__).resolve().parents[1]
POWER_OF_TWO = ROOT / "plugins" / "mlxcluster-balancer-power-of-two"
JSONL = ROOT / "plugins" / "mlxcluster-exporter-jsonl"
PLUGIN_DISTS = ("mlxcluster_balancer_power_of_two", "mlxcluster_exporter_jsonl")
HEAVY = {"mlx", "mlx_lm", "aiohttp", "nats", "prometheus_client"}


# --- installed in the venv (make setup: pip install -e plugins/...) --------------------------


def test_installed_plugins_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLXCLUSTER_CONFIG", raising=False)
    monkeypatch.delenv("MLXCLUSTER_PLUGIN_PATH", raising=False)
    runner = CliRunner()
    balancers = runner.invoke(cli_app, ["balancers", "list", "--json"])
    assert balancers.exit_code == 0, balancers.output
    row = next(r for r in json.loads(balancers.stdout) if r["name"] == "power_of_two")
    assert (row["plugin"], row["package"], row["version"]) == (
        "power-of-two",
        "mlxcluster-balancer-power-of-two",
        "0.1.0",
    )
    exporters = runner.invoke(cli_app, ["exporters", "list", "--json"])
    assert exporters.exit_code == 0, exporters.output
    rows = {r["name"]: r for r in json.loads(exporters.stdout)}
    assert {"prometheus", "log", "jsonl"} <= set(rows)
    assert (
        rows["jsonl"]["package"] == "mlxcluster-exporter-jsonl" and rows["prometheus"]["plugin"] == "builtin-exporters"
    )
    assert not any(r["enabled"] for r in rows.values())
    plugins = runner.invoke(cli_app, ["plugins", "--json"])
    assert plugins.exit_code == 0, plugins.output
    found = {r["name"]: r for r in json.loads(plugins.stdout)}
    assert found["power-of-two"] == {
        "name": "power-of-two",
        "status": "loaded",
        "source": "entry point",
        "package": "mlxcluster-balancer-power-of-two",
        "version": "0.1.0",
        "hooks": ["mlxcluster_register_balancers"],
        "error": None,
    }
    assert found["builtin-exporters"]["hooks"] == ["mlxcluster_register_exporters"]
    table = runner.invoke(cli_app, ["plugins"])
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split() == ["NAME", "VERSION", "STATUS", "SOURCE", "HOOKS"]
    assert any(line.split()[:3] == ["jsonl", "0.1.0", "loaded"] for line in table.stdout.splitlines())


def test_plugins_and_exporters_cli_failures_and_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "site"
    broken.mkdir()
    (broken / "broken_plugin_mod.py").write_text("raise ImportError('missing native lib')\n")
    info = broken / "broken_plugin-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[mlxcluster]\nbroken = broken_plugin_mod\n")
    config = tmp_path / "cluster.toml"
    config.write_text(
        f'[plugins]\npaths = ["{broken}"]\ndisabled = ["jsonl"]\n[metrics]\nexporters = ["prometheus", "statsd"]\n'
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("MLXCLUSTER_PLUGIN_PATH", raising=False)
    runner = CliRunner()
    result = runner.invoke(cli_app, ["plugins", "--json", "-c", str(config)])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["broken"]["status"] == "failed" and "ImportError: missing native lib" in rows["broken"]["error"]
    assert (rows["broken"]["package"], rows["broken"]["version"]) == ("broken-plugin", "2.0")
    assert rows["jsonl"]["status"] == "disabled" and rows["jsonl"]["package"] == "mlxcluster-exporter-jsonl"
    table = runner.invoke(cli_app, ["plugins", "-c", str(config)]).stdout
    assert "↳ import failed: ImportError: missing native lib" in table
    listed = runner.invoke(cli_app, ["exporters", "list", "-c", str(config)])
    assert listed.exit_code == 0
    assert any(line.startswith("* prometheus") for line in listed.stdout.splitlines())
    assert "jsonl" not in listed.stdout
    assert "metrics.exporters names 'statsd', which no plugin registers" in listed.stderr
    assert "plugin broken failed" in listed.stderr


@pytest.mark.parametrize("command", [["plugins"], ["exporters", "list"], ["balancers", "list"]])
def test_plugin_commands_import_no_heavy_modules(command: list[str]) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mlxcluster.cli import app\n"
        f"result = CliRunner().invoke(app, {command!r})\n"
        "assert result.exit_code == 0, result.output\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
async def cluster(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    async with Cluster(cluster_config) as running:
        yield running


async def test_power_of_two_serves_requests_over_the_workers(cluster: Cluster) -> None:
    config = with_sections(cluster.config, load_balancing={"strategy": "power_of_two"})
    for worker_id in ("w1", "w2", "w3"):
        await cluster.start_worker(worker_id)
    controller = await cluster.start_controller(config)
    await controller.wait_online("w1", "w2", "w3")
    client = controller.client()
    for _ in range(30):
        reply = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hi"
    served = controller.served()
    assert set(served) == {"w1", "w2", "w3"} and sum(served.values()) == 30
    assert controller.ctx.balancer_name == "power_of_two"


# --- loaded at run time from a pip install --target folder ------------------------------------


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv that sees this venv's packages (mlxcluster included) except the plugin packages."""
    root = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    python = root / "bin" / "python"
    target = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    source = Path(sysconfig.get_paths()["purelib"])
    for entry in source.iterdir():
        if any(dist in entry.name for dist in PLUGIN_DISTS):
            continue
        link = target / entry.name
        if not link.exists():
            link.symlink_to(entry)
    return python


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --target DIR --no-deps`` of the power-of-two plugin (built from a copy of its source)."""
    work = tmp_path_factory.mktemp("plugin-target")
    source = work / "src" / POWER_OF_TWO.name
    shutil.copytree(POWER_OF_TWO, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    out = subprocess.run([*command, "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (target / "mlxcluster_power_of_two" / "__init__.py").is_file()
    return target


def run_bare(python: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run(
        [str(python), "-m", "mlxcluster", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **env},
        timeout=120,
    )


def balancer_names(result: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_plugin_path_from_config(bare_python: Path, plugin_dir: Path, tmp_path: Path) -> None:
    without = balancer_names(run_bare(bare_python, ["balancers", "list", "--json"], tmp_path))
    assert "power_of_two" not in without and "least_loaded" in without  # really not installed there

    (tmp_path / "cluster.toml").write_text(
        f'[plugins]\npaths = ["{plugin_dir}"]\n[load_balancing]\nstrategy = "power_of_two"\n'
    )
    rows = balancer_names(run_bare(bare_python, ["balancers", "list", "--json"], tmp_path))
    assert rows["power_of_two"]["selected"] and rows["power_of_two"]["package"] == "mlxcluster-balancer-power-of-two"

    code = (
        "import json, sys\n"
        "from mlxcluster.config import load\n"
        "from mlxcluster.plugins import get_plugin_manager, list_plugins\n"
        "pm = get_plugin_manager(load('cluster.toml').plugins)\n"
        "(row,) = [r for r in list_plugins(pm) if r.name == 'power-of-two']\n"
        "print(json.dumps([row.status, row.source, sys.modules['mlxcluster_power_of_two'].__file__]))\n"
    )
    out = subprocess.run(
        [str(bare_python), "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    status, source, module_file = json.loads(out.stdout)
    assert (status, source) == ("loaded", "entry point")
    assert Path(module_file).is_relative_to(plugin_dir)


def test_plugin_path_from_env_and_disabled(bare_python: Path, plugin_dir: Path, tmp_path: Path) -> None:
    env = {"MLXCLUSTER_PLUGIN_PATH": os.pathsep.join([str(tmp_path / "missing"), str(plugin_dir)])}
    rows = balancer_names(run_bare(bare_python, ["balancers", "list", "--json"], tmp_path, **env))
    assert rows["power_of_two"]["plugin"] == "power-of-two"

    (tmp_path / "cluster.toml").write_text('[plugins]\ndisabled = ["mlxcluster-balancer-power-of-two"]\n')
    rows = balancer_names(run_bare(bare_python, ["balancers", "list", "--json"], tmp_path, **env))
    assert "power_of_two" not in rows
    plugins = run_bare(bare_python, ["plugins", "--json"], tmp_path, **env)
    assert plugins.returncode == 0, plugins.stderr
    (row,) = [r for r in json.loads(plugins.stdout) if r["name"] == "power-of-two"]
    assert row["status"] == "disabled"
