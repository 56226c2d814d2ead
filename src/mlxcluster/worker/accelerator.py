"""What a worker reports of its accelerator in each heartbeat: MLX's memory figures and the GPU's load.

MLX's figures (``mx.get_active_memory`` / ``get_cache_memory`` / ``get_peak_memory``) are read at each heartbeat,
for workers whose engine runs MLX (never imported for the echo engine). The GPU's utilisation, core count and
memory in use are the machine's, sampled every few seconds off the heartbeat's path:

- macOS: IOKit's accelerator statistics through ``ioreg -r -d 1 -w 0 -c IOAccelerator`` (no root needed), parsed
  by :func:`parse_ioreg_accelerators`;
- Linux: NVML through ``nvidia-ml-py`` (``import pynvml``) when it is installed and a driver answers (mlx's CUDA
  backend); nothing otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mlxcluster.protocol import AcceleratorStats

log = logging.getLogger(__name__)

IOREG_COMMAND = ("ioreg", "-r", "-d", "1", "-w", "0", "-c", "IOAccelerator")
GPU_SAMPLE_INTERVAL_S = 5.0
"""How often the GPU's figures are read (the heartbeat sends the latest)."""
IOREG_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class GpuReading:
    """One GPU as the system described it (``None``: not said)."""

    utilization: float | None = None
    """Percent of the time the GPU was busy, 0-100."""
    cores: int | None = None
    memory_used_bytes: int | None = None
    name: str | None = None
    source: str = ""


_ENTRY = re.compile(r"^[ |]*\+-o ", re.MULTILINE)
_UTILIZATION = re.compile(r'"Device Utilization %"\s*=\s*(\d+(?:\.\d+)?)')
_RENDERER = re.compile(r'"Renderer Utilization %"\s*=\s*(\d+(?:\.\d+)?)')
_CORES = re.compile(r'"gpu-core-count"\s*=\s*(\d+)')
_IN_USE = re.compile(r'"In use system memory"\s*=\s*(\d+)')  # the closing quote: not "... (driver)"
_MODEL = re.compile(r'"model"\s*=\s*<?"([^"]*)"')  # Apple silicon: "Apple M2 Max"; Intel Macs: <"AMD Radeon ...">


def parse_ioreg_accelerators(text: str) -> list[GpuReading]:
    """Every accelerator in the text of ``ioreg -r -d 1 -w 0 -c IOAccelerator``, in the order listed.

    An entry's ``PerformanceStatistics`` gives the utilisation (``Device Utilization %``, else ``Renderer
    Utilization %``) and the memory in use (``In use system memory``); ``gpu-core-count`` and ``model`` are its
    own properties. A figure outside its range (a utilisation above 100) is left out; text that is not ioreg's
    gives no entry.
    """
    readings: list[GpuReading] = []
    starts = [match.start() for match in _ENTRY.finditer(text)]
    ends = [*starts[1:], len(text)] if starts else []
    for begin, end in zip(starts, ends, strict=True):
        entry = text[begin:end]
        utilization = _number(_UTILIZATION, entry)
        if utilization is None:
            utilization = _number(_RENDERER, entry)
        if utilization is not None and not 0 <= utilization <= 100:
            utilization = None
        cores = _number(_CORES, entry)
        used = _number(_IN_USE, entry)
        model = _MODEL.search(entry)
        if utilization is None and cores is None and used is None:
            continue
        readings.append(
            GpuReading(
                utilization=utilization,
                cores=int(cores) if cores is not None else None,
                memory_used_bytes=int(used) if used is not None else None,
                name=model.group(1) if model is not None else None,
                source="ioreg",
            )
        )
    return readings


def _number(pattern: re.Pattern[str], text: str) -> float | None:
    found = pattern.search(text)
    return float(found.group(1)) if found is not None else None


def busiest(readings: Sequence[GpuReading]) -> GpuReading | None:
    """The reading of the most used GPU (an Intel Mac lists its integrated and its discrete one)."""
    if not readings:
        return None
    return max(readings, key=lambda r: -1.0 if r.utilization is None else r.utilization)


class GpuProbe(Protocol):
    """A source of GPU readings."""

    async def read(self) -> GpuReading | None:
        """The GPU now (``None``: it could not be read this time)."""
        ...

    def close(self) -> None:
        """Release what the probe holds."""
        ...


class IoregProbe:
    """macOS: runs ``ioreg`` (by default :data:`IOREG_COMMAND`) and parses its output."""

    def __init__(self, command: Sequence[str] = IOREG_COMMAND, timeout_s: float = IOREG_TIMEOUT_S) -> None:
        self.command = tuple(command)
        self.timeout_s = timeout_s
        self.failures = 0

    async def read(self) -> GpuReading | None:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
        except OSError as exc:
            self._failed(exc)
            return None
        try:
            out, _ = await asyncio.wait_for(process.communicate(), self.timeout_s)
        except TimeoutError as exc:
            self._failed(exc)
            return None
        finally:
            if process.returncode is None:  # timed out, or the read was cancelled: no ioreg left behind
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        return busiest(parse_ioreg_accelerators(out.decode("utf-8", "replace")))

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            log.info("cannot read the GPU's statistics with %s: %s", self.command[0], exc or type(exc).__name__)

    def close(self) -> None:
        return None


