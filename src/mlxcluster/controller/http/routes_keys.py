"""Keys at runtime and usage that survives: the routes over the shared state (JetStream).

``POST /api/cluster/keys`` creates a key (201, its value once in ``key``); ``PATCH /api/cluster/keys/{name}``
changes its limits; ``POST .../revoke`` and ``POST .../rotate`` (a new value once); ``GET /api/cluster/usage``
answers a key's totals per day (per day and model with ``by=model``). Mutations need an admin key (the auth
middleware); a non-admin key reads only its own usage. With ``controller.shared_state`` off these answer 409.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import msgspec
import nats.errors
from aiohttp import web
from msgspec import UNSET, Meta, Struct, UnsetType

from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.controller.http.middleware import API_KEY, admin_required
from mlxcluster.controller.http.openai_schema import parse_body
from mlxcluster.controller.http.responses import json_response
from mlxcluster.controller.shared.keystore import KeyConflict, KeyNotFound
from mlxcluster.controller.shared.records import KeyRecord, utc_day
from mlxcluster.controller.shared.state import SharedState
from mlxcluster.controller.shared.usage import usage_rows

routes = web.RouteTableDef()
T = TypeVar("T")

KeyName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
Limit = Annotated[int, Meta(ge=1, le=1 << 40)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
Time = Annotated[float, Meta(ge=0, le=1e11)]
USAGE_PARAMS = frozenset({"key", "since", "by"})
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class KeyCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``POST /api/cluster/keys``."""

    name: KeyName
    models: list[ModelName] = []
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_concurrent: Limit | None = None
    admin: bool = False
    expires_at: Time | None = None


