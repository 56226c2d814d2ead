"""JSON responses encoded with msgspec (several times faster than ``json.dumps``)."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

_encoder = msgspec.json.Encoder()


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Like ``web.json_response`` but encodes with msgspec (Structs welcome)."""
    return web.Response(body=_encoder.encode(data), status=status, headers=headers, content_type="application/json")
