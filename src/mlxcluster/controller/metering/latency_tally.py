"""A controller's latency histograms and token totals in the layout every controller shares, for its heartbeat.

The Prometheus exporter keeps its own (a plugin, maybe not loaded); these exist so that any process of a
controller tier can show the whole tier's latency (``mlxcluster_tier_*`` in ``/metrics``): each controller
sends its counts in :class:`~mlxcluster.protocol.ControllerHeartbeat`, and :func:`merge_latency` sums the
online ones. A finished request costs two bisections.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from mlxcluster.api import RequestFinished
from mlxcluster.protocol import LATENCY_BUCKETS, LatencyCounts


class LatencyTally:
    """Request-duration and TTFT counts (:data:`~mlxcluster.protocol.LATENCY_BUCKETS`) and tokens since start."""

    def __init__(self) -> None:
        self._counts = {name: [0] * (len(bounds) + 1) for name, bounds in LATENCY_BUCKETS.items()}
        self._sums = dict.fromkeys(LATENCY_BUCKETS, 0.0)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def _observe(self, name: str, value: float) -> None:
        self._counts[name][bisect.bisect_left(LATENCY_BUCKETS[name], value)] += 1
        self._sums[name] += value

    def on_finished(self, event: RequestFinished) -> None:
        self._observe("request_duration_seconds", event.duration_s)
        if event.ttft_s is not None:
            self._observe("ttft_seconds", event.ttft_s)
        self.prompt_tokens += event.prompt_tokens
        self.completion_tokens += event.completion_tokens

    def counts(self) -> dict[str, LatencyCounts]:
        """A copy for a heartbeat."""
        return {name: LatencyCounts(counts=list(c), sum=self._sums[name]) for name, c in self._counts.items()}


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