class KeyChange(Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``PATCH /api/cluster/keys/{name}``: the fields given are set (``null`` removes a limit)."""

    models: list[ModelName] | UnsetType = UNSET
    rpm: Limit | None | UnsetType = UNSET
    tpm: Limit | None | UnsetType = UNSET
    max_concurrent: Limit | None | UnsetType = UNSET
    admin: bool | UnsetType = UNSET
    expires_at: Time | None | UnsetType = UNSET


def record_json(record: KeyRecord) -> dict[str, Any]:
    """A key record as the API shows it: never the value, never its digest."""
    return {
        "name": record.name,
        "models": list(record.models),
        "rpm": record.rpm,
        "tpm": record.tpm,
        "max_concurrent": record.max_concurrent,
        "admin": record.admin,
        "expires_at": record.expires_at,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "revoked": record.revoked,
        "revoked_at": record.revoked_at,
        "source": record.source,
        "generation": record.generation,
    }


def _shared(request: web.Request) -> SharedState:
    ctx: ControllerContext = request.app[CONTROLLER]
    if ctx.shared is None:
        raise ApiError(
            409,
            "Keys at runtime and usage need shared state; this controller runs with controller.shared_state = false",
            code="shared_state_off",
        )
    return ctx.shared


async def _store(work: Awaitable[T]) -> T:
    """Await a JetStream operation; a NATS failure (a bucket's leader being elected after a server was lost)
    answers 503 with ``Retry-After`` instead of a 500."""
    try:
        return await work
    except (nats.errors.Error, TimeoutError) as exc:
        raise ApiError(
            503,
            f"The shared state (NATS JetStream) did not answer: {exc or type(exc).__name__}; try again",
            type="server_error",
            code="shared_state_unavailable",
            retry_after=1.0,
        ) from None


def _refuse(exc: KeyNotFound | KeyConflict) -> ApiError:
    if isinstance(exc, KeyNotFound):
        return ApiError(404, f"No key named '{exc}'", param="name", code="key_not_found")
    return ApiError(409, str(exc), param="name", code="key_conflict")


@routes.post("/api/cluster/keys")
async def create_key(request: web.Request) -> web.Response:
    """Create a key; 201 with its record and, this once, its value in ``key``."""
    shared = _shared(request)
    body: KeyCreate = parse_body(await request.read(), KeyCreate)
    if body.expires_at is not None and body.expires_at <= time.time():
        raise bad_request("expires_at: must be in the future (unix seconds)", "expires_at")
    record = KeyRecord(
        name=body.name,
        sha256="",
        models=sorted(set(body.models)),
        rpm=body.rpm,
        tpm=body.tpm,
        max_concurrent=body.max_concurrent,
        admin=body.admin,
        expires_at=body.expires_at,
    )
    try:
        created, secret, _ = await _store(shared.keys.create(record))
    except KeyConflict as exc:
        raise _refuse(exc) from None
    return json_response({**record_json(created), "key": secret}, status=201)


@routes.patch("/api/cluster/keys/{name}")
async def change_key(request: web.Request) -> web.Response:
    """Set the limits, models, role or expiry given in the body."""
    shared = _shared(request)
    change: KeyChange = parse_body(await request.read(), KeyChange)

    def edit(record: KeyRecord) -> None:
        for field in KeyChange.__struct_fields__:
            value = getattr(change, field)
            if value is not UNSET:
                setattr(record, field, sorted(set(value)) if field == "models" else value)

    try:
        record, _ = await _store(shared.keys.change(request.match_info["name"], edit))
    except (KeyNotFound, KeyConflict) as exc:
        raise _refuse(exc) from None
    return json_response(record_json(record))


@routes.post("/api/cluster/keys/{name}/revoke")
async def revoke_key(request: web.Request) -> web.Response:
    """Refuse the key from now on, on every controller (its record and usage stay)."""
    shared = _shared(request)
    try:
        record = await _store(shared.keys.revoke(request.match_info["name"]))
    except (KeyNotFound, KeyConflict) as exc:
        raise _refuse(exc) from None
    return json_response(record_json(record))


@routes.post("/api/cluster/keys/{name}/rotate")
async def rotate_key(request: web.Request) -> web.Response:
    """Give the key a new value (answered once, in ``key``); the old value is refused from now on."""
    shared = _shared(request)
    try:
        record, secret = await _store(shared.keys.rotate(request.match_info["name"]))
    except (KeyNotFound, KeyConflict) as exc:
        raise _refuse(exc) from None
    return json_response({**record_json(record), "key": secret})


def parse_since(value: str) -> str:
    """``since`` as a UTC day: ``YYYY-MM-DD`` or unix seconds."""
    if _DAY.match(value):
        try:
            time.strptime(value, "%Y-%m-%d")
        except ValueError:
            raise bad_request(f"since: not a date: {value!r}", "since") from None
        return value
    try:
        seconds = float(value)
    except ValueError:
        raise bad_request("since: expected a day YYYY-MM-DD or unix seconds", "since") from None
    if not 0 <= seconds <= 1e11:
        raise bad_request("since: unix seconds out of range", "since")
    return utc_day(seconds)


@routes.get("/api/cluster/usage")
async def key_usage(request: web.Request) -> web.Response:
    """One key's usage from ``since`` (a day or unix seconds; default: all kept), per day or ``by=model``."""
    shared = _shared(request)
    for param in request.query:
        if param not in USAGE_PARAMS:
            raise bad_request(f"Unrecognized query parameter: {param}", param, code="unknown_parameter")
    caller = request.get(API_KEY)
    name = request.query.get("key") or (caller.name if caller is not None else None)
    if name is None:
        raise bad_request("key: required (the name of an API key)", "key", code="missing_required_parameter")
    if caller is not None and not caller.admin and name != caller.name:
        raise admin_required()
    by = request.query.get("by", "day")
    if by not in ("day", "model"):
        raise bad_request("by: expected day or model", "by")
    since = parse_since(request.query["since"]) if "since" in request.query else None
    if shared.keys.ring.get(name) is None:
        raise ApiError(404, f"No key named '{name}'", param="key", code="key_not_found")
    await _store(shared.usage.catch_up())
    total, rows = usage_rows(await _store(shared.usage.days(name, since)), by_model=by == "model")
    body: dict[str, Any] = {"key": name, "since": since, "by": by, **msgspec.structs.asdict(total)}
    body["rows"] = [row.to_json() for row in rows]
    return json_response(body)
