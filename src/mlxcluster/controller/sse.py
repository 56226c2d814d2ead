"""Server-sent events for streamed completions (``data: <json>\\n\\n`` ... ``data: [DONE]``)."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

_encoder = msgspec.json.Encoder()


class SseWriter:
    """Writes SSE events to a prepared streaming response."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str] | None = None) -> SseWriter:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **(headers or {}),
            },
        )
        await response.prepare(request)
        return cls(response)

    async def send(self, data: Any) -> None:
        """One ``data:`` event with ``data`` as JSON."""
        await self.response.write(b"data: " + _encoder.encode(data) + b"\n\n")

    async def event(self, name: str, data: Any) -> None:
        """One named event (``event: <name>``), as the Responses and Anthropic streams send them."""
        await self.response.write(b"event: " + name.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n")

    async def end(self) -> None:
        """End the stream without OpenAI's ``[DONE]`` sentinel."""
        await self.response.write_eof()

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
