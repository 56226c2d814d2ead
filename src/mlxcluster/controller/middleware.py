"""aiohttp middlewares: request id, OpenAI-shaped errors, API-key auth, CORS."""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from mlxcluster.controller.errors import ApiError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROTECTED_PREFIXES = ("/v1/", "/api/")
REQUEST_ID = web.RequestKey("request_id", str)
CORS_ORIGIN = web.RequestKey("cors_origin", str)
WEBSOCKET_PATH = "/v1/ws"
API_KEY_PENDING = web.RequestKey("api_key_pending", bool)
"""Set on a WebSocket upgrade that carried no key: the handler must get a ``{"type": "auth"}`` message first."""


def api_key_matches(keys: list[bytes], given: str) -> bool:
    """Whether ``given`` is one of ``keys`` (constant-time per key)."""
    token = given.strip().encode()
    return any(hmac.compare_digest(token, key) for key in keys)


def stream_headers(request: web.Request) -> dict[str, str]:
    """Headers a handler must set itself on a response it prepares (SSE): request id and CORS."""
    headers = {"x-request-id": request.get(REQUEST_ID, "")}
    if origin := request.get(CORS_ORIGIN):
        headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})
    return headers


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take ``x-request-id`` from the client (if sane) or make one; echo it on the response."""
    given = request.headers.get("x-request-id", "")
    request_id = given if 0 < len(given) <= 128 and given.isascii() and given.isprintable() else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["x-request-id"] = request_id
        raise
    if not response.prepared:
        response.headers["x-request-id"] = request_id
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render :class:`ApiError` and aiohttp's HTTP errors in OpenAI's error shape; never leak a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        response = exc.response()
    except web.HTTPRequestEntityTooLarge as exc:
        response = ApiError(413, f"Request body too large: {exc.text}", code="payload_too_large").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        response = ApiError(exc.status, exc.reason, type=kind, code=str(exc.status)).response()
    except web.RequestPayloadError as exc:  # the body cannot be read: bad Content-Encoding, broken chunking
        cause = exc.__cause__ or exc
        message = getattr(cause, "message", None) or "malformed body"
        response = ApiError(400, f"Request body could not be read: {message}", code="invalid_body").response()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = ApiError(500, "Internal server error", type="server_error", code="internal_error").response()
    response.headers["x-request-id"] = request.get(REQUEST_ID, "")
    return response


def auth_middleware(api_keys: list[str]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Require ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``) on /v1 and /api when keys are configured.

    Browsers cannot set headers on a WebSocket, so ``/v1/ws`` also takes ``?api_key=<key>``, and an upgrade
    with no key at all is let through marked :data:`API_KEY_PENDING` (its first message must authenticate).
    """
    keys = [key.encode() for key in api_keys]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys and request.method != "OPTIONS" and request.path.startswith(PROTECTED_PREFIXES):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if not header and "x-api-key" in request.headers:  # Anthropic's clients send the key this way
                header, scheme, token = "x-api-key", "bearer", request.headers["x-api-key"]
            if request.path == WEBSOCKET_PATH and not header:
                if "api_key" not in request.query:
                    request[API_KEY_PENDING] = True
                    return await handler(request)
                scheme, token = "bearer", request.query["api_key"]
            if scheme.lower() != "bearer" or not api_key_matches(keys, token):
                raise ApiError(
                    401,
                    "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                    type="invalid_request_error",
                    code="invalid_api_key",
                )
        return await handler(request)

    return check


def cors_middleware(origins: list[str]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Answer preflights and add CORS headers for the configured origins (``*`` allows any)."""
    allowed = set(origins)

    def allow_origin(request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        return origin if ("*" in allowed or origin in allowed) else None

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = allow_origin(request)
        if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-Id",
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )
        if origin:
            request[CORS_ORIGIN] = origin
        response = await handler(request)
        if origin and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    return cors
