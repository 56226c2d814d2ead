"""The controller's HTTP span: one server span per inference request (``POST /v1/...``), in the caller's trace
when the request carries a W3C ``traceparent`` header.

The middleware is in the app only when ``[tracing]`` is on. While the handler runs, its span is in
:data:`~mlxcluster.tracing.REQUEST_SPAN`, where the auth middleware (admission) and the
dispatcher find their parent; the variable is set and reset around the handler's call only, never inside a
generator, so no request sees another's span.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Middleware

from mlxcluster.controller.http.middleware import REQUEST_ID, Handler
from mlxcluster.tracing import REQUEST_SPAN, Span, Tracer

TRACED_PREFIX = "/v1/"


def tracing_middleware(tracer: Tracer) -> Middleware:
    """A server span around each ``POST /v1/...`` request: route, request id, response status."""

    @web.middleware
    async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or not request.path.startswith(TRACED_PREFIX):
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        span = tracer.start(
            f"POST {route}",
            headers=request.headers,
            kind="server",
            attributes={
                "http.request.method": "POST",
                "http.route": route,
                "url.path": request.path,
                "mlxcluster.http_request_id": request.get(REQUEST_ID, ""),
            },
        )
        token = REQUEST_SPAN.set(span)
        try:
            response = await handler(request)
            _status(span, response.status)
            return response
        except web.HTTPException as exc:
            _status(span, exc.status)
            raise
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            span.fail("client disconnected")
            raise
        except BaseException as exc:
            span.fail(type(exc).__name__)
            raise
        finally:
            REQUEST_SPAN.reset(token)
            span.end()

    return traced


def _status(span: Span, status: int) -> None:
    span.set("http.response.status_code", status)
    if status >= 500:
        span.fail(f"HTTP {status}")
