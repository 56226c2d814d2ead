"""Built-in metrics exporters (``prometheus``, ``log``), registered through the same hook as third-party ones.

Neither prometheus-client nor aiohttp is imported until an exporter is built, so listing exporters stays fast.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

from mlxcluster.api import (
    ClusterSnapshot,
    MetricsEvent,
    Register,
    RequestFinished,
    RequestMigrated,
    RequestRetried,
    hookimpl,
)
from mlxcluster.builtin.telemetry_metrics import AcceleratorCollector, BusCollector
from mlxcluster.protocol import DURATION_BUCKETS, LATENCY_BUCKETS, TTFT_BUCKETS, LatencyCounts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic Prometheus text format that ``generate_latest`` writes (every Prometheus version reads it)."""
WORKER_STATES = ("online", "degraded", "draining", "offline")
UNKNOWN_MODEL = "unknown"
"""The ``model`` label of requests for models no worker serves (clients choose those names)."""

INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class PrometheusExporter:
    """Serves ``GET /metrics`` (path configurable) in the Prometheus text format from its own registry.

    The endpoint is outside ``/v1`` and ``/api``, so API keys do not protect it: bind the controller to a
    private address or put the scrape behind a proxy when the metrics must not be public.
    """

    def __init__(self, path: str = "/metrics") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        self.path = path
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mlxcluster_requests", "Inference requests finished, by model and status.", ["model", "status"], registry=r
        )
        self.duration = LoopHistogram(
            "mlxcluster_request_duration_seconds", "Request time in the controller.", DURATION_BUCKETS
        )
        self.ttft = LoopHistogram("mlxcluster_ttft_seconds", "Time to first token.", TTFT_BUCKETS)
        self.inter_token = LoopHistogram(
            "mlxcluster_inter_token_latency_seconds",
            "Seconds per token between streamed token frames.",
            INTER_TOKEN_BUCKETS,
        )
        for histogram in (self.duration, self.ttft, self.inter_token):
            r.register(histogram)
        self.tokens = Counter(
            "mlxcluster_tokens", "Tokens processed, by kind (prompt, completion).", ["kind"], registry=r
        )
        self.inflight = Gauge("mlxcluster_inflight_requests", "Requests being served by this controller.", registry=r)
        self.queue_depth = Gauge("mlxcluster_queue_depth", "Requests waiting in the workers' queues.", registry=r)
        self.workers = Gauge("mlxcluster_workers", "Known workers by status.", ["status"], registry=r)
        self.tier = Gauge(
            "mlxcluster_tier",
            "Every online controller on the bus (a tier's processes included), summed from their heartbeats: "
            "controllers_online, in_flight, requests_total, completed, failed, errors, retries.",
            ["figure"],
            registry=r,
        )
        self.worker_speed = Gauge(
            "mlxcluster_worker_tokens_per_second", "Generation speed each worker last reported.", ["worker"], registry=r
        )
        self.retries = Counter("mlxcluster_retries", "Requests retried on another worker.", registry=r)
        self.invalid = Counter("mlxcluster_invalid_messages", "Malformed NATS messages dropped.", registry=r)
        self.migrations = Counter(
            "mlxcluster_migrations", "Started streams moved to another worker, by reason.", ["reason"], registry=r
        )
        self.prompt_cache = PromptCacheCollector()
        r.register(self.prompt_cache)
        self.speculation = SpeculationCollector()
        r.register(self.speculation)
        self.tier_latency = TierLatencyCollector()
        r.register(self.tier_latency)
        self.bus = BusCollector()
        r.register(self.bus)
        self.accelerators = AcceleratorCollector()
        r.register(self.accelerators)
        self.key_requests = Counter(
            "mlxcluster_key_requests",
            "Inference requests finished, by API key and status.",
            ["key", "status"],
            registry=r,
        )
        self.key_tokens = Counter(
            "mlxcluster_key_tokens",
            "Tokens used, by API key and kind (prompt, completion).",
            ["key", "kind"],
            registry=r,
        )
        self.key_rate_limited = Counter(
            "mlxcluster_key_rate_limited", "Requests refused with 429, by API key.", ["key"], registry=r
        )
        self._rate_limited_seen: dict[str, int] = {}
        for kind in ("prompt", "completion", "cached"):
            self.tokens.labels(kind=kind)
        for status in WORKER_STATES:
            self.workers.labels(status=status)
        self._invalid_seen = 0
        self._speed_labels: set[str] = set()

    async def export(self, event: MetricsEvent) -> None:
        """Update the metrics (on the event loop: cheap, and never racing a scrape)."""
        match event:
            case RequestFinished():
                model = event.model if event.model_known else UNKNOWN_MODEL
                self.requests.labels(model=model, status=event.status).inc()
                self.duration.observe(event.duration_s)
                if event.ttft_s is not None:
                    self.ttft.observe(event.ttft_s)
                self.inter_token.observe_many(event.inter_token_s)
                if event.prompt_tokens:
                    self.tokens.labels(kind="prompt").inc(event.prompt_tokens)
                if event.completion_tokens:
                    self.tokens.labels(kind="completion").inc(event.completion_tokens)
                if event.cached_tokens:
                    self.tokens.labels(kind="cached").inc(event.cached_tokens)
                if event.key is not None:  # key names come from the config, not from clients: bounded labels
                    self.key_requests.labels(key=event.key, status=event.status).inc()
                    self.key_tokens.labels(key=event.key, kind="prompt").inc(event.prompt_tokens)
                    self.key_tokens.labels(key=event.key, kind="completion").inc(event.completion_tokens)
            case RequestRetried():
                self.retries.inc()
            case RequestMigrated():
                self.migrations.labels(reason=event.reason).inc()
            case ClusterSnapshot():
                self._snapshot(event)

    def _snapshot(self, event: ClusterSnapshot) -> None:
        self.inflight.set(event.inflight)
        for figure, value in event.tier.items():  # a gauge: a restarted process's counts leave the sum
            self.tier.labels(figure=figure).set(value)
        self.queue_depth.set(event.queue_depth)
        for status in WORKER_STATES:
            self.workers.labels(status=status).set(event.workers.get(status, 0))
        for gone in self._speed_labels - set(event.worker_tokens_per_second):
            self.worker_speed.remove(gone)
        for worker, speed in event.worker_tokens_per_second.items():
            self.worker_speed.labels(worker=worker).set(speed)
        self._speed_labels = set(event.worker_tokens_per_second)
        for key, total in event.rate_limited_by_key.items():
            seen = self._rate_limited_seen.get(key, 0)
            if total > seen:
                self.key_rate_limited.labels(key=key).inc(total - seen)
            self._rate_limited_seen[key] = total
        if event.invalid_messages_total > self._invalid_seen:
            self.invalid.inc(event.invalid_messages_total - self._invalid_seen)
            self._invalid_seen = event.invalid_messages_total
        self.prompt_cache.workers = event.worker_prompt_cache
        self.prompt_cache.index = event.cache_index
        self.speculation.workers = event.worker_speculation
        self.tier_latency.latency = event.tier_latency
        self.bus.counters = event.bus
        self.accelerators.workers = event.worker_accelerator

    def text(self) -> bytes:
        """The current metrics in the Prometheus text exposition format (without ``*_created`` series)."""
        from prometheus_client import generate_latest

        return generate_latest(_WithoutCreated(self.registry))

    def routes(self) -> list[Any]:
        """``GET <path>`` on the controller."""
        from aiohttp import web

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=self.text(), headers={"Content-Type": CONTENT_TYPE})

        return [web.get(self.path, metrics)]


