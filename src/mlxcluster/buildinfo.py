"""What a zipapp was built for: the build script writes :data:`BUILD_INFO_FILE` into the staged package.

The zipapp bundles CPython-version- and platform-specific wheels (mlx, msgspec, ...), so it runs only
on the interpreter kind it was built with. ``mlxcluster --version`` shows the build's tag, and the
zipapp's preamble refuses a mismatched interpreter with one clear line instead of an ImportError.
Standard library only: the preamble imports this before any native extension is loaded.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

BUILD_INFO_FILE = "_build_info.json"
"""Written next to this module in the zipapp's staged site-packages; absent in a normal install."""


def runtime_tag() -> str:
    """The running interpreter as a wheel-style tag, ``cp311-linux-x86_64``."""
    impl = {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, sys.implementation.name)
    return f"{impl}{sys.version_info.major}{sys.version_info.minor}-{sys.platform}-{platform.machine().lower()}"


def runtime_info(plugins: list[str] | None = None) -> dict[str, Any]:
    """The build record for this interpreter (what the build script writes)."""
    libc, libc_version = platform.libc_ver()
    return {
        "tag": runtime_tag(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "libc": f"{libc} {libc_version}".strip(),
        "plugins": sorted(plugins or []),
    }


def read_build_info(package_dir: Path | None = None) -> dict[str, Any] | None:
    """The zipapp's build record, or ``None`` when not running from a zipapp build."""
    path = (package_dir or Path(__file__).parent) / BUILD_INFO_FILE
    try:
        info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return info
    except (OSError, ValueError):
        return None


def mismatch(info: dict[str, Any]) -> str | None:
    """Why this interpreter cannot run a zipapp built as ``info`` says, or ``None`` if it can."""
    built_for = info.get("tag")
    if not built_for or built_for == runtime_tag():
        return None
    wanted = info.get("python_version", "3")
    return (
        f"this mlxcluster.pyz was built for {built_for} ({info.get('python', '?')}) but runs on {runtime_tag()} "
        f"({sys.executable}), so its native libraries will not load: run it as `python{wanted} mlxcluster.pyz`, "
        "or rebuild it with this Python"
    )
