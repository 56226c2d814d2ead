"""What the worker reports about its machine and process: hardware at start, load in heartbeats."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass

import psutil

from mlxcluster.protocol import Hardware

GB = 1024**3


def cpu_model() -> str:
    """A human name for the CPU or chip (``Apple M2 Max``, ``AMD EPYC 7B13``...)."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=2, check=False
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accelerator() -> str:
    """``metal`` on Apple silicon with MLX's GPU, ``cuda`` if MLX has it, else ``cpu`` (imports mlx)."""
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            return "metal"
        if hasattr(mx, "cuda") and mx.cuda.is_available():
            return "cuda"
    except Exception:
        pass
    return "cpu"


def detect_hardware(*, probe_accelerator: bool = True) -> Hardware:
    """Chip, cores, memory and accelerator of this machine."""
    return Hardware(
        chip=cpu_model(),
        cpu_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        memory_gb=round(psutil.virtual_memory().total / GB, 1),
        accelerator=accelerator() if probe_accelerator else "cpu",
    )


def hostname() -> str:
    return socket.gethostname()


@dataclass
class ProcessSample:
    """One reading of this process's load."""

    cpu_percent: float
    rss_bytes: int
    available_memory_gb: float


class ProcessMonitor:
    """Samples CPU % (since the previous sample), RSS and free memory for heartbeats."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime: the first call always returns 0.0

    def sample(self) -> ProcessSample:
        return ProcessSample(
            cpu_percent=self._process.cpu_percent(None),
            rss_bytes=self._process.memory_info().rss,
            available_memory_gb=round(psutil.virtual_memory().available / GB, 2),
        )
