"""``mlxcluster.pyz`` (the shiv zipapp) run as a user runs it: ``./mlxcluster.pyz ...`` from a temp dir, with the
system ``python3`` and a clean environment (PATH, HOME, LANG only; no venv).

The pyz is built once per session, bundling the plugins/ packages that register balancers (the build-time
plugin path); the other plugins/ packages are installed with ``pip install --target`` and found through
``MLXCLUSTER_PLUGIN_PATH`` (the run-time path). A bundled plugin would shadow a run-time copy of itself, so
each package is tested one way. ``./mlxcluster.pyz`` is reused when it is newer than its sources and bundles
the same plugins; otherwise the pyz is built into ``build/staging/test-pyz`` (git-ignored, reused the same way).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from loopback import free_port

from mlxcluster.buildinfo import BUILD_INFO_FILE, runtime_tag

ROOT = Path(__file__).resolve().parent.parent
ROOT_PYZ = ROOT / "mlxcluster.pyz"
TEST_BUILD_DIR = ROOT / "build" / "staging" / "test-pyz"
BUILD_INPUTS = [ROOT / "pyproject.toml", ROOT / "build" / "build_pyz.py", ROOT / "build" / "preamble.py"]
SKIPPED_PARTS = {"__pycache__", "build", "dist", ".venv"}
BUILTIN_BALANCERS = {"least_loaded", "round_robin", "random"}
HEAVY_MODULES = {"mlx", "mlx_lm", "aiohttp", "nats", "prometheus_client"}
READY_TIMEOUT_S = 90.0  # two slow CI cores start nats-server and three Python processes

pytestmark = [pytest.mark.zipapp, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class PluginPackage:
    """A package in plugins/: its folder, distribution name and ``mlxcluster`` entry points."""

    path: Path
    name: str
    entry_points: tuple[str, ...]
    balancers: bool
    """Registers balancers (so it is bundled and shows in ``balancers list``)."""


def plugin_packages() -> list[PluginPackage]:
    """The installable packages under plugins/ (none yet is fine)."""
    found = []
    for pyproject in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        sources = [p for p in source_files(pyproject.parent) if p.suffix == ".py" and "tests" not in p.parts]
        registers_balancers = any("mlxcluster_register_balancers" in p.read_text(encoding="utf-8") for p in sources)
        entry_points = tuple(project.get("entry-points", {}).get("mlxcluster", {}))
        found.append(PluginPackage(pyproject.parent, project["name"], entry_points, registers_balancers))
    return found


def source_files(folder: Path) -> list[Path]:
    """Files under ``folder`` that a build reads (no caches, build outputs or egg-info)."""
    return [
        p
        for p in folder.rglob("*")
        if p.is_file() and not SKIPPED_PARTS & set(p.parts) and not any(s.endswith(".egg-info") for s in p.parts)
    ]


def newest_input(plugins: list[PluginPackage]) -> float:
    files = [*BUILD_INPUTS, *source_files(ROOT / "src")]
    for plugin in plugins:
        files += source_files(plugin.path)
    return max(p.stat().st_mtime for p in files)


def build_info(pyz: Path) -> dict | None:
    """The build record inside a pyz, without running it."""
    try:
        with zipfile.ZipFile(pyz) as archive:
            return json.loads(archive.read(f"site-packages/mlxcluster/{BUILD_INFO_FILE}"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def usable(pyz: Path, plugins: list[PluginPackage]) -> bool:
    """Built from the current sources, for this Python, with exactly ``plugins`` bundled."""
    if not pyz.is_file() or pyz.stat().st_mtime <= newest_input(plugins):
        return False
    info = build_info(pyz)
    return (
        info is not None and info.get("tag") == runtime_tag() and info.get("plugins") == sorted(p.name for p in plugins)
    )


def build_pyz(plugins: list[PluginPackage]) -> Path:
    """``./mlxcluster.pyz`` if usable, else the test build (rebuilt when stale, under a lock)."""
    if usable(ROOT_PYZ, plugins):
        return ROOT_PYZ
    TEST_BUILD_DIR.mkdir(parents=True, exist_ok=True)
    pyz = TEST_BUILD_DIR / "mlxcluster.pyz"
    with (TEST_BUILD_DIR / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not usable(pyz, plugins):
            command = [sys.executable, str(ROOT / "build" / "build_pyz.py"), "--output", str(pyz)]
            command += ["--site-packages", str(TEST_BUILD_DIR / "site-packages")]
            command += ["--staging", str(TEST_BUILD_DIR / "staging"), *(str(p.path) for p in plugins)]
            subprocess.run(command, check=True, timeout=840)
            for staged in ("site-packages", "staging"):  # ~250 MB; the pyz has it all
                shutil.rmtree(TEST_BUILD_DIR / staged, ignore_errors=True)
    return pyz


def system_python3() -> Path:
    """The interpreter ``python3`` names outside the venv (a pyenv shim resolved), if it is our Python version;
    else the venv's base interpreter (the pyz holds wheels for that version)."""
    venv_bin = Path(sys.executable).parent.resolve()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p).resolve() != venv_bin)
    found = shutil.which("python3", path=path)
    if found:
        probe = "import sys; print(sys.executable); print(*sys.version_info[:2])"
        out = subprocess.run([found, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/")
        lines = out.stdout.splitlines()
        if out.returncode == 0 and len(lines) == 2 and lines[1].split() == [str(n) for n in sys.version_info[:2]]:
            return Path(lines[0])
    return Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"


@dataclass
class Zipapp:
    """The pyz and a clean environment in which ``/usr/bin/env python3`` is the system Python."""

    pyz: Path
    python: Path
    env: dict[str, str]
    workdir: Path

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120):
        """``./mlxcluster.pyz ARGS`` (through its shebang) from ``cwd`` (default: a fresh temp dir)."""
        return subprocess.run(
            [str(self.pyz), *args],
            cwd=cwd or self.workdir,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def bundled() -> list[PluginPackage]:
    return [p for p in plugin_packages() if p.balancers]


@pytest.fixture(scope="module")
def zipapp(tmp_path_factory: pytest.TempPathFactory, bundled: list[PluginPackage]) -> Iterator[Zipapp]:
    pyz = build_pyz(bundled)
    base = tmp_path_factory.mktemp("zipapp")
    python = system_python3()
    bin_dir = base / "bin"  # `/usr/bin/env python3` finds this one first
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(python)
    home = base / "home"  # shiv unpacks into $HOME/.shiv (~250 MB): removed at the end
    home.mkdir()
    workdir = base / "cwd"
    workdir.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    yield Zipapp(pyz, python, env, workdir)
    shutil.rmtree(home, ignore_errors=True)


def test_help_and_version_with_the_system_python(zipapp: Zipapp) -> None:
    assert "/.venv/" not in str(zipapp.python)
    started = time.monotonic()
    first = zipapp.run("--help")  # the first run unpacks site-packages
    cold_s = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    for command in ("run", "balancers", "models", "config", "plugins"):
        assert command in first.stdout
    unpacked = Path(zipapp.env["HOME"]) / ".shiv"
    assert list(unpacked.glob("mlxcluster.pyz_*/site-packages/mlxcluster"))
    assert not list(unpacked.glob("mlxcluster.pyz_*/site-packages/opentelemetry"))  # the otel extra stays out
    started = time.monotonic()
    version = zipapp.run("--version")
    warm_s = time.monotonic() - started
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("mlxcluster ")
    assert f"zipapp built for {runtime_tag()}" in version.stdout
    print(f"\n{zipapp.pyz} ({zipapp.pyz.stat().st_size / 1e6:.0f} MB): cold {cold_s:.1f} s, warm {warm_s:.2f} s")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["balancers", "list"], 0),
        (["plugins"], 0),
        (["config", "show"], 0),
        (["status", "--url", "http://127.0.0.1:9"], 1),  # nothing listens there: one error line, exit 1
    ],
)
def test_commands_without_a_model_import_no_heavy_modules(zipapp: Zipapp, args: list[str], code: int) -> None:
    result = zipapp.run(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == code, result.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert {"typer", "mlxcluster.config"} <= imported  # what the CLI module imports (shiv imports it by name)
    assert sorted(m for m in imported if m.split(".")[0] in HEAVY_MODULES) == []


def test_balancers_list_shows_builtins_and_bundled_plugins(zipapp: Zipapp, bundled: list[PluginPackage]) -> None:
    result = zipapp.run("balancers", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert "failed" not in result.stderr
    rows = json.loads(result.stdout)
    assert BUILTIN_BALANCERS <= {row["name"] for row in rows if row["package"] == "mlxcluster"}
    assert {p.name for p in bundled} <= {row["package"] for row in rows}
    table = zipapp.run("balancers", "list")
    assert table.returncode == 0 and "least_loaded" in table.stdout


def test_config_init_in_any_directory(zipapp: Zipapp, tmp_path: Path) -> None:
    result = zipapp.run("config", "init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cluster.toml").is_file()
    check = zipapp.run("config", "validate", cwd=tmp_path)
    assert check.returncode == 0 and "cluster.toml: ok" in check.stdout, check.stderr


def test_plugin_directory_at_run_time(zipapp: Zipapp, tmp_path: Path) -> None:
    runtime = [p for p in plugin_packages() if not p.balancers]
    if not runtime:
        pytest.skip("no plugins/ package left unbundled to load at run time")
    plugin_dir = tmp_path / "plugins"
    for plugin in runtime:
        source = tmp_path / "src" / plugin.path.name  # build a copy: setuptools writes build/ next to the sources
        shutil.copytree(plugin.path, source, ignore=shutil.ignore_patterns(*SKIPPED_PARTS, "*.egg-info"))
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
        subprocess.run([*command, "--target", str(plugin_dir), str(source)], check=True, timeout=300)
    without = zipapp.run("plugins", "--json")
    assert without.returncode == 0, without.stderr
    assert not {p.name for p in runtime} & {row["package"] for row in json.loads(without.stdout)}
    result = zipapp.run("plugins", "--json", env={"MLXCLUSTER_PLUGIN_PATH": str(plugin_dir)})
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for plugin in runtime:
        for name in plugin.entry_points:
            assert rows[name]["status"] == "loaded", rows[name]
            assert rows[name]["package"] == plugin.name


def test_dual_mode_answers_a_request_and_stops_cleanly(zipapp: Zipapp, bundled: list[PluginPackage]) -> None:
    listing = json.loads(zipapp.run("balancers", "list", "--json").stdout)
    plugin_balancers = [row["name"] for row in listing if row["package"] in {p.name for p in bundled}]
    controller_port, nats_port = free_port(), free_port()
    env = {
        **zipapp.env,
        "MLXCLUSTER_NATS_EMBEDDED_PORT": str(nats_port),
        "MLXCLUSTER_NATS_URL": f"nats://127.0.0.1:{nats_port}",
        "MLXCLUSTER_NATS_EMBEDDED_HTTP_PORT": "0",
        "MLXCLUSTER_CONTROLLER_PORT": str(controller_port),
    }
    if plugin_balancers:  # the bundled plugin must load in the controller child too
        env["MLXCLUSTER_LOAD_BALANCING_STRATEGY"] = plugin_balancers[0]
    log_path = zipapp.workdir / "dual.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(zipapp.pyz), "run", "--mode", "dual", "--engine", "echo"],
            cwd=zipapp.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    seen: dict[int, psutil.Process] = {}
    url = f"http://127.0.0.1:{controller_port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready(url):
            assert proc.poll() is None, f"dual mode exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready in {READY_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.2)
        assert chat(url, "hello from the zipapp") == "hello from the zipapp"
        with urllib.request.urlopen(f"{url}/api/cluster/status", timeout=10) as response:
            status = json.load(response)
        assert status["balancer"] == env.get("MLXCLUSTER_LOAD_BALANCING_STRATEGY", "cache_aware")
        children = psutil.Process(proc.pid).children(recursive=True)
        seen.update((c.pid, c) for c in children)
        commands = [" ".join(c.cmdline()) for c in children]
        [server] = [c for c in commands if "nats-server" in c]
        assert f"{zipapp.env['HOME']}/.shiv/" in server and "/site-packages/bin/nats-server" in server
        python3 = shutil.which("python3", path=zipapp.env["PATH"])
        for role in ("controller", "worker"):  # children: the same system Python, `-m mlxcluster`
            assert f"{python3} -m mlxcluster run --mode {role}" in commands, commands
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-4000:]
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for child in seen.values():
            with contextlib.suppress(psutil.Error):
                child.kill()


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def chat(url: str, text: str) -> str:
    """One non-streaming chat completion with the echo engine; the reply's content."""
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["choices"][0]["message"]["content"]
