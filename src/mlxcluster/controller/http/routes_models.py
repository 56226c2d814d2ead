"""The fleet's models: ``/v1/models`` (every model available anywhere, loaded or not), ``/api/cluster/models``
(per worker: state, bytes, last used, expiry, pin, requests in flight), ``/api/cluster/placement`` (where a
model would load and why), and the admin commands ``POST /api/cluster/models/{model}/load|unload``.

A key limited to some models sees only those. The ``POST`` routes need an admin key (the auth middleware).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from aiohttp import web

from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError, bad_request, model_not_found
from mlxcluster.controller.http.keep_alive import keep_alive_seconds
from mlxcluster.controller.http.middleware import API_KEY
from mlxcluster.controller.http.responses import json_response
from mlxcluster.controller.routing.registry import FleetWorker
from mlxcluster.protocol import ModelCommand

routes = web.RouteTableDef()


def _allowed(request: web.Request, model: str) -> bool:
    key = request.get(API_KEY)
    return key is None or key.allows_model(model)


def _fleet_models(ctx: ControllerContext) -> dict[str, dict[str, Any]]:
    """Every model some known worker serves or may load, OpenAI-shaped with our extension fields."""
    models: dict[str, dict[str, Any]] = {}
    for worker in ctx.registry.fleet():
        online = worker.status in ("online", "degraded")
        for name in sorted({*worker.catalogue, *worker.models}):
            entry = worker.catalogue.get(name)
            model = models.setdefault(
                name,
                {
                    "id": name,
                    "object": "model",
                    "created": ctx.started_at,
                    "owned_by": "mlxcluster",
                    "kind": entry.kind if entry is not None else "chat",
                    "vision": False,
                    "size_bytes": 0,
                    "context_length": 0,
                    "dimensions": 0,
                    "loaded_on": [],
                    "available_on": [],
                },
            )
            if entry is not None:
                model["vision"] = model["vision"] or entry.vision
                model["size_bytes"] = model["size_bytes"] or entry.weights_bytes
                model["context_length"] = model["context_length"] or entry.context_length
                model["dimensions"] = model["dimensions"] or entry.dimensions
            if not online:
                continue
            model["available_on"].append(worker.id)
            if name in worker.models:
                model["loaded_on"].append(worker.id)
    return models


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Every model available anywhere in the fleet (loaded or loadable by an online worker), OpenAI's list shape
    with ``loaded_on``, ``available_on``, ``size_bytes``, ``context_length``, ``kind`` and ``dimensions`` (an embedding
    model's vector length) and ``vision`` (it reads images)."""
    ctx: ControllerContext = request.app[CONTROLLER]
    data = [
        model for name, model in sorted(_fleet_models(ctx).items()) if model["available_on"] and _allowed(request, name)
    ]
    return json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    """One model of :func:`list_models` (404 when no online worker serves or may load it)."""
    ctx: ControllerContext = request.app[CONTROLLER]
    name = request.match_info["model"]
    model = _fleet_models(ctx).get(name)
    if model is None or not model["available_on"] or not _allowed(request, name):
        raise model_not_found(name)
    return json_response(model)


def _fields(struct: msgspec.Struct | None) -> dict[str, Any] | None:
    """Every field of a wire Struct, defaults included (the wire omits them; an API answer does not)."""
    return msgspec.structs.asdict(struct) if struct is not None else None


def _worker_models(worker: FleetWorker) -> dict[str, Any]:
    memory = worker.memory
    return {
        "worker": worker.id,
        "status": worker.status,
        "hostname": worker.hostname,
        "memory": _fields(memory),
        "models": [
            {
                "model": name,
                "state": state.state if (state := worker.states.get(name)) is not None else "loaded",
                "weights_bytes": state.weights_bytes if state is not None else 0,
                "last_used": state.last_used if state is not None else None,
                "expires_at": state.expires_at if state is not None else None,
                "pinned": state.pinned if state is not None else False,
                "in_flight": state.in_flight if state is not None else 0,
            }
            for name in sorted({*worker.models, *worker.states})
        ],
        "catalogue": [_fields(entry) for entry in worker.catalogue.values()],
    }


@routes.get("/api/cluster/models")
async def cluster_models(request: web.Request) -> web.Response:
    """Per worker: its memory budget's parts, the models it holds (state, bytes, last used, expires at, pinned,
    in flight) and its catalogue; ``?model=`` keeps one model."""
    ctx: ControllerContext = request.app[CONTROLLER]
    only = request.query.get("model")
    workers = []
    for worker in ctx.registry.fleet():
        detail = _worker_models(worker)
        detail["models"] = [m for m in detail["models"] if _allowed(request, m["model"])]
        detail["catalogue"] = [m for m in detail["catalogue"] if _allowed(request, m["name"])]
        if only is not None:
            detail["models"] = [m for m in detail["models"] if m["model"] == only]
            detail["catalogue"] = [m for m in detail["catalogue"] if m["name"] == only]
        workers.append(detail)
    return json_response({"workers": workers})


