"""The exporter interface: the events a metrics exporter receives and the methods it may have.

An exporter is built by its registered factory with the keyword arguments of its ``[metrics.settings.NAME]``
table (``factory(**settings)``) when the controller starts with ``NAME`` in ``[metrics] exporters``. It then
receives every :data:`MetricsEvent` through :meth:`Exporter.export`, one call per event, in the order the
events happened. Calls are made from a background queue, never from a request: a slow exporter only lets
its own queue fill up, and events that do not fit are dropped and counted.

- ``def export(self, event)`` (plain function) runs on the exporter's own thread, so it may block (files,
  sockets). It must not touch the controller's event loop.
- ``async def export(self, event)`` runs on the controller's event loop; it must not block.

Optional methods: ``start()`` / ``close()`` (plain or ``async``; called once before the first and after the
last event) and ``routes()``, which returns aiohttp route definitions the controller serves (for example a
Prometheus ``GET /metrics``). ``routes()`` is called once, when the app is built.

This module imports neither aiohttp nor NATS, so plugins and ``mlxcluster exporters list`` load it cheaply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, runtime_checkable

from msgspec import Struct

from mlxcluster.api.balancer import WorkerState
from mlxcluster.protocol import LatencyCounts

RequestStatus = Literal["ok", "error", "cancelled"]


class _Event(Struct, frozen=True, kw_only=True, tag_field="event"):
    """Base of every event: ``time`` is the wall-clock time (``time.time()``) the event happened."""

    time: float


class RequestFinished(_Event, tag="request_finished", frozen=True, kw_only=True):
    """One inference request ended: answered (``ok``), failed (``error``) or given up by the client.

    ``worker`` is the worker that served it last (``None`` when none was picked: unknown model, no
    capacity, payload too large). Durations are seconds, measured by the controller from the moment the
    request reached the dispatcher. ``model_known`` is False when no worker has ever served ``model``
    (a 404): exporters should not use such names as metric labels, since clients choose them.
    """

    request_id: str
    model: str
    worker: str | None = None
    status: RequestStatus
    error: str | None = None
    """Error code when ``status == "error"`` (``model_not_found``, ``no_capacity``, a worker's code...)."""
    duration_s: float
    ttft_s: float | None = None
    """Time to the first token (``None``: no token came)."""
    inter_token_s: tuple[float, ...] = ()
    """Seconds per token between successive token frames (at most :data:`MAX_INTER_TOKEN_SAMPLES`)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the worker served from its prompt cache."""
    attempts: int = 0
    """Workers tried (more than 1: retried before the first token, or moved mid-stream)."""
    stream: bool = False
    model_known: bool = True
    key: str | None = None
    """Name of the API key the request came with (``None``: no keys configured)."""
    finish_reason: str | None = None
    """``stop``, ``length``, ``cancelled``... from the worker's ``Done`` (``None``: no Done)."""
    queue_s: float | None = None
    """Seconds the request waited in the worker's queue, as the worker measured it."""
    started: float = 0.0
    """Wall-clock time the request reached the dispatcher."""
    migrations: int = 0
    """Times the stream moved to another worker after its first token (mid-stream migration)."""
    dispatched: bool = False
    """It passed the dispatcher's checks (known model, size) and went to the workers."""
    error_frame: bool = False
    """It ended with an ``Error`` frame (``status == "error"`` otherwise means an error raised before any frame)."""
    unmoved: bool = False
    """It lost its worker mid-stream and could not move on (migration limit, no worker left, client gone)."""
    tokens_per_second: float = 0.0
    """Generation speed the last worker measured (its ``Done``; 0: no Done)."""


class RequestRetried(_Event, tag="request_retried", frozen=True, kw_only=True):
    """A request failed on ``worker`` before its first token and goes to another worker (``attempt``)."""

    request_id: str
    model: str
    worker: str
    attempt: int
    reason: str


class RequestMigrated(_Event, tag="request_migrated", frozen=True, kw_only=True):
    """A started stream lost ``worker`` (``reason``: ``offline``, ``stalled``, ``frames_lost``,
    ``worker_error``) and continues on ``to_worker``: ``migration`` counts the moves of this request.

    ``tokens`` were streamed before the move; ``gap_s`` is the silence the client saw between the last
    token of the lost worker and the first frame of the new one (detection included).
    """

    request_id: str
    model: str
    worker: str
    to_worker: str
    migration: int
    reason: str
    tokens: int = 0
    gap_s: float = 0.0


class WorkerStatusChanged(_Event, tag="worker_status_changed", frozen=True, kw_only=True):
    """A worker appeared (``previous is None``), changed status, or was forgotten (``current is None``)."""

    worker: str
    previous: WorkerState | None = None
    current: WorkerState | None = None


class ClusterSnapshot(_Event, tag="cluster_snapshot", frozen=True, kw_only=True):
    """The controller's state, sent every ``[metrics] snapshot_interval_s``.

    Counters (``*_total``) count since the controller started.
    """

    inflight: int = 0
    """Requests this controller is serving now."""
    queue_depth: int = 0
    """Requests waiting in the workers' queues, as their last heartbeats said."""
    workers: dict[str, int] = {}
    """Worker count by status (``online``, ``degraded``, ``draining``, ``offline``)."""
    worker_tokens_per_second: dict[str, float] = {}
    """Generation speed each online or degraded worker last reported."""
    capacity: int = 0
    requests_total: int = 0
    retries_total: int = 0
    failed_total: int = 0
    migrations_total: int = 0
    """Started streams moved to another worker (mid-stream migrations)."""
    invalid_messages_total: int = 0
    """Malformed NATS messages this controller dropped."""
    events_dropped_total: int = 0
    """Events dropped because some exporter's queue was full."""
    worker_prompt_cache: dict[str, dict[str, float]] = {}
    """Per online or degraded worker with a prompt cache: the fields of its last reported
    :class:`~mlxcluster.protocol.PromptCacheStats` plus ``hit_rate`` and ``token_hit_rate``."""
    worker_speculation: dict[str, dict[str, float]] = {}
    """Per online or degraded worker that speculates: the fields of its last reported
    :class:`~mlxcluster.protocol.SpeculationCounts` (``steps``, ``drafted``, ``accepted``, counted since it started)
    plus ``acceptance_rate`` (accepted / drafted, 0.0 before any was drafted)."""
    cache_index: dict[str, int] = {}
    """The controller's cache index: :class:`~mlxcluster.controller.routing.cache_index.CacheIndexStats` fields."""
    rate_limited_by_key: dict[str, int] = {}
    """Requests refused with 429, by API key name, since the controller started."""
    tier: dict[str, int] = {}
    """Every online controller on the bus (the processes of a controller tier, other machines' controllers), its
    counters summed from their heartbeats: ``controllers_online``, ``in_flight``, ``requests_total``,
    ``completed``, ``failed``, ``errors``, ``retries``, ``prompt_tokens``, ``completion_tokens`` (empty where
    the controller hears no peers)."""
    tier_latency: dict[str, LatencyCounts] = {}
    """The same controllers' latency histograms summed, by name (``request_duration_seconds``,
    ``ttft_seconds``; buckets: :data:`~mlxcluster.protocol.LATENCY_BUCKETS`)."""
    bus: dict[str, int] = {}
    """This controller's NATS connection: ``connected`` (1 or 0) and counters since it connected first:
    ``reconnects``, ``disconnects``, ``in_msgs``, ``out_msgs``, ``in_bytes``, ``out_bytes``,
    ``slow_consumer_drops`` (messages dropped because a subscription could not keep up), ``errors``,
    ``invalid_messages``. A snapshot is also sent at each change of the connection."""
    worker_accelerator: dict[str, dict[str, float]] = {}
    """Per online or degraded worker that reports its accelerator: the fields of its last
    :class:`~mlxcluster.protocol.AcceleratorStats` that it knows (``mlx_active_bytes``, ``mlx_cache_bytes``,
    ``mlx_peak_bytes``, ``gpu_utilization`` in percent, ``gpu_cores``, ``gpu_memory_used_bytes``)."""


MetricsEvent = RequestFinished | RequestRetried | RequestMigrated | WorkerStatusChanged | ClusterSnapshot
"""Everything an exporter receives; ``match`` on it."""

MAX_INTER_TOKEN_SAMPLES = 1024


@runtime_checkable
class Exporter(Protocol):
    """A metrics exporter: ``export`` is required; ``start``, ``close`` and ``routes`` are optional."""

    def export(self, event: MetricsEvent) -> None | Awaitable[None]:
        """Handle one event (plain: on the exporter's thread; ``async``: on the event loop)."""
        ...


ExporterFactory = Callable[..., Exporter]
"""What ``mlxcluster_register_exporters`` registers: called with the ``[metrics.settings.NAME]`` table as
keyword arguments, it returns an :class:`Exporter`."""
