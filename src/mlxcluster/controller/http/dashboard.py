"""The dashboard: one static page (``static/dashboard.html``, vanilla JS and CSS) served at ``/`` and ``/dashboard``.

The page itself needs no API key; it asks for one and sends it as a Bearer token on every API call, so
the API stays exactly as protected as without it. It loads nothing from other hosts.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

DASHBOARD_PAGE = web.AppKey("dashboard_page", bytes)
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}

routes = web.RouteTableDef()


def load_page() -> bytes:
    """The page as shipped in the package data."""
    return resources.files("mlxcluster.controller.http").joinpath("static", "dashboard.html").read_bytes()


def setup(app: web.Application) -> None:
    """Read the page once and add its routes."""
    app[DASHBOARD_PAGE] = load_page()
    app.add_routes(routes)


@routes.get("/")
@routes.get("/dashboard")
async def dashboard(request: web.Request) -> web.Response:
    """The dashboard page (no auth: it holds no data; the API calls it makes carry the key)."""
    return web.Response(body=request.app[DASHBOARD_PAGE], content_type="text/html", charset="utf-8", headers=HEADERS)
