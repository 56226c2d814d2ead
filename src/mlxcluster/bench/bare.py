"""The baselines of ``bench cluster``: a bare aiohttp handler that answers what the cluster answers, and the
same handler making one NATS round trip per request.

``POST /v1/chat/completions`` reads and decodes the JSON body (as any server must) and returns the
OpenAI JSON that the cluster returned for the same short echo request, with a fresh ``id`` and
``created``; nothing else (no middleware, no dispatch, no NATS). It runs in its own process with the
controller's loop (uvloop where installed) and the controller's ``AppRunner`` settings, so the
difference between the two is what the cluster path costs.

Given a NATS URL, the handler first sends the body as one nats-py request to :data:`FLOOR_SUBJECT` and waits
for the reply of a bare responder in another process (``respond``), which answers at once with the three
frames of a short echo answer in one message. That is the part of the cluster path no controller built on
aiohttp and nats-py can avoid (HTTP in, one request/reply through nats-server, HTTP out), with none of the
cluster's code: the ceiling of what our code could reach on the machine measured.

``python -m mlxcluster.bench.bare PORT TEMPLATE_JSON [NATS_URL]`` serves until SIGTERM;
``python -m mlxcluster.bench.bare respond NATS_URL`` answers on :data:`FLOOR_SUBJECT` until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from typing import Any

import msgspec
import nats
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mlxcluster.protocol import Accepted, Done, Token, encode, encode_frames

FLOOR_SUBJECT = "mlxcluster-bench.floor"
FLOOR_REPLY = encode_frames([encode(Accepted(worker_id="bare")), encode(Token(text="ping")), encode(Done(seq=1))])
"""What the bare responder answers: a short echo answer's frames, as one message."""

_encoder = msgspec.json.Encoder()
TEMPLATE = web.AppKey("template", dict[str, Any])
NATS_CONNECTION = web.AppKey("nats", NATS)


async def chat_completions(request: web.Request) -> web.Response:
    """The template answer, as fresh as the cluster's (id, created)."""
    body = await request.read()
    msgspec.json.decode(body)
    nc = request.app.get(NATS_CONNECTION)
    if nc is not None:
        await nc.request(FLOOR_SUBJECT, body, timeout=10)
    template: dict[str, Any] = request.app[TEMPLATE]
    answer = {**template, "id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time())}
    return web.Response(body=_encoder.encode(answer), content_type="application/json")


def create_bare_app(template: dict[str, Any], nc: NATS | None = None) -> web.Application:
    """The bare app: one route, answering ``template`` (after a NATS round trip on ``nc``, if given)."""
    app = web.Application()
    app[TEMPLATE] = template
    if nc is not None:
        app[NATS_CONNECTION] = nc
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(port: int, template: dict[str, Any], nats_url: str | None = None) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM/SIGINT."""
    nc = await nats.connect(nats_url) if nats_url else None
    runner = web.AppRunner(
        create_bare_app(template, nc), handler_cancellation=True, access_log=None, shutdown_timeout=5
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await _until_signalled()
    finally:
        await runner.cleanup()
        if nc is not None:
            await nc.close()


async def respond(nats_url: str) -> None:
    """Answer every request on :data:`FLOOR_SUBJECT` with :data:`FLOOR_REPLY` until SIGTERM/SIGINT."""
    nc = await nats.connect(nats_url)

    async def answer(msg: Msg) -> None:
        await nc.publish(msg.reply, FLOOR_REPLY)

    await nc.subscribe(FLOOR_SUBJECT, cb=answer)
    await nc.flush()
    try:
        await _until_signalled()
    finally:
        await nc.close()


def main(argv: list[str]) -> None:
    from mlxcluster.roles import fast_loop_factory

    with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
        if argv[0] == "respond":
            runner.run(respond(argv[1]))
        else:
            port, template = int(argv[0]), msgspec.json.decode(argv[1])
            runner.run(serve(port, template, argv[2] if len(argv) > 2 else None))


if __name__ == "__main__":
    main(sys.argv[1:])
