"""The baseline of ``bench cluster``: a bare aiohttp handler that answers what the cluster answers.

``POST /v1/chat/completions`` reads and decodes the JSON body (as any server must) and returns the
OpenAI JSON that the cluster returned for the same short echo request, with a fresh ``id`` and
``created``; nothing else (no middleware, no dispatch, no NATS). It runs in its own process with the
controller's loop (uvloop where installed) and the controller's ``AppRunner`` settings, so the
difference between the two is what the cluster path costs.

``python -m mlxcluster.bench.bare PORT TEMPLATE_JSON`` serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from typing import Any

import msgspec
from aiohttp import web

_encoder = msgspec.json.Encoder()
TEMPLATE = web.AppKey("template", dict[str, Any])


async def chat_completions(request: web.Request) -> web.Response:
    """The template answer, as fresh as the cluster's (id, created)."""
    msgspec.json.decode(await request.read())
    template: dict[str, Any] = request.app[TEMPLATE]
    answer = {**template, "id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
    return web.Response(body=_encoder.encode(answer), content_type="application/json")


def create_bare_app(template: dict[str, Any]) -> web.Application:
    """The bare app: one route, answering ``template``."""
    app = web.Application()
    app[TEMPLATE] = template
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def serve(port: int, template: dict[str, Any]) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_bare_app(template), handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str]) -> None:
    from mlxcluster.roles import fast_loop_factory

    port, template = int(argv[0]), msgspec.json.decode(argv[1])
    with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
        runner.run(serve(port, template))


if __name__ == "__main__":
    main(sys.argv[1:])
