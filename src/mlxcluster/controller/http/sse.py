"""Server-sent events for streamed completions (``data: <json>\\n\\n`` ... ``data: [DONE]``).

Events are buffered (:meth:`SseWriter.put`, :meth:`SseWriter.put_event`) and written by
:meth:`SseWriter.flush`: the stream loop flushes once per frame, however many events it made.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

_encoder = msgspec.json.Encoder()


class SseWriter:
    """Writes SSE events to a prepared streaming response."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self._buffer = bytearray()

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

    def put(self, data: Any) -> None:
        """One ``data:`` event with ``data`` as JSON, sent by the next :meth:`flush`."""
        buffer = self._buffer
        buffer += b"data: "
        _encoder.encode_into(data, buffer, -1)
        buffer += b"\n\n"

    def put_event(self, name: str, data: Any) -> None:
        """One named event (``event: <name>``), as the Responses and Anthropic streams send them."""
        buffer = self._buffer
        buffer += b"event: "
        buffer += name.encode()
        buffer += b"\ndata: "
        _encoder.encode_into(data, buffer, -1)
        buffer += b"\n\n"

    async def flush(self) -> None:
        """Write the events put since the last flush (the buffer is handed over, never reused)."""
        buffer = self._buffer
        if buffer:
            self._buffer = bytearray()
            await self.response.write(buffer)

    async def end(self) -> None:
        """End the stream without OpenAI's ``[DONE]`` sentinel."""
        await self.flush()
        await self.response.write_eof()

    async def done(self) -> None:
        await self.flush()
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
