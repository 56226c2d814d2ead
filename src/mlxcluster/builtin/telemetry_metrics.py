"""The Prometheus exporter's series for the NATS connection and the workers' accelerators, from the last snapshot.

``mlxcluster_nats_*``: this controller's connection (:attr:`ClusterSnapshot.bus`); a snapshot is sent at every
change of the connection, so ``mlxcluster_nats_connected`` follows it without waiting for the next period.
``mlxcluster_worker_mlx_*`` and ``mlxcluster_worker_gpu_*``: what each online or degraded worker's last heartbeat
said of its accelerator (:attr:`ClusterSnapshot.worker_accelerator`); a figure a worker does not know has no
series for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

BUS_COUNTERS = {  # metric name (without _total) → (counters key, help)
    "mlxcluster_nats_reconnects": ("reconnects", "Times this controller reconnected to NATS."),
    "mlxcluster_nats_disconnects": ("disconnects", "Times this controller's NATS connection dropped."),
    "mlxcluster_nats_slow_consumer_drops": (
        "slow_consumer_drops",
        "Messages dropped because a subscription could not keep up (slow consumer).",
    ),
    "mlxcluster_nats_errors": ("errors", "Errors the NATS client reported (slow consumers included)."),
}
BUS_DIRECTIONS = {"in": ("in_msgs", "in_bytes"), "out": ("out_msgs", "out_bytes")}
MLX_MEMORY_KINDS = {"active": "mlx_active_bytes", "cache": "mlx_cache_bytes", "peak": "mlx_peak_bytes"}


class BusCollector:
    """``mlxcluster_nats_connected`` and the connection's counters from the last snapshot's ``bus``."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = self.counters
        if not counters:
            return
        yield GaugeMetricFamily(
            "mlxcluster_nats_connected",
            "1 while this controller is connected to NATS, 0 while it is not.",
            value=counters.get("connected", 0),
        )
        for name, (key, help_text) in BUS_COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=counters.get(key, 0))
        messages = CounterMetricFamily(
            "mlxcluster_nats_messages",
            "NATS messages this controller received (in) and sent (out).",
            labels=["direction"],
        )
        payload = CounterMetricFamily(
            "mlxcluster_nats_bytes", "Payload bytes of those messages, by direction.", labels=["direction"]
        )
        for direction, (msgs_key, bytes_key) in BUS_DIRECTIONS.items():
            messages.add_metric([direction], counters.get(msgs_key, 0))
            payload.add_metric([direction], counters.get(bytes_key, 0))
        yield messages
        yield payload


class AcceleratorCollector:
    """``mlxcluster_worker_mlx_memory_bytes{kind}``, ``mlxcluster_worker_gpu_utilization_ratio``,
    ``mlxcluster_worker_gpu_cores`` and ``mlxcluster_worker_gpu_memory_used_bytes`` per worker."""

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, float]] = {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        workers = self.workers
        if not workers:
            return
        memory = GaugeMetricFamily(
            "mlxcluster_worker_mlx_memory_bytes",
            "MLX memory of each worker process: active (arrays alive), cache (buffers kept for reuse), peak.",
            labels=["worker", "kind"],
        )
        utilization = GaugeMetricFamily(
            "mlxcluster_worker_gpu_utilization_ratio",
            "Share of the time each worker's GPU was busy (0-1), as the system last reported it.",
            labels=["worker"],
        )
        cores = GaugeMetricFamily(
            "mlxcluster_worker_gpu_cores", "GPU cores of each worker's machine.", labels=["worker"]
        )
        used = GaugeMetricFamily(
            "mlxcluster_worker_gpu_memory_used_bytes",
            "Memory each worker's GPU holds (a Mac: unified memory in use by the GPU; NVML: device memory used).",
            labels=["worker"],
        )
        for worker, fields in workers.items():
            for kind, key in MLX_MEMORY_KINDS.items():
                if key in fields:
                    memory.add_metric([worker, kind], fields[key])
            if "gpu_utilization" in fields:
                utilization.add_metric([worker], fields["gpu_utilization"] / 100)
            if "gpu_cores" in fields:
                cores.add_metric([worker], fields["gpu_cores"])
            if "gpu_memory_used_bytes" in fields:
                used.add_metric([worker], fields["gpu_memory_used_bytes"])
        yield from (memory, utilization, cores, used)
