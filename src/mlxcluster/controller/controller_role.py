"""The controller role's lifetime: serve HTTP until SIGTERM, then drain in-flight streams."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from mlxcluster.bus import Bus
from mlxcluster.bus.jetstream import JetStreamUnavailable
from mlxcluster.config import Config, ConfigError
from mlxcluster.controller.app import create_app
from mlxcluster.controller.http.context import CONTROLLER
from mlxcluster.controller.metering.metrics_feed import ExporterError
from mlxcluster.controller.routing.balancing import UnknownBalancerError
from mlxcluster.errors import NodeError
from mlxcluster.heap import freeze_startup_heap
from mlxcluster.plugins import get_plugin_manager
from mlxcluster.tracing import TracingUnavailable

log = logging.getLogger(__name__)


async def serve_controller(config: Config, bus: Bus, stop: asyncio.Event) -> None:
    """Serve the API until ``stop``; then refuse new requests and let in-flight ones finish."""
    try:
        app = create_app(config, bus, get_plugin_manager(config.plugins))
    except (UnknownBalancerError, ExporterError, ConfigError, TracingUnavailable) as exc:
        # ConfigError: a bad [[controller.keys]]; TracingUnavailable: [tracing] without the otel extra
        raise NodeError(str(exc)) from None
    ctx = app[CONTROLLER]
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    try:
        await runner.setup()
    except JetStreamUnavailable as exc:  # shared state needs JetStream; --no-shared-state runs without
        await runner.cleanup()
        raise NodeError(str(exc)) from None
    try:
        reuse_port = config.controller.reuse_port or None  # one process of a tier: the others share the port
        site = web.TCPSite(runner, config.controller.bind, config.controller.port, reuse_port=reuse_port)
        try:
            await site.start()
        except OSError as exc:
            raise NodeError(
                f"cannot listen on {config.controller.bind}:{config.controller.port}: {exc.strerror}; "
                "set controller.port (or --port)"
            ) from None
        log.info(
            "controller %s listening on http://%s:%d", ctx.controller_id, config.controller.bind, config.controller.port
        )
        freeze_startup_heap()
        await stop.wait()
        ctx.lifecycle.to("draining")
        await wait_for_in_flight(ctx.dispatcher.stats, config.controller.drain_timeout_s)
    finally:
        await runner.cleanup()


async def wait_for_in_flight(stats, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Wait until no request is in flight, or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    if stats.in_flight:
        log.info("draining %d in-flight request(s), up to %.0fs", stats.in_flight, timeout)
    while stats.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