@routes.get("/api/cluster/placement")
async def placement(request: web.Request) -> web.Response:
    """Where ``?model=`` would load: the worker, the bytes it needs, each worker's free budget and why a worker is
    excluded (``?force=true`` overrides the memory check; ``?worker=`` judges one worker)."""
    ctx: ControllerContext = request.app[CONTROLLER]
    model = request.query.get("model")
    if not model:
        raise bad_request("model: required (the model to place)", "model")
    if not _allowed(request, model):
        raise model_not_found(model)
    force = _flag(request.query.get("force"), "force")
    result = ctx.loader.placement(model, force=force, worker=request.query.get("worker"))
    if not result.candidates and not ctx.registry.has_model(model):
        raise model_not_found(model)
    return json_response(result)


def _flag(value: Any, name: str) -> bool:
    if value is None or value is False:
        return False
    if value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes")):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no"):
        return False
    raise bad_request(f"{name}: expected true or false", name)


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise bad_request(f"Body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("body: expected a JSON object", "body")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"{unknown[0]}: unknown field (expected {', '.join(sorted(allowed))})", unknown[0])
    return body


@routes.post("/api/cluster/models/{model:.+}/load")
async def load_model(request: web.Request) -> web.Response:
    """Load a model now: on ``worker`` or where placement says; ``keep_alive``, ``pin``, ``force`` (past the
    memory check, with a warning). Answers once it serves."""
    ctx: ControllerContext = request.app[CONTROLLER]
    model = request.match_info["model"]
    body = await _body(request, {"worker", "keep_alive", "pin", "force"})
    worker = body.get("worker")
    if worker is not None and not isinstance(worker, str):
        raise bad_request("worker: expected a worker id", "worker")
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    pin = body.get("pin")
    if pin is not None and not isinstance(pin, bool):
        raise bad_request("pin: expected true or false", "pin")
    force = _flag(body.get("force"), "force")
    if not ctx.registry.has_model(model):
        raise model_not_found(model)
    if worker is not None and worker not in ctx.registry:
        raise ApiError(404, f"No worker '{worker}'", param="worker", code="worker_not_found")
    plan = ctx.loader.placement(model, force=force, worker=worker)
    target = plan.worker or plan.roomiest()  # short of memory as last reported: the worker knows what is idle now
    if target is None:
        raise ApiError(409, f"Model '{model}' cannot be loaded: {plan.reason()}", code="no_room")
    command = ModelCommand(action="load", model=model, keep_alive=keep_alive, pin=pin, force=plan.forced or force)
    result = await ctx.loader.command(target, command)
    if not result.ok:
        if plan.worker is None:  # the worker confirms there is no room
            raise ApiError(409, f"Model '{model}' cannot be loaded: {target}: {result.message}", code="no_room")
        message = f"Model '{model}' failed to load on {target}: {result.message}"
        raise ApiError(503, message, type="server_error", code="model_load_failed")
    warning = plan.warning or result.warning
    return json_response(
        {
            "model": model,
            "worker": target,
            "state": _fields(result.state),
            "memory": _fields(result.memory),
            "evicted": next((c.evict for c in plan.candidates if c.worker == target), []),
            "warning": warning or None,
        }
    )


@routes.post("/api/cluster/models/{model:.+}/unload")
async def unload_model(request: web.Request) -> web.Response:
    """Unload a model from ``worker``, or from every worker holding it; answers once its requests ended."""
    ctx: ControllerContext = request.app[CONTROLLER]
    model = request.match_info["model"]
    body = await _body(request, {"worker"})
    worker = body.get("worker")
    if worker is not None and not isinstance(worker, str):
        raise bad_request("worker: expected a worker id", "worker")
    if not ctx.registry.has_model(model):
        raise model_not_found(model)
    holders = [
        w.id
        for w in ctx.registry.fleet()
        if (model in w.models or model in w.states) and (worker is None or w.id == worker)
    ]
    results = []
    for holder in holders:
        result = await ctx.loader.command(holder, ModelCommand(action="unload", model=model))
        results.append({"worker": holder, "ok": result.ok, "message": result.message})
    failed = [r for r in results if not r["ok"]]
    if failed and len(failed) == len(results):
        raise ApiError(409, f"Model '{model}' was not unloaded: {failed[0]['message']}", code="unload_failed")
    return json_response({"model": model, "unloaded": [r["worker"] for r in results if r["ok"]], "results": results})