class NvmlProbe:
    """Linux with an NVIDIA GPU: NVML through ``pynvml`` (the ``nvidia-ml-py`` package), already initialised.

    :param device: the NVML index of the GPU (the first of ``CUDA_VISIBLE_DEVICES`` when that is a number).
    """

    def __init__(self, nvml: Any, device: int = 0) -> None:
        self.nvml = nvml
        self.handle = nvml.nvmlDeviceGetHandleByIndex(device)

    def reading(self) -> GpuReading:
        """The GPU now (blocking: a few NVML calls)."""
        nvml, handle = self.nvml, self.handle
        cores: int | None
        try:
            cores = int(nvml.nvmlDeviceGetNumGpuCores(handle))
        except Exception:  # older drivers and GPUs do not say
            cores = None
        name = nvml.nvmlDeviceGetName(handle)
        return GpuReading(
            utilization=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            cores=cores,
            memory_used_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).used),
            name=name.decode() if isinstance(name, bytes) else str(name),
            source="nvml",
        )

    async def read(self) -> GpuReading | None:
        try:
            return await asyncio.to_thread(self.reading)
        except Exception as exc:
            log.debug("NVML reading failed: %s", exc)
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


def open_nvml(device: int | None = None) -> NvmlProbe | None:
    """An :class:`NvmlProbe` when ``pynvml`` imports and finds a GPU; ``None`` otherwise (the usual case)."""
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]  # optional: the nvml extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no GPU
        log.debug("NVML not available: %s", exc)
        return None
    try:
        return NvmlProbe(pynvml, visible_device() if device is None else device)
    except Exception as exc:
        log.debug("NVML found no GPU: %s", exc)
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
        return None


def visible_device(environ: dict[str, str] | None = None) -> int:
    """The NVML index of the GPU this process uses: the first of ``CUDA_VISIBLE_DEVICES`` when it is a number."""
    first = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def machine_probe(platform: str = sys.platform) -> GpuProbe | None:
    """The GPU probe for this machine: ``ioreg`` on macOS, NVML on Linux where present, else ``None``."""
    if platform == "darwin":
        return IoregProbe() if shutil.which(IOREG_COMMAND[0]) else None
    if platform.startswith("linux"):
        return open_nvml()
    return None


def mlx_memory() -> tuple[int, int, int] | None:
    """MLX's active, cache and peak memory of this process in bytes (``None``: MLX cannot be imported)."""
    try:
        import mlx.core as mx

        return int(mx.get_active_memory()), int(mx.get_cache_memory()), int(mx.get_peak_memory())
    except Exception:
        return None


class AcceleratorMonitor:
    """Builds the heartbeat's :class:`AcceleratorStats`: MLX's memory now and the GPU's latest reading.

    :param mlx: read MLX's memory figures (the worker's engine runs MLX).
    :param gpu: the GPU probe :meth:`run` samples every ``interval_s`` (``None``: no GPU figures).
    """

    def __init__(self, *, mlx: bool, gpu: GpuProbe | None, interval_s: float = GPU_SAMPLE_INTERVAL_S) -> None:
        self.mlx = mlx
        self.gpu = gpu
        self.interval_s = interval_s
        self.reading: GpuReading | None = None

    @classmethod
    def for_this_machine(cls, *, mlx: bool) -> AcceleratorMonitor:
        """MLX's figures when ``mlx``, and this machine's GPU probe (:func:`machine_probe`)."""
        return cls(mlx=mlx, gpu=machine_probe())

    def sample(self) -> AcceleratorStats | None:
        """What the next heartbeat says (``None``: nothing is known)."""
        memory = mlx_memory() if self.mlx else None
        gpu = self.reading
        if memory is None and gpu is None:
            return None
        stats = AcceleratorStats()
        if memory is not None:
            stats.mlx_active_bytes, stats.mlx_cache_bytes, stats.mlx_peak_bytes = memory
        if gpu is not None:
            stats.gpu_utilization = gpu.utilization
            stats.gpu_cores = gpu.cores
            stats.gpu_memory_used_bytes = gpu.memory_used_bytes
            stats.gpu_name = gpu.name
            stats.source = gpu.source
        return stats

    async def refresh(self) -> GpuReading | None:
        """Read the GPU once (a failed read keeps nothing: a stale figure would mislead the balancer)."""
        if self.gpu is not None:
            try:
                self.reading = await self.gpu.read()
            except Exception as exc:  # a probe's bug or odd output: no figure, and the next sample tries again
                log.debug("reading the GPU failed: %s", exc or type(exc).__name__, exc_info=True)
                self.reading = None
        return self.reading

    async def run(self) -> None:
        """Refresh every ``interval_s`` until cancelled (nothing to do without a probe)."""
        if self.gpu is None:
            return
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self.interval_s)
        finally:
            self.gpu.close()
