"""Operator routes: API keys and their usage, the request monitor, worker management.

Mutating routes (``POST``) need an admin key (the auth middleware refuses others with 403), and so does
``/api/cluster/keys``. ``/api/cluster/requests`` shows a non-admin key only its own requests.
"""

from __future__ import annotations

import json
import time

from aiohttp import web

from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.controller.http.middleware import API_KEY, admin_required, is_admin
from mlxcluster.controller.http.responses import json_response
from mlxcluster.controller.peers import PEERS
from mlxcluster.controller.routing.settings_sync import publish_settings
from mlxcluster.controller.routing.worker_admin import WorkerSettings, parse_settings
from mlxcluster.controller.tier_requests import tier_requests

routes = web.RouteTableDef()
REQUEST_STATES = ("routing", "waiting", "streaming", "ok", "error", "cancelled")


@routes.get("/api/cluster/keys")
async def list_keys(request: web.Request) -> web.Response:
    """Every API key's name, role, limits, current window and usage (admin only; never a key value)."""
    if not is_admin(request):
        raise admin_required()
    ctx: ControllerContext = request.app[CONTROLLER]
    return json_response({"keys": ctx.ops.key_usage()})


@routes.get("/api/cluster/requests")
async def list_requests(request: web.Request) -> web.Response:
    """Requests in flight and the latest finished ones of every controller of the tier; ``?limit=``,
    ``?state=``, ``?key=`` (admin)."""
    ctx: ControllerContext = request.app[CONTROLLER]
    limit: int | None = None
    if "limit" in request.query:
        try:
            limit = int(request.query["limit"])
        except ValueError:
            limit = -1
        if limit < 0:
            raise bad_request("limit: expected a non-negative integer", "limit")
    state = request.query.get("state")
    if state is not None and state not in REQUEST_STATES:
        raise bad_request(f"state: expected one of {', '.join(REQUEST_STATES)}", "state")
    key = request.get(API_KEY)
    only = request.query.get("key") if key is None or key.admin else key.name
    peers = request.app[PEERS].online() if PEERS in request.app else []
    listing = await tier_requests(ctx, peers, key=only, limit=limit, state=state)
    listing["time"] = time.time()
    return json_response(listing)


def _worker_or_404(ctx: ControllerContext, worker_id: str) -> None:
    if worker_id not in ctx.registry:
        raise ApiError(404, f"No worker '{worker_id}'", code="worker_not_found")


async def _configure(request: web.Request, change: WorkerSettings) -> web.Response:
    ctx: ControllerContext = request.app[CONTROLLER]
    worker_id = request.match_info["worker_id"]
    _worker_or_404(ctx, worker_id)
    view = ctx.registry.configure(worker_id, change)
    if view is None:
        raise ApiError(404, f"No worker '{worker_id}'", code="worker_not_found")
    settings = ctx.registry.settings_of(worker_id)
    await publish_settings(ctx, worker_id)  # every other controller applies them too
    return json_response(
        {
            "id": worker_id,
            "status": view.status,
            "inflight": view.inflight,
            "settings": settings.to_json() if settings is not None else None,
        }
    )


@routes.post("/api/cluster/workers/{worker_id}/drain")
async def drain_worker(request: web.Request) -> web.Response:
    """Stop sending new work to the worker; its running streams finish."""
    return await _configure(request, WorkerSettings(drained=True))


@routes.post("/api/cluster/workers/{worker_id}/resume")
async def resume_worker(request: web.Request) -> web.Response:
    """Undo a drain."""
    return await _configure(request, WorkerSettings(drained=False))


@routes.post("/api/cluster/workers/{worker_id}/settings")
async def set_worker(request: web.Request) -> web.Response:
    """Set ``priority`` (higher first), ``tags`` and/or ``drained`` from a JSON body."""
    raw = await request.read()
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise bad_request(f"Body is not valid JSON: {exc}", code="invalid_json") from None
    try:
        change = parse_settings(body)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        raise bad_request(str(exc), None if field == "body" else field) from None
    return await _configure(request, change)


@routes.post("/api/cluster/workers/{worker_id}/forget")
async def forget_worker(request: web.Request) -> web.Response:
    """Remove an offline worker and its settings from the registry (409 while it is not offline)."""
    ctx: ControllerContext = request.app[CONTROLLER]
    worker_id = request.match_info["worker_id"]
    _worker_or_404(ctx, worker_id)
    try:
        ctx.registry.forget(worker_id)
    except ValueError as exc:
        raise ApiError(409, str(exc), code="worker_not_offline") from None
    ctx.ops.requests.forget_worker(worker_id)
    await publish_settings(ctx, worker_id, forget=True)
    return json_response({"id": worker_id, "forgotten": True})
