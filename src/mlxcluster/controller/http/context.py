"""What every route needs, stored once on the app under :data:`CONTROLLER` (no globals)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from mlxcluster.bus import Bus
from mlxcluster.bus.image_store import ImageStore
from mlxcluster.config import Config
from mlxcluster.controller.http.images import ImageFetcher
from mlxcluster.controller.lifecycle import Lifecycle
from mlxcluster.controller.metering.ops import Operations
from mlxcluster.controller.routing.cache_index import CacheIndex
from mlxcluster.controller.routing.dispatch import Dispatcher
from mlxcluster.controller.routing.embeddings import EmbeddingDispatcher
from mlxcluster.controller.routing.model_loads import ModelLoader
from mlxcluster.controller.routing.registry import WorkerRegistry
from mlxcluster.controller.shared.state import SharedState
from mlxcluster.tracing import NoTracer, Tracer


@dataclass
class ControllerContext:
    """The controller's parts, built by :func:`mlxcluster.controller.app.create_app`."""

    config: Config
    bus: Bus
    registry: WorkerRegistry
    dispatcher: Dispatcher
    loader: ModelLoader
    """Loads and unloads models on workers (on demand, and the admin commands)."""
    balancer_name: str
    controller_id: str
    embedder: EmbeddingDispatcher
    """Sends embedding requests (``/v1/embeddings``) to workers."""
    image_fetcher: ImageFetcher
    """Fetches the image URLs of requests (one HTTP session, closed with the app)."""
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    started_at: int = field(default_factory=lambda: int(time.time()))
    cache_index: CacheIndex | None = None
    """Which workers' prompt caches hold which prefixes (soft state, fed by ``worker.cache`` events)."""
    ops: Operations = field(default_factory=Operations)
    """API keys, rate limits and request monitoring."""
    shared: SharedState | None = None
    """Keys and usage in JetStream, once opened at start (``None``: ``controller.shared_state`` is off)."""
    tracer: Tracer = field(default_factory=NoTracer)
    """Where request spans go (a :class:`~mlxcluster.tracing.NoTracer` with ``[tracing]`` off)."""
    images: ImageStore | None = None
    """Where images too large for their request's message are parked (built with the app)."""


CONTROLLER = web.AppKey("controller", ControllerContext)
