"""The Linux CPU fast path: run MLX on the system OpenBLAS instead of the BLAS bundled with ``mlx-cpu``.

The ``mlx-cpu`` wheel ships the reference (netlib) BLAS, so float matmuls crawl (~4 GFLOP/s on a
small x86 box); Debian's ``libopenblas0-pthread`` does the same work ~40× faster. MLX links
``cblas_sgemm`` through the dynamic linker, so preloading OpenBLAS (``LD_PRELOAD``) is all it takes:
symbols in the preloaded library win over the wheel's copy. The parent process sets it in a worker
child's environment (:func:`preload_env`); a standalone worker re-executes itself once
(:func:`maybe_reexec_with_openblas`). Without OpenBLAS everything works, only slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REEXEC_GUARD = "MLXCLUSTER_OPENBLAS_REEXEC"
"""Set in the environment of a re-executed worker so it never re-executes twice."""

DISABLE_ENV = "MLXCLUSTER_NO_OPENBLAS"
"""Set to a non-empty value to keep the bundled BLAS (for comparisons)."""

_ARCH_DIRS = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}
_BLAS_SYMBOL = b"cblas_sgemm"


def openblas_path() -> str | None:
    """The system OpenBLAS shared library (Debian/Ubuntu ``libopenblas0-*``), or None if absent or not Linux."""
    if sys.platform != "linux":
        return None
    triplet = _ARCH_DIRS.get(platform.machine(), f"{platform.machine()}-linux-gnu")
    candidates = [
        f"/usr/lib/{triplet}/libopenblas.so.0",
        f"/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0",
        f"/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    found = ctypes.util.find_library("openblas")
    if found is None:
        return None
    if os.path.isabs(found):
        return found if os.path.isfile(found) else None
    for libdir in (f"/usr/lib/{triplet}", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        if os.path.isfile(path := os.path.join(libdir, found)):
            return path
    return found  # a soname the dynamic linker resolves by itself


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _global_blas_provider() -> str | None:
    """The file that provides ``cblas_sgemm`` in the process's global symbol scope (a preloaded BLAS), if any."""
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(getattr(process, _BLAS_SYMBOL.decode()), ctypes.c_void_p).value
        dladdr = process.dladdr
    except (AttributeError, OSError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    info = _DlInfo()
    if not address or not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _mapped_libraries() -> list[str]:
    """Paths of the shared objects mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if line.count(" ") >= 5 and "/" in line}
    except OSError:
        return []
    return sorted(path for path in paths if ".so" in path)


def _describe(path: str) -> str:
    name = Path(path).name
    if "openblas" in name and "scipy_openblas" not in name:
        return f"openblas ({os.path.realpath(path)})"
    if "mlx_cpu.libs" in path or name.startswith("libblas-"):
        return "reference BLAS bundled with mlx-cpu (slow; install libopenblas0-pthread)"
    return f"system BLAS ({os.path.realpath(path)})"


def blas_in_use() -> str:
    """Which BLAS MLX's CPU matmuls run on, in words (``"openblas (/usr/lib/...)"``, ``"accelerate"``, ...).

    A BLAS in the global symbol scope (preloaded) wins over the one ``libmlx.so`` depends on; otherwise
    the answer comes from the libraries mapped into the process (``/proc/self/maps``).
    """
    if sys.platform == "darwin":
        return "accelerate"
    provider = _global_blas_provider()
    if provider is not None:
        return _describe(provider)
    mapped = _mapped_libraries()
    for path in mapped:
        name = Path(path).name
        if "mlx_cpu.libs" in path and name.startswith("libblas"):
            return _describe(path)
    for path in mapped:
        name = Path(path).name
        if ("blas" in name and "scipy_openblas" not in name) and not name.startswith("libcublas"):
            return _describe(path)
    return "unknown (mlx not loaded yet)" if not any("libmlx" in p for p in mapped) else "unknown"


def openblas_preloaded(environ: Mapping[str, str] | None = None) -> bool:
    """Whether OpenBLAS is preloaded into this process (or named in ``environ``'s ``LD_PRELOAD``)."""
    if environ is not None:
        return "openblas" in environ.get("LD_PRELOAD", "")
    provider = _global_blas_provider()
    return provider is not None and "openblas" in Path(provider).name


def preload_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with the system OpenBLAS added to ``LD_PRELOAD`` (unchanged if none, or disabled)."""
    result = dict(env)
    path = openblas_path()
    if path is None or result.get(DISABLE_ENV):
        return result
    current = result.get("LD_PRELOAD", "")
    if "openblas" in current:
        return result
    result["LD_PRELOAD"] = f"{path}:{current}" if current else path
    return result


def maybe_reexec_with_openblas(argv: Sequence[str] | None = None) -> None:
    """Re-execute this process once with OpenBLAS preloaded, when it exists and is not in use yet.

    ``argv`` is the full interpreter command line (default :data:`sys.orig_argv`, which keeps ``-m``
    and a zipapp path intact); the interpreter is :data:`sys.executable`. Returns without doing
    anything when not on Linux, when OpenBLAS is absent, already preloaded or disabled
    (``MLXCLUSTER_NO_OPENBLAS``), or when this process is already the re-executed one. On success it
    does not return.
    """
    if sys.platform != "linux" or os.environ.get(REEXEC_GUARD) or os.environ.get(DISABLE_ENV):
        return
    if openblas_path() is None or openblas_preloaded() or openblas_preloaded(os.environ):
        return
    args = list(sys.orig_argv if argv is None else argv)
    if not args or not sys.executable:
        return
    env = preload_env(os.environ)
    env[REEXEC_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)
