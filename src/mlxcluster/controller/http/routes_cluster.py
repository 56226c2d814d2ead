"""Cluster routes: liveness, readiness, status and the worker list."""

from __future__ import annotations

import time
from typing import Any, cast

import msgspec
from aiohttp import web

from mlxcluster import __version__
from mlxcluster.api import WorkerState
from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.responses import json_response
from mlxcluster.controller.peers import PEERS
from mlxcluster.controller.routing.cache_index import prompt_cache_rates
from mlxcluster.controller.routing.registry import speculation_fields

routes = web.RouteTableDef()
WORKER_STATES = ("online", "degraded", "draining", "offline")


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers (200 even while degraded); ``status`` is ``degraded`` without NATS, and
    ``reason`` says why where the controller's state has one."""
    ctx: ControllerContext = request.app[CONTROLLER]
    lifecycle = ctx.lifecycle
    status = "degraded" if lifecycle.state == "degraded" or not ctx.bus.is_connected else "ok"
    body: dict[str, object] = {"status": status, "state": lifecycle.state, "time": time.time()}
    if lifecycle.error is not None:
        body["reason"] = lifecycle.error
    return json_response(body)


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """Readiness: the controller is ready and at least one worker is online."""
    ctx: ControllerContext = request.app[CONTROLLER]
    online = ctx.registry.stats().online
    is_ready = ctx.lifecycle.accepting and online > 0 and ctx.bus.is_connected
    body = {"ready": is_ready, "state": ctx.lifecycle.state, "workers_online": online}
    return json_response(body, status=200 if is_ready else 503)


@routes.get("/api/cluster/status")
async def cluster_status(request: web.Request) -> web.Response:
    """Controller state, worker counts, request counters, bus health.

    ``controller_id`` and ``requests`` are this process's (the one that answered); ``controllers`` lists
    every controller on the bus (the processes of a tier included, ``self`` marking this one) and ``tier``
    sums their request counts from their heartbeats. Workers, models and the cache index are the same
    whichever process answers: each builds them from the workers' broadcasts."""
    ctx: ControllerContext = request.app[CONTROLLER]
    stats = ctx.dispatcher.stats
    counters = ctx.bus.counters()
    return json_response(
        {
            "controller_id": ctx.controller_id,
            "version": __version__,
            "mode": ctx.config.cluster.mode,
            "state": ctx.lifecycle.state,
            "state_since": ctx.lifecycle.since,
            "uptime_s": round(time.time() - ctx.started_at, 1),
            "balancer": ctx.balancer_name,
            "sticky_sessions": ctx.config.load_balancing.sticky_sessions,
            "workers": msgspec.to_builtins(ctx.registry.stats()),
            "models": ctx.registry.models(),
            "requests": {
                "total": stats.requests,
                "in_flight": stats.in_flight,
                "retries": stats.retries,
                "failed": stats.failed,
                "completed": stats.completed,
                "errors": stats.errors,
                "migrations": stats.migrations,
                "migrations_failed": stats.migrations_failed,
                "success_rate": stats.outcomes.rate(),
                "success_rate_window_s": stats.outcomes.window_s,
            },
            "recent": {
                "ttft_ms": [round(v, 2) for v in stats.recent_ttft_ms],
                "tokens_per_second": [round(v, 1) for v in stats.recent_tokens_per_second],
            },
            "controllers": request.app[PEERS].listing() if PEERS in request.app else [],
            "tier": request.app[PEERS].totals() if PEERS in request.app else None,
            "shared_state": ctx.shared is not None,
            "shared": ctx.shared.status() if ctx.shared is not None else None,
            "cache_index": msgspec.to_builtins(ctx.cache_index.stats()) if ctx.cache_index is not None else None,
            "nats": {
                "connected": ctx.bus.is_connected,
                "server": ctx.bus.server_address,
                "max_payload": ctx.bus.max_payload if ctx.bus.is_connected else None,
                "invalid_messages_total": ctx.bus.invalid_messages_total,
                "state": ctx.bus.events.state,
                "state_since": ctx.bus.events.since,
                "reconnects": counters["reconnects"],
                "disconnects": counters["disconnects"],
                "slow_consumer_drops": counters["slow_consumer_drops"],
            },
        }
    )


@routes.get("/api/cluster/workers")
async def list_workers(request: web.Request) -> web.Response:
    """All known workers, optionally filtered by ``?status=``, ``?model=``, ``?tag=``; ``total`` counts those listed."""
    ctx: ControllerContext = request.app[CONTROLLER]
    status = request.query.get("status")
    if status is not None and status not in WORKER_STATES:
        raise ApiError(400, f"Invalid status '{status}'; expected one of {', '.join(WORKER_STATES)}", param="status")
    state = cast(WorkerState | None, status)  # checked against WORKER_STATES above
    workers = ctx.registry.query(status=state, model=request.query.get("model"), tag=request.query.get("tag"))
    return json_response({"workers": [_worker_json(ctx, w) for w in workers], "total": len(workers)})


@routes.get("/api/cluster/workers/{worker_id}")
async def get_worker(request: web.Request) -> web.Response:
    """One worker, or a 404 in the error shape."""
    ctx: ControllerContext = request.app[CONTROLLER]
    worker = ctx.registry.get(request.match_info["worker_id"])
    if worker is None:
        raise ApiError(404, f"No worker '{request.match_info['worker_id']}'", code="worker_not_found")
    return json_response(_worker_json(ctx, worker))


def _worker_json(ctx: ControllerContext, worker: object) -> dict[str, object]:
    data: dict[str, Any] = msgspec.to_builtins(worker)
    data["breaker"] = ctx.dispatcher.breakers.state(data["id"])
    data.update(ctx.registry.telemetry(data["id"]) or {})
    data.update(ctx.ops.requests.latency(data["id"]))
    memory = getattr(worker, "memory", None)
    if memory is not None:  # every part, as the document's MemoryParts and /api/cluster/models have it
        data["memory"] = msgspec.structs.asdict(memory)
    stats = getattr(worker, "prompt_cache", None)
    if stats is not None:
        cache = data["prompt_cache"] = msgspec.structs.asdict(stats)  # every field: zeros are news too
        cache.update(prompt_cache_rates(cache))
        if ctx.cache_index is not None:
            cache["indexed_digests"] = ctx.cache_index.worker_entries(data["id"])
    speculation = getattr(worker, "speculation", None)
    if speculation is not None:
        data["speculation"] = speculation_fields(speculation)  # every count: zeros are news too
    return data
