"""Small statistics helpers shared by the benchmarks."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable

import psutil


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far; a process gone counts 0."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``samples`` (``pct`` in 0..100); 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[rank]


def machine_line() -> str:
    """Machine, cores and date, stated with every figure."""
    cpu = platform.processor() or platform.machine()
    memory_gb = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.system()} {platform.machine()} ({cpu}), {psutil.cpu_count()} cores, "
        f"{memory_gb:.0f} GiB, {time.strftime('%Y-%m-%d')}"
    )