PROMPT_CACHE_COUNTERS = {
    "hits": "Requests that reused a cached prompt prefix, as each worker reports.",
    "misses": "Requests that found no cached prefix, as each worker reports.",
    "hit_tokens": "Prompt tokens served from each worker's prompt cache.",
    "prompt_tokens": "Prompt tokens each worker admitted (the denominator of the token hit rate).",
    "evictions": "Entries each worker's prompt cache evicted.",
}
PROMPT_CACHE_GAUGES = {
    "bytes": "Bytes each worker's prompt cache holds.",
    "limit_bytes": "Each worker's prompt cache limit in bytes.",
    "entries": "Entries in each worker's prompt cache.",
    "hit_rate": "Share of requests that reused a cached prefix, per worker.",
    "token_hit_rate": "Share of prompt tokens served from the cache, per worker.",
}


class PromptCacheCollector:
    """``mlxcluster_worker_prompt_cache_*`` per worker and ``mlxcluster_cache_index_*`` from the last snapshot.

    The workers' figures are their own counters since they started, as their heartbeats said; series of
    workers gone from the snapshot disappear with it.
    """

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, float]] = {}
        self.index: dict[str, int] = {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        workers, index = self.workers, self.index
        if workers:
            for key, help_text in PROMPT_CACHE_COUNTERS.items():
                counter = CounterMetricFamily(f"mlxcluster_worker_prompt_cache_{key}", help_text, labels=["worker"])
                for worker, stats in workers.items():
                    counter.add_metric([worker], stats.get(key, 0))
                yield counter
            for key, help_text in PROMPT_CACHE_GAUGES.items():
                gauge = GaugeMetricFamily(f"mlxcluster_worker_prompt_cache_{key}", help_text, labels=["worker"])
                for worker, stats in workers.items():
                    gauge.add_metric([worker], stats.get(key, 0))
                yield gauge
        if index:
            yield GaugeMetricFamily(
                "mlxcluster_cache_index_entries",
                "(prefix digest, worker) pairs in the controller's cache index.",
                value=index.get("entries", 0),
            )
            yield GaugeMetricFamily(
                "mlxcluster_cache_index_max_entries", "The cache index's bound.", value=index.get("max_entries", 0)
            )
            yield CounterMetricFamily(
                "mlxcluster_cache_index_evictions",
                "Index entries dropped because the index was full.",
                value=index.get("evictions", 0),
            )
            yield CounterMetricFamily(
                "mlxcluster_cache_index_events", "Cache events applied to the index.", value=index.get("events", 0)
            )


SPECULATION_COUNTERS = {  # metric name → (SpeculationCounts field, help)
    "steps": ("steps", "Forwards that verified drafted tokens (speculative decoding), as each worker reports."),
    "drafted_tokens": ("drafted", "Drafted tokens each worker verified."),
    "accepted_tokens": ("accepted", "Drafted tokens each worker accepted (each one a forward saved)."),
    "draft_model_drafted_tokens": (
        "model_drafted",
        "Of the drafted tokens, those each worker's draft model (worker.draft_model) drafted.",
    ),
    "draft_model_accepted_tokens": ("model_accepted", "Of the accepted tokens, those its draft model drafted."),
}


class SpeculationCollector:
    """``mlxcluster_worker_speculative_*`` per worker that speculates, from the last snapshot.

    Counters since each worker started, as its heartbeats said, and ``acceptance_rate`` (accepted / drafted);
    series of workers gone from the snapshot, or no longer speculating, disappear with it.
    """

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, float]] = {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        workers = self.workers
        if not workers:
            return
        for name, (field, help_text) in SPECULATION_COUNTERS.items():
            counter = CounterMetricFamily(f"mlxcluster_worker_speculative_{name}", help_text, labels=["worker"])
            for worker, counts in workers.items():
                counter.add_metric([worker], counts.get(field, 0))
            yield counter
        gauge = GaugeMetricFamily(
            "mlxcluster_worker_speculative_acceptance_rate",
            "Share of drafted tokens each worker accepted (0 before any was drafted).",
            labels=["worker"],
        )
        for worker, counts in workers.items():
            gauge.add_metric([worker], counts.get("acceptance_rate", 0))
        yield gauge


class LoopHistogram:
    """A Prometheus histogram for observations made on the event loop, without prometheus-client's locks.

    About ten times cheaper per observation than ``prometheus_client.Histogram`` (a request brings one
    inter-token sample per token frame). Only the exporter's ``export`` (on the loop) and the ``/metrics``
    handler (on the loop) touch it, so no lock is needed.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts, total = self.bounds, self.counts, 0.0
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
            total += value
        self.sum += total

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class TierLatencyCollector:
    """``mlxcluster_tier_request_duration_seconds`` and ``mlxcluster_tier_ttft_seconds``: every online
    controller's histogram summed from their heartbeats (a controller tier's processes included), so a scrape
    of a port shared by several processes shows them all; absent until the controller hears its peers."""

    def __init__(self) -> None:
        self.latency: dict[str, LatencyCounts] = {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        for name, histogram in self.latency.items():
            bounds = LATENCY_BUCKETS.get(name)
            if bounds is None or len(histogram.counts) != len(bounds) + 1:
                continue
            cumulative, buckets = 0, []
            for bound, count in zip((*bounds, math.inf), histogram.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
            yield HistogramMetricFamily(
                f"mlxcluster_tier_{name}",
                f"Every online controller's {name.removesuffix('_seconds').replace('_', ' ')} histogram, summed.",
                buckets=buckets,
                sum_value=histogram.sum,
            )


class _WithoutCreated:
    """A registry view without the ``*_created`` timestamps, so /metrics has only the documented series."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        from prometheus_client.metrics_core import Metric

        for family in self.registry.collect():
            trimmed = Metric(family.name, family.documentation, family.type, family.unit)
            trimmed.samples = [sample for sample in family.samples if not sample.name.endswith("_created")]
            yield trimmed


