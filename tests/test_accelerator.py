"""Accelerator telemetry: ioreg's accelerator statistics parsed from recorded output, NVML through a stand-in of
``pynvml`` (absent here), MLX's memory figures, the heartbeat → ``/api/cluster/workers`` → ``/metrics`` path with
real echo workers and the real nats-server, ``hardware_aware`` weighing GPU headroom, and cluster status's
``mode`` / ``requests.success_rate`` checked against the OpenAPI document.

The ioreg samples in ``tests/recorded`` are written in the format of ``ioreg -r -d 1 -w 0 -c IOAccelerator`` on an
Apple M2 Max and on an Intel Mac with a discrete AMD GPU (this Linux machine has no ioreg to record from).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from cluster_harness import Cluster, RunningController, wait_until, with_sections

from mlxcluster.api import AcceleratorStats, InferenceRequest, WorkerView
from mlxcluster.builtin.balancers import MIN_GPU_HEADROOM, HardwareAware
from mlxcluster.config import Config
from mlxcluster.controller.metering.dispatch_stats import OutcomeWindow
from mlxcluster.controller.routing.registry import accelerator_fields
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.worker.accelerator import (
    AcceleratorMonitor,
    GpuReading,
    IoregProbe,
    NvmlProbe,
    busiest,
    machine_probe,
    open_nvml,
    parse_ioreg_accelerators,
    visible_device,
)

RECORDED = Path(__file__).parent / "recorded"
M2_MAX = RECORDED / "ioreg_accelerator_m2_max.txt"
INTEL_MAC = RECORDED / "ioreg_accelerator_intel_mac.txt"
M2_READING = GpuReading(
    utilization=63.0, cores=38, memory_used_bytes=3_221_225_472, name="Apple M2 Max", source="ioreg"
)


# --- ioreg -----------------------------------------------------------------------------------------


def test_ioreg_of_an_apple_silicon_mac() -> None:
    # "In use system memory (driver)"=0 comes first and the legend names "In use system memory" as a channel:
    # neither is the figure
    assert parse_ioreg_accelerators(M2_MAX.read_text()) == [M2_READING]


def test_ioreg_of_an_intel_mac_with_two_gpus() -> None:
    intel, amd = parse_ioreg_accelerators(INTEL_MAC.read_text())
    assert intel == GpuReading(
        utilization=3.0, memory_used_bytes=180_764_672, name="Intel(R) UHD Graphics 630", source="ioreg"
    )
    assert (amd.utilization, amd.cores, amd.memory_used_bytes, amd.name) == (41.0, None, None, "AMD Radeon Pro 5500M")
    assert busiest([intel, amd]) is amd  # the busy one decides
    assert busiest([]) is None


def test_ioreg_text_that_says_nothing() -> None:
    assert parse_ioreg_accelerators("") == []
    assert parse_ioreg_accelerators("ioreg: command not found\n") == []
    entry = '+-o AGXAcceleratorG13G  <class AGXAcceleratorG13G>\n    {\n      "PerformanceStatistics" = {%s}\n    }\n'
    assert parse_ioreg_accelerators(entry % '"recoveryCount"=0') == []
    [over] = parse_ioreg_accelerators(entry % '"Device Utilization %"=140,"In use system memory"=7')
    assert over.utilization is None and over.memory_used_bytes == 7  # out of range: unknown, not 140 %
    [renderer] = parse_ioreg_accelerators(entry % '"Renderer Utilization %"=12')
    assert renderer.utilization == 12.0  # no "Device Utilization %": the renderer's figure


async def test_ioreg_probe_runs_the_command_and_survives_failures(tmp_path: Path) -> None:
    assert await IoregProbe(("cat", str(M2_MAX))).read() == M2_READING  # a real child process
    missing = IoregProbe((str(tmp_path / "no-such-ioreg"),))
    assert await missing.read() is None and await missing.read() is None and missing.failures == 2
    slow = IoregProbe(("sleep", "5"), timeout_s=0.1)
    assert await slow.read() is None and slow.failures == 1  # killed, not waited for


async def test_a_cancelled_ioreg_read_leaves_no_child_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    probe = IoregProbe(("sh", "-c", f'echo $$ > "{pid_file}"; exec sleep 30'), timeout_s=30)
    reading = asyncio.create_task(probe.read())
    await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the child started")
    pid = int(pid_file.read_text())
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    try:
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class FlakyProbe:
    """A GPU probe whose every other read raises (a bug, odd output)."""

    def __init__(self) -> None:
        self.reads = 0
        self.closed = False

    async def read(self) -> GpuReading | None:
        self.reads += 1
        if self.reads % 2 == 0:
            raise ValueError("unexpected ioreg output")
        return M2_READING

    def close(self) -> None:
        self.closed = True


async def test_a_failing_gpu_read_keeps_no_stale_figure_and_the_sampling_goes_on() -> None:
    probe = FlakyProbe()
    monitor = AcceleratorMonitor(mlx=False, gpu=probe, interval_s=0.001)
    assert await monitor.refresh() == M2_READING
    assert await monitor.refresh() is None and monitor.reading is None  # raised: nothing kept, nothing raised
    sampling = asyncio.create_task(monitor.run())
    await wait_until(lambda: probe.reads >= 6, what="reads past the failures")
    assert not sampling.done()
    sampling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sampling
    assert probe.closed


def test_machine_probe_by_platform() -> None:
    assert machine_probe("win32") is None
    if sys.platform.startswith("linux"):
        assert machine_probe("darwin") is None  # no ioreg on this machine


# --- NVML (nvidia-ml-py is optional and absent here: a stand-in with its function names) --------------------


class StandInNvml:
    """The few ``pynvml`` calls :class:`NvmlProbe` makes, answering like an H100 at 87 % load."""

    def __init__(self, cores: bool = True, driver: bool = True, devices: int = 1) -> None:
        self.cores = cores
        self.driver = driver
        self.devices = devices
        self.handles: list[int] = []
        self.shut_down = False

    def nvmlInit(self) -> None:  # noqa: N802
        if not self.driver:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802 (pynvml's names)
        if index >= self.devices:
            raise RuntimeError("Invalid Argument")
        self.handles.append(index)
        return f"gpu{index}"

    def nvmlDeviceGetNumGpuCores(self, handle: str) -> int:  # noqa: N802
        if not self.cores:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 16896

    def nvmlDeviceGetName(self, handle: str) -> bytes:  # noqa: N802
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:  # noqa: N802
        return SimpleNamespace(total=85_520_809_984, free=20_000_000_000, used=65_520_809_984)

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shut_down = True


async def test_nvml_probe_reads_the_visible_gpu() -> None:
    nvml = StandInNvml(devices=4)
    probe = NvmlProbe(nvml, device=visible_device({"CUDA_VISIBLE_DEVICES": "2,3"}))
    assert nvml.handles == [2]
    assert await probe.read() == GpuReading(
        utilization=87.0, cores=16896, memory_used_bytes=65_520_809_984, name="NVIDIA H100 80GB HBM3", source="nvml"
    )
    probe.close()
    assert nvml.shut_down
    assert (await NvmlProbe(StandInNvml(cores=False)).read()).cores is None  # type: ignore[union-attr]
    assert visible_device({"CUDA_VISIBLE_DEVICES": "GPU-8f6c1a"}) == 0 and visible_device({}) == 0


def test_nvml_is_used_only_where_it_imports_and_finds_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert open_nvml() is None and machine_probe("linux") is None
    monkeypatch.setitem(sys.modules, "pynvml", StandInNvml(driver=False))  # installed, no driver
    assert open_nvml() is None
    no_gpu = StandInNvml(devices=0)
    monkeypatch.setitem(sys.modules, "pynvml", no_gpu)  # a driver, no GPU at that index
    assert open_nvml(device=0) is None and no_gpu.shut_down
    monkeypatch.setitem(sys.modules, "pynvml", StandInNvml())
    assert isinstance(machine_probe("linux"), NvmlProbe)


# --- the monitor --------------------------------------------------------------------------------------


async def test_monitor_joins_mlx_memory_and_the_latest_gpu_reading() -> None:
    import mlx.core as mx

    held = mx.ones((256, 1024))  # 1 MiB of float32 alive while the monitor reads
    mx.eval(held)
    monitor = AcceleratorMonitor(mlx=True, gpu=IoregProbe(("cat", str(M2_MAX))))
    before = monitor.sample()
    assert before is not None and before.gpu_utilization is None and before.source == ""  # not sampled yet
    assert before.mlx_active_bytes is not None and before.mlx_active_bytes >= 1024 * 1024
    assert before.mlx_peak_bytes is not None and before.mlx_peak_bytes >= before.mlx_active_bytes
    await monitor.refresh()
    stats = monitor.sample()
    assert stats is not None
    assert (stats.gpu_utilization, stats.gpu_cores, stats.gpu_memory_used_bytes) == (63.0, 38, 3_221_225_472)
    assert (stats.gpu_name, stats.source) == ("Apple M2 Max", "ioreg")
    del held
    assert AcceleratorMonitor(mlx=False, gpu=None).sample() is None  # the echo engine without a GPU: nothing
    fields = accelerator_fields(AcceleratorStats(gpu_utilization=50.0, source="ioreg"))
    assert fields == {"gpu_utilization": 50.0}  # for metrics: unknown figures are left out, never zero


# --- the balancer -----------------------------------------------------------------------------------------


def view(worker_id: str, gpu: float | None, speed: float = 50.0) -> WorkerView:
    accelerator = AcceleratorStats(gpu_utilization=gpu, source="ioreg") if gpu is not None else None
    return WorkerView(
        id=worker_id, status="online", models=("m",), max_concurrent=4, tokens_per_second=speed, accelerator=accelerator
    )


def test_hardware_aware_weighs_gpu_headroom() -> None:
    balancer = HardwareAware()
    request = InferenceRequest(request_id="r", model="m")
    busy, idle = view("busy", 90.0), view("idle", 10.0)
    assert {balancer.pick([busy, idle], request).id for _ in range(4)} == {"idle"}  # type: ignore[union-attr]
    # a faster worker wins while its GPU has room to spare
    assert balancer.pick([view("fast", 40.0, speed=100.0), idle], request).id == "fast"  # type: ignore[union-attr]
    # unknown GPU load counts at the mean headroom of those that report it: here (0.1 + 0.9) / 2, between the two
    unknown = view("unknown", None)
    assert balancer.pick([busy, unknown, idle], request).id == "idle"  # type: ignore[union-attr]
    # a worker serving requests: its GPU reading is its own work, so it counts in neither its score nor the mean
    full = msgspec.structs.replace(idle, load=4, active=4)
    assert {balancer.pick([busy, unknown, full], request).id for _ in range(4)} == {"busy", "unknown"}  # type: ignore[union-attr]
    assert busy.gpu_utilization == 0.9 and unknown.gpu_utilization is None
    assert balancer.headroom(1.0) == MIN_GPU_HEADROOM  # a saturated GPU still counts a little


def test_hardware_aware_counts_gpu_load_only_where_the_worker_cannot_explain_it() -> None:
    balancer = HardwareAware()
    request = InferenceRequest(request_id="r", model="m")
    # one stream of its own keeps the GPU near 100%: a fast worker with 1 of 8 slots busy still wins
    fast = msgspec.structs.replace(view("fast", 95.0, speed=100.0), max_concurrent=8, active=1, load=1)
    slow = view("slow", 0.0, speed=30.0)
    assert balancer.pick([slow, fast], request).id == "fast"  # type: ignore[union-attr]
    # both idle, same speed: a GPU busy with something else loses to a free one
    shared, free = view("shared", 90.0), view("free", 5.0)
    assert {balancer.pick([shared, free], request).id for _ in range(4)} == {"free"}  # type: ignore[union-attr]


# --- the status window ------------------------------------------------------------------------------------


def test_success_rate_over_a_sliding_window() -> None:
    now = [1000.0]
    window = OutcomeWindow(window_s=300, bucket_s=5, clock=lambda: now[0])
    assert window.rate() is None  # nothing finished: no rate, not 0 or 1
    for ok in (True, True, True, False):
        window.record(ok)
    assert window.counts() == (3, 1) and window.rate() == 0.75
    now[0] += 200
    window.record(True)
    assert window.counts() == (4, 1) and window.rate() == 0.8
    now[0] += 150  # the first four are older than 300 s now
    assert window.counts() == (1, 0) and window.rate() == 1.0
    now[0] += 301
    assert window.rate() is None


# --- end to end: heartbeats → the API, the document, the metrics ------------------------------------------------


async def scrape(controller: RunningController) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with controller.session().get(f"{controller.url}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_accelerator_figures_reach_the_api_and_metrics(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    from jsonschema import Draft202012Validator

    config = with_sections(cluster_config, metrics={"exporters": ["prometheus"], "snapshot_interval_s": 0.05})
    async with Cluster(config) as running:
        gpu_worker = AcceleratorMonitor(mlx=True, gpu=IoregProbe(("cat", str(M2_MAX))), interval_s=0.1)
        await running.start_worker("w-gpu", accelerator=gpu_worker)
        await running.start_worker("w-plain", accelerator=AcceleratorMonitor(mlx=False, gpu=None))
        controller = await running.start_controller()
        await controller.wait_online("w-gpu", "w-plain")

        async def reported() -> dict[str, Any] | None:
            async with controller.session().get(f"{controller.url}/api/cluster/workers") as resp:
                listing = await resp.json()
            workers = {w["id"]: w for w in listing["workers"]}
            accelerator = workers.get("w-gpu", {}).get("accelerator") or {}
            return listing if accelerator.get("gpu_utilization") == 63.0 else None

        listing = await wait_until(reported, what="the GPU reading in /api/cluster/workers")
        assert listing["total"] == 2
        workers = {w["id"]: w for w in listing["workers"]}
        accelerator = workers["w-gpu"]["accelerator"]
        assert accelerator["gpu_cores"] == 38 and accelerator["source"] == "ioreg"
        assert accelerator["gpu_memory_used_bytes"] == 3_221_225_472 and accelerator["gpu_name"] == "Apple M2 Max"
        assert accelerator["mlx_active_bytes"] >= 0 and accelerator["mlx_peak_bytes"] >= 0
        assert workers["w-plain"]["accelerator"] is None  # reported as null, not left out
        view_of_gpu = controller.ctx.registry.get("w-gpu")
        assert view_of_gpu is not None and view_of_gpu.gpu_utilization == 0.63  # what hardware_aware reads

        client = controller.client()
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
        async with controller.session().get(f"{controller.url}/api/cluster/status") as resp:
            status = await resp.json()
        assert status["mode"] == "dual" and status["requests"]["success_rate"] == 1.0
        assert status["requests"]["success_rate_window_s"] == 300
        async with controller.session().get(f"{controller.url}/openapi.json") as resp:
            components = (await resp.json())["components"]
        for name, body in (("WorkerList", listing), ("ClusterStatus", status)):  # the documented shapes
            Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components}).validate(body)

        async def gpu_series() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            values = await scrape(controller)
            return values if ("mlxcluster_worker_gpu_cores", (("worker", "w-gpu"),)) in values else None

        values = await wait_until(gpu_series, what="the GPU series in /metrics")
        gpu = (("worker", "w-gpu"),)
        assert values[("mlxcluster_worker_gpu_utilization_ratio", gpu)] == 0.63
        assert values[("mlxcluster_worker_gpu_cores", gpu)] == 38
        assert values[("mlxcluster_worker_gpu_memory_used_bytes", gpu)] == 3_221_225_472
        kinds = {dict(labels)["kind"] for name, labels in values if name == "mlxcluster_worker_mlx_memory_bytes"}
        assert kinds == {"active", "cache", "peak"}
        assert not [key for key in values if key[0].startswith("mlxcluster_worker_gpu") and key[1] != gpu]


def test_status_table_shows_mode_success_rate_and_reconnects() -> None:
    from mlxcluster.cli.status import format_status

    workers = {"online": 1, "degraded": 0, "draining": 0, "offline": 0, "capacity": 8, "active": 0, "queued": 0}
    requests = {
        "total": 8,
        "in_flight": 0,
        "retries": 0,
        "failed": 1,
        "success_rate": 0.875,
        "success_rate_window_s": 300,
    }
    nats = {"connected": True, "server": "127.0.0.1:4222", "invalid_messages_total": 0, "reconnects": 2}
    status = {"controller_id": "c1", "state": "ready", "uptime_s": 9, "balancer": "cache_aware", "models": ["m"]}
    text = format_status({**status, "mode": "controller", "workers": workers, "requests": requests, "nats": nats})
    assert "(ready, up 9s, controller mode)" in text
    assert "1 failed, 87.5% succeeded in the last 5 min" in text and "dropped, 2 reconnects" in text
    older = {
        **status,
        "workers": workers,
        "requests": {**requests, "success_rate": None},
        "nats": {**nats, "reconnects": 0},
    }
    text = format_status(older)  # an older controller, or nothing finished in the window
    assert "(ready, up 9s)" in text and "succeeded" not in text and "reconnects" not in text
