"""Build ``mlxcluster.pyz``: stage mlxcluster, its dependencies and plugins with pip, then zip them with shiv.

    python build/build_pyz.py [--output mlxcluster.pyz] [PLUGIN_DIR ...]

``make pyz PLUGINS="plugins/a plugins/b"`` runs it with the venv's Python. The wheels it bundles (mlx,
msgspec, ...) are CPython-version and platform specific, so the pyz runs only on the kind of Python that
built it: that Python's tag (``cp311-linux-x86_64``) goes into ``mlxcluster/_build_info.json``, which
``mlxcluster --version`` prints and the preamble checks at start.

Sources are copied into ``build/staging`` before pip builds them, so setuptools' own ``build/`` and
``*.egg-info`` folders never land in the source tree (nor stale files from them in the wheel).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PREAMBLE = HERE / "preamble.py"
SHEBANG = "/usr/bin/env python3"
CONSOLE_SCRIPT = "mlxcluster"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".venv", ".git")


def load_buildinfo() -> ModuleType:
    """``mlxcluster.buildinfo`` from the source tree, without importing the package (or its dependencies)."""
    spec = importlib.util.spec_from_file_location("_mlxcluster_buildinfo", ROOT / "src/mlxcluster/buildinfo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project_name(source: Path) -> str:
    """The distribution name in ``source/pyproject.toml`` (the folder name if it has none)."""
    try:
        with (source / "pyproject.toml").open("rb") as file:
            return tomllib.load(file)["project"]["name"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return source.name


def copy_sources(staging: Path, plugins: list[Path]) -> list[Path]:
    """Copy the project (top-level files and ``src/``) and each plugin folder into ``staging``."""
    project, plugin_copies = staging / "mlxcluster", staging / "plugins"
    for previous in (project, plugin_copies):
        if previous.exists():
            shutil.rmtree(previous)
    project.mkdir(parents=True)
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, project / path.name)
    shutil.copytree(ROOT / "src", project / "src", ignore=IGNORED)
    copies = [project]
    for index, plugin in enumerate(plugins):
        copy = plugin_copies / f"{index}-{plugin.name}"
        shutil.copytree(plugin, copy, ignore=IGNORED)
        copies.append(copy)
    return copies


def stage(site_packages: Path, sources: list[Path]) -> None:
    """``pip install --target site-packages`` the sources and every dependency, with this Python."""
    if site_packages.exists():
        shutil.rmtree(site_packages)
    command = [sys.executable, "-m", "pip", "install", "--target", str(site_packages), "--upgrade", "--quiet"]
    command += ["--disable-pip-version-check", "--no-compile", *map(str, sources)]
    subprocess.run(command, check=True)


def write_build_info(site_packages: Path, plugins: list[str]) -> dict:
    """Record what this build is for in the staged package; return the record."""
    buildinfo = load_buildinfo()
    info = buildinfo.runtime_info(plugins)
    target = site_packages / "mlxcluster" / buildinfo.BUILD_INFO_FILE
    target.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def zip_with_shiv(site_packages: Path, output: Path) -> None:
    """Make the zipapp (written beside ``output``, then renamed over it, so a failed build leaves the old one)."""
    partial = output.with_name(output.stem + ".partial.pyz")
    command = [sys.executable, "-m", "shiv", "--site-packages", str(site_packages), "--console-script", CONSOLE_SCRIPT]
    command += ["--python", SHEBANG, "--preamble", str(PREAMBLE), "--output-file", str(partial)]
    try:
        subprocess.run(command, check=True)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def build(output: Path, plugins: list[Path], site_packages: Path, staging: Path) -> dict:
    """Stage, record and zip; return the build record."""
    missing = [str(p) for p in plugins if not (p / "pyproject.toml").is_file() and not (p / "setup.py").is_file()]
    if missing:
        raise SystemExit(f"error: not a Python package (no pyproject.toml): {', '.join(missing)}")
    started = time.monotonic()
    stage(site_packages, copy_sources(staging, plugins))
    staged = time.monotonic()
    info = write_build_info(site_packages, [project_name(p) for p in plugins])
    output.parent.mkdir(parents=True, exist_ok=True)
    zip_with_shiv(site_packages, output)
    done = time.monotonic()
    size_mb = output.stat().st_size / 1e6
    plugin_text = f", plugins: {', '.join(info['plugins'])}" if info["plugins"] else ""
    print(
        f"wrote {output} ({size_mb:.0f} MB) built for {info['tag']}{plugin_text} "
        f"in {done - started:.0f} s (pip {staged - started:.0f} s, shiv {done - staged:.0f} s)"
    )
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plugins", nargs="*", type=Path, help="plugin package folders to bundle")
    parser.add_argument("--output", "-o", type=Path, default=ROOT / "mlxcluster.pyz", help="the zipapp to write")
    parser.add_argument("--site-packages", type=Path, default=HERE / "site-packages", help="pip's staging target")
    parser.add_argument("--staging", type=Path, default=HERE / "staging", help="where sources are copied to build")
    args = parser.parse_args(argv)
    build(
        args.output.resolve(),
        [p.resolve() for p in args.plugins],
        args.site_packages.resolve(),
        args.staging.resolve(),
    )


if __name__ == "__main__":
    main()
