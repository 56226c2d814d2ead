"""A controller's latency histograms and token totals in the layout every controller shares, for its heartbeat.

The Prometheus exporter keeps its own (a plugin, maybe not loaded); these exist so that any process of a
controller tier can show the whole tier's latency (``mlxcluster_tier_*`` in ``/metrics``): each controller
sends its counts in :class:`~mlxcluster.protocol.ControllerHeartbeat`, and :func:`merge_latency` sums the
online ones. A finished request costs two bisections.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from mlxcluster.api import RequestFinished
from mlxcluster.protocol import DURATION_BUCKETS, LATENCY_BUCKETS, TTFT_BUCKETS, LatencyCounts


class LatencyTally:
    """Request-duration and TTFT counts (:data:`~mlxcluster.protocol.LATENCY_BUCKETS`) and tokens since start."""

    def __init__(self) -> None:
        self._duration = [0] * (len(DURATION_BUCKETS) + 1)
        self._ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self._duration_sum = 0.0
        self._ttft_sum = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def on_finished(self, event: RequestFinished) -> None:
        """Count one finished request (on every request's path: a few list and attribute updates)."""
        duration = event.duration_s
        self._duration[bisect_left(DURATION_BUCKETS, duration)] += 1
        self._duration_sum += duration
        ttft = event.ttft_s
        if ttft is not None:
            self._ttft[bisect_left(TTFT_BUCKETS, ttft)] += 1
            self._ttft_sum += ttft
        self.prompt_tokens += event.prompt_tokens
        self.completion_tokens += event.completion_tokens

    def counts(self) -> dict[str, LatencyCounts]:
        """A copy for a heartbeat."""
        return {
            "request_duration_seconds": LatencyCounts(counts=list(self._duration), sum=self._duration_sum),
            "ttft_seconds": LatencyCounts(counts=list(self._ttft), sum=self._ttft_sum),
        }


def merge_latency(parts: Iterable[dict[str, LatencyCounts]]) -> dict[str, LatencyCounts]:
    """The sum of several controllers' histograms; one in another layout (another version) is left out."""
    merged = {name: LatencyCounts(counts=[0] * (len(bounds) + 1)) for name, bounds in LATENCY_BUCKETS.items()}
    for part in parts:
        for name, histogram in part.items():
            total = merged.get(name)
            if total is None or len(histogram.counts) != len(total.counts):
                continue
            total.counts = [a + b for a, b in zip(total.counts, histogram.counts, strict=True)]
            total.sum += histogram.sum
    return merged