class LogExporter:
    """Logs one summary line every ``interval_s`` seconds (at the first cluster snapshot after it).

    The line covers the requests finished since the previous one: counts by status, request rate,
    tokens, tokens/s, p50/p95 time to first token, and the cluster's state now.
    """

    def __init__(self, interval_s: float = 60.0, logger: str = "mlxcluster.metrics", level: str = "info") -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"level must be debug, info, warning or error, got {level!r}")
        self.interval_s = float(interval_s)
        self.level = numeric
        self.log = logging.getLogger(logger)
        self.lines = 0
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.since = now
        self.by_status: dict[str, int] = {"ok": 0, "error": 0, "cancelled": 0}
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.retries = 0
        self.ttfts: list[float] = []

    def export(self, event: MetricsEvent) -> None:
        """Accumulate; on a snapshot, write the line when ``interval_s`` has passed (on its own thread)."""
        match event:
            case RequestFinished():
                self.by_status[event.status] = self.by_status.get(event.status, 0) + 1
                self.completion_tokens += event.completion_tokens
                self.prompt_tokens += event.prompt_tokens
                if event.ttft_s is not None and len(self.ttfts) < 100_000:
                    self.ttfts.append(event.ttft_s)
            case RequestRetried():
                self.retries += 1
            case ClusterSnapshot():
                now = time.monotonic()
                if now - self.since >= self.interval_s:
                    self.log.log(self.level, "%s", self.summary(event, now))
                    self.lines += 1
                    self._reset(now)

    def summary(self, snapshot: ClusterSnapshot, now: float | None = None) -> str:
        """The summary line for the requests since the last line and ``snapshot``."""
        elapsed = max(1e-9, (time.monotonic() if now is None else now) - self.since)
        total = sum(self.by_status.values())
        statuses = ", ".join(f"{count} {status}" for status, count in self.by_status.items())
        ttft = "-"
        if self.ttfts:
            ordered = sorted(self.ttfts)
            ttft = f"p50 {_quantile(ordered, 0.5) * 1000:.0f}ms p95 {_quantile(ordered, 0.95) * 1000:.0f}ms"
        workers = " ".join(f"{snapshot.workers.get(s, 0)} {s}" for s in WORKER_STATES)
        return (
            f"metrics: {total} requests in {elapsed:.0f}s ({statuses}; {total / elapsed:.2f} req/s), "
            f"{self.completion_tokens} completion tokens ({self.completion_tokens / elapsed:.1f} tok/s), "
            f"{self.prompt_tokens} prompt tokens, ttft {ttft}, {self.retries} retries; "
            f"now {snapshot.inflight} in flight, {snapshot.queue_depth} queued, workers {workers}, "
            f"{snapshot.invalid_messages_total} invalid messages, {snapshot.events_dropped_total} events dropped"
        )


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted non-empty list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@hookimpl
def mlxcluster_register_exporters(register: Register) -> None:
    """Register the built-in exporters."""
    register("prometheus", PrometheusExporter, "Prometheus text format on GET /metrics (settings: path).")
    register("log", LogExporter, "A summary line in the log every interval_s seconds (settings: interval_s, level).")
