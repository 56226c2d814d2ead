"""The controller's aiohttp application: ``create_app(config, bus, pm)``.

Everything the app opens — registry subscriptions, the offline sweeper, the announce — is opened in
a ``cleanup_ctx`` and closed by it, so an app made by the factory in a test behaves like production.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import pluggy
from aiohttp import web
from nats.aio.msg import Msg

from mlxcluster.api import BalancerContext
from mlxcluster.bus import Bus, StreamInbox
from mlxcluster.bus.image_store import ImageStore
from mlxcluster.config import Config
from mlxcluster.controller.bus_watch import watch_bus
from mlxcluster.controller.http import (
    dashboard,
    openapi,
    routes_admin,
    routes_anthropic,
    routes_cluster,
    routes_embeddings,
    routes_keys,
    routes_models,
    routes_openai,
    routes_responses,
    routes_ws,
)
from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.images import ImageFetcher
from mlxcluster.controller.http.middleware import controller_middlewares
from mlxcluster.controller.http.tracing_middleware import tracing_middleware
from mlxcluster.controller.metering.metrics_feed import METRICS, build_metrics_feed, run_metrics
from mlxcluster.controller.metering.ops import Operations
from mlxcluster.controller.peers import PEERS, ControllerPeers, name_the_controller, run_controller_heartbeats
from mlxcluster.controller.routing.balancing import build_balancer
from mlxcluster.controller.routing.cache_feed import follow_cache_events
from mlxcluster.controller.routing.cache_index import CacheIndex
from mlxcluster.controller.routing.dispatch import Dispatcher
from mlxcluster.controller.routing.embeddings import EmbeddingDispatcher
from mlxcluster.controller.routing.model_loads import ModelLoader
from mlxcluster.controller.routing.registry import WorkerRegistry
from mlxcluster.controller.routing.settings_sync import share_worker_settings
from mlxcluster.controller.shared.lifetime import run_shared_state
from mlxcluster.controller.tier_requests import answer_requests_queries
from mlxcluster.protocol import Announce, Deregister, WorkerHeartbeat, WorkerRegistration
from mlxcluster.tracing import Tracer, build_tracer, stop_tracer

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.5
"""How often silent workers are marked offline (detection within offline_timeout + this)."""


def create_app(config: Config, bus: Bus, pm: pluggy.PluginManager, *, tracer: Tracer | None = None) -> web.Application:
    """Build the controller app; its cleanup_ctx joins the cluster when the app starts.

    :param tracer: where request spans go (default: built from ``[tracing]``; raises
        :class:`~mlxcluster.tracing.TracingUnavailable` when it is set and the ``otel`` extra is missing).
    """
    registry = WorkerRegistry(config)
    cache_index = CacheIndex(config.load_balancing.cache_index_max_entries)
    balancer_context = BalancerContext(config.load_balancing, cache_index)
    balancer = build_balancer(pm, config.load_balancing, balancer_context)
    controller_id = f"controller-{uuid.uuid4().hex[:8]}"
    if tracer is None:
        tracer = build_tracer(config.tracing, role="controller", instance=controller_id)
    inbox = StreamInbox(bus, controller_id)
    metrics = build_metrics_feed(pm, config.metrics)  # unknown exporter names fail here, at startup
    ops = Operations.from_config(config.controller, controller_id)  # a bad key entry fails here, at startup
    loader = ModelLoader(bus=bus, registry=registry, timeout_s=config.controller.model_load_timeout_s)
    dispatcher = Dispatcher(
        bus=bus,
        registry=registry,
        balancer=balancer,
        config=config.controller,
        inbox=inbox,
        events=ops.sink(metrics.emit if metrics.runners else None),
        loader=loader,
        tracer=tracer,
        strategy=config.load_balancing.strategy,
        cache_share=lambda request, worker_id: balancer_context.prefix_match(request).fraction(worker_id),
    )
    embedder = EmbeddingDispatcher(
        bus=bus,
        registry=registry,
        balancer=balancer,
        config=config.controller,
        breakers=dispatcher.breakers,
        loader=loader,
        events=dispatcher.events,
        tracer=tracer,
        strategy=config.load_balancing.strategy,
    )
    ctx = ControllerContext(
        config=config,
        bus=bus,
        registry=registry,
        dispatcher=dispatcher,
        embedder=embedder,
        loader=loader,
        balancer_name=config.load_balancing.strategy,
        controller_id=controller_id,
        cache_index=cache_index,
        ops=ops,
        tracer=tracer,
        images=ImageStore(bus),
        image_fetcher=ImageFetcher(config.controller),
    )
    middlewares = controller_middlewares(
        config.controller.cors, ops.keys, ops.limiter, runtime_keys=config.controller.shared_state
    )
    if tracer.enabled:  # after the request id, outside the error and auth middlewares (it sees their answer)
        middlewares.insert(1, tracing_middleware(tracer))
    app = web.Application(middlewares=middlewares, client_max_size=config.controller.max_body_bytes)
    app[CONTROLLER] = ctx
    app[METRICS] = metrics
    app[PEERS] = ControllerPeers(controller_id, config.discovery.offline_timeout_ms / 1000)
    app.on_response_prepare.append(name_the_controller)  # X-Mlxcluster-Controller: which process answered
    app.add_routes(routes_openai.routes)
    app.add_routes(routes_embeddings.routes)
    app.add_routes(routes_responses.routes)
    app.add_routes(routes_anthropic.routes)
    app.add_routes(routes_models.routes)
    app.add_routes(routes_cluster.routes)
    app.add_routes(routes_admin.routes)
    app.add_routes(routes_keys.routes)
    openapi.setup(app)  # GET /openapi.json (no key); lists the routes the app has when first asked
    routes_ws.setup(app)
    dashboard.setup(app)
    app.add_routes(metrics.routes())  # e.g. the prometheus exporter's GET /metrics (outside /v1 and /api: no key)
    app.cleanup_ctx.append(run_tracer)  # first in, last out: spans of the drain are exported too
    app.cleanup_ctx.append(close_image_fetcher)  # closed after the drain: requests in it may still fetch images
    app.cleanup_ctx.append(run_shared_state)  # first: without JetStream the start is refused before anything runs
    app.cleanup_ctx.append(run_metrics)  # before join_cluster: exporters see the workers register, outlive the drain
    app.cleanup_ctx.append(follow_cache_events)  # before join_cluster: workers answer its announce with snapshots
    app.cleanup_ctx.append(share_worker_settings)  # before join_cluster: peers answer its announce
    app.cleanup_ctx.append(join_cluster)
    app.cleanup_ctx.append(run_controller_heartbeats)  # other controllers on this NATS see us, we see them
    app.cleanup_ctx.append(answer_requests_queries)  # the tier's request monitor: peers ask for our requests
    return app


async def close_image_fetcher(app: web.Application) -> AsyncIterator[None]:
    """Close the HTTP session that fetched image URLs when the app stops."""
    yield
    await app[CONTROLLER].image_fetcher.close()


async def run_tracer(app: web.Application) -> AsyncIterator[None]:
    """Export the spans still buffered when the app stops (in a thread: the export is blocking HTTP)."""
    try:
        yield
    finally:
        await stop_tracer(app[CONTROLLER].tracer)


async def join_cluster(app: web.Application) -> AsyncIterator[None]:
    """Subscribe to worker discovery, sweep for offline workers, announce; undo on cleanup."""
    ctx = app[CONTROLLER]
    bus, registry, subjects = ctx.bus, ctx.registry, ctx.bus.subjects

    async def on_register(registration: WorkerRegistration, _msg: Msg) -> None:
        registry.on_registration(registration)

    async def on_heartbeat(heartbeat: WorkerHeartbeat, _msg: Msg) -> None:
        if registry.on_heartbeat(heartbeat):
            await announce()  # an unknown worker: ask everyone to register again

    async def on_deregister(message: Deregister, _msg: Msg) -> None:
        if registry.on_deregister(message):
            log.info("worker %s left: %s", message.worker_id, message.reason or "no reason given")

    async def announce() -> None:
        await bus.publish(subjects.announce, Announce(controller_id=ctx.controller_id, started_at=ctx.started_at))

    await ctx.dispatcher.inbox.start()
    subscriptions = [
        await bus.subscribe(subjects.register, WorkerRegistration, on_register),
        await bus.subscribe(subjects.heartbeat, WorkerHeartbeat, on_heartbeat),
        await bus.subscribe(subjects.deregister, Deregister, on_deregister),
    ]
    await bus.flush()
    await announce()
    stop_sweeping = asyncio.Event()
    sweeper = asyncio.create_task(registry.run_sweeper(stop_sweeping, SWEEP_INTERVAL_S))
    ctx.lifecycle.to("ready")
    stop_watching = watch_bus(ctx.lifecycle, bus)
    try:
        yield
    finally:
        stop_sweeping.set()
        sweeper.cancel()
        stop_watching()
        await ctx.dispatcher.inbox.close()
        for sub in subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if ctx.lifecycle.state != "stopped":
            if ctx.lifecycle.state != "draining":
                ctx.lifecycle.to("draining")
            ctx.lifecycle.to("stopped")
