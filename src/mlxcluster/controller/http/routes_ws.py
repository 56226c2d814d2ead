"""``GET /v1/ws``: chat completions over one WebSocket, several at a time, multiplexed by client id.

Client → server (JSON text messages)::

    {"type": "auth", "api_key": "..."}                 only when the upgrade carried no key
    {"type": "chat", "id": "a", "model": ..., "messages": [...], ...}   the chat-completions body
    {"type": "completion", "id": "b", "model": ..., "prompt": ...}      the text-completions body
    {"type": "cancel", "id": "a"}

Server → client: ``{"type": "token", "id", "text"}`` ..., then ``{"type": "done", "id", "finish_reason",
"usage", "completion_id"}`` or ``{"type": "error", "id", "error": {message, type, param, code}}``. Each
request runs in its own task through ``Dispatcher.stream``; closing the socket cancels them all, which
makes the dispatcher send ``Cancel`` to their workers. A bad message gets an error and the socket stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.controller.http.generation import check_chat_model, check_ready
from mlxcluster.controller.http.middleware import API_KEY, API_KEY_PENDING, model_not_allowed, new_request_id
from mlxcluster.controller.http.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_to_inference,
    completion_to_inference,
    openai_finish_reason,
    parse_body,
)
from mlxcluster.controller.http.render import StreamRenderer, may_call, relay
from mlxcluster.controller.http.routes_openai import chat_logprobs, tool_call_dict, usage_dict
from mlxcluster.controller.metering.keys import CURRENT_KEY, ApiKey
from mlxcluster.protocol import Done, InferenceRequest, Token

log = logging.getLogger(__name__)

routes = web.RouteTableDef()
ENVELOPE_FIELDS = ("type", "id", "api_key")
SOCKETS = web.AppKey("websockets", weakref.WeakSet[web.WebSocketResponse])

MAX_REQUESTS_PER_SOCKET = 64
MAX_ID_LENGTH = 128
AUTH_TIMEOUT_S = 10.0
HEARTBEAT_S = 30.0
CANCEL_WAIT_S = 5.0
CLOSE_UNAUTHORIZED = 4401  # application close code: "the API key was wrong or never sent"


class Envelope(msgspec.Struct):
    """The fields every client message has; the rest is the request body (unknown fields ignored)."""

    type: str
    id: str | None = None
    api_key: str | None = None


_envelope = msgspec.json.Decoder(Envelope)
_encoder = msgspec.json.Encoder()


def setup(app: web.Application) -> None:
    """Add the route and close open sockets when the app shuts down."""
    app[SOCKETS] = weakref.WeakSet()
    app.add_routes(routes)
    app.on_shutdown.append(_close_sockets)


async def _close_sockets(app: web.Application) -> None:
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS]
    for ws in list(sockets):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"controller shutting down")


def error_message(client_id: str | None, exc: ApiError) -> dict[str, Any]:
    return {"type": "error", "id": client_id, **exc.body()}


class SocketStream(StreamRenderer):
    """One request's pieces as socket messages: a ``token`` message per Token frame (its complete tool
    calls in it; pieces of calls are not sent), then ``done`` or ``error``. One message per frame."""

    def __init__(self, ws: web.WebSocketResponse, client_id: str, completion_id: str) -> None:
        self.ws = ws
        self.client_id = client_id
        self.completion_id = completion_id
        self.message: dict[str, Any] | None = None

    def token(self, frame: Token) -> None:
        message: dict[str, Any] = {"type": "token", "id": self.client_id, "text": frame.text}
        if frame.reasoning:
            message["reasoning"] = frame.reasoning
        if frame.tool_calls:
            message["tool_calls"] = [tool_call_dict(call) for call in frame.tool_calls]
        if frame.logprobs:
            message["logprobs"] = chat_logprobs(frame.logprobs)["content"]
        self.message = message

    def done(self, frame: Done, called: bool) -> None:
        self.message = {
            "type": "done",
            "id": self.client_id,
            "finish_reason": openai_finish_reason(frame.finish_reason, called),
            "usage": usage_dict(frame.usage),
            "completion_id": self.completion_id,
        }

    def error(self, exc: ApiError) -> None:
        self.message = error_message(self.client_id, exc)

    async def flush(self) -> None:
        """Send the frame's message; a socket already closing swallows it (as :meth:`Session.send`)."""
        message, self.message = self.message, None
        if message is not None and not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(_encoder.encode(message).decode())


class Session:
    """One socket: its authentication state and its requests in flight, by client id."""

    def __init__(
        self, ctx: ControllerContext, ws: web.WebSocketResponse, *, authenticated: bool, key: ApiKey | None = None
    ) -> None:
        self.ctx = ctx
        self.ws = ws
        self.authenticated = authenticated
        self.key = key
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message; a socket already closing swallows it."""
        if self.ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(_encoder.encode(message).decode())

    async def on_text(self, raw: str) -> None:
        """Handle one client message; any problem becomes an error message for its id."""
        client_id: str | None = None
        try:
            envelope = _envelope.decode(raw)
            client_id = envelope.id
            if not self.authenticated:
                await self._authenticate(envelope)
                return
            match envelope.type:
                case "chat" | "completion":
                    await self._start(envelope, raw)
                case "cancel":
                    self._cancel(envelope)
                case "auth":
                    await self.send({"type": "auth", "ok": True})
                case other:
                    raise bad_request(
                        f"Unknown message type '{other}'; expected chat, completion, cancel or auth", "type"
                    )
        except ApiError as exc:
            await self.send(error_message(client_id, exc))
        except msgspec.ValidationError as exc:
            await self.send(error_message(client_id, bad_request(f"Invalid message: {exc}", code="invalid_message")))
        except msgspec.DecodeError as exc:
            await self.send(error_message(None, bad_request(f"Message is not valid JSON: {exc}", code="invalid_json")))
        except RecursionError:
            await self.send(error_message(None, bad_request("Message is nested too deeply", code="invalid_json")))
        except Exception:  # a bug must not take the socket, and the other requests on it, down
            log.exception("websocket message handling failed")
            internal = ApiError(500, "Internal server error", type="server_error", code="internal_error")
            await self.send(error_message(client_id, internal))

    async def _authenticate(self, envelope: Envelope) -> None:
        key = self.ctx.ops.keys.lookup(envelope.api_key) if envelope.api_key is not None else None
        if envelope.type == "auth" and key is not None:
            self.authenticated, self.key = True, key
            await self.send({"type": "auth", "ok": True})
            return
        await self.send(error_message(envelope.id, unauthorized()))
        await self.ws.close(code=CLOSE_UNAUTHORIZED, message=b"invalid or missing API key")

    async def _start(self, envelope: Envelope, raw: str) -> None:
        client_id = envelope.id
        if not client_id or len(client_id) > MAX_ID_LENGTH:
            raise bad_request(f"'id' must be a string of 1 to {MAX_ID_LENGTH} characters", "id", code="invalid_id")
        if client_id in self.tasks:
            raise bad_request(f"A request with id '{client_id}' is still running", "id", code="duplicate_id")
        if len(self.tasks) >= MAX_REQUESTS_PER_SOCKET:
            raise ApiError(
                429, f"At most {MAX_REQUESTS_PER_SOCKET} requests may run on one socket", code="too_many_requests"
            )
        check_ready(self.ctx)
        inference = self._inference(envelope.type, raw.encode())
        check_chat_model(self.ctx, inference.model)
        key = self.key
        reserve = 0 if inference.max_tokens_auto else inference.max_tokens  # no limit given: none reserved (as HTTP)
        if key is not None:  # the same model list and rate limits as over HTTP
            if not key.allows_model(inference.model):
                raise model_not_allowed(key.name, inference.model)
            try:
                await self.ctx.ops.limiter.admit_async(key, reserve=reserve)
            except ApiError:
                self.ctx.ops.keys.record_rate_limited(key.name)
                raise
        token = CURRENT_KEY.set(key.name if key is not None else None)
        try:  # the task copies the context: its request meter sees the key
            task = asyncio.create_task(self._run(client_id, inference), name=f"ws-{inference.request_id}")
        finally:
            CURRENT_KEY.reset(token)
        self.tasks[client_id] = task

        def finished(_task: asyncio.Task[None]) -> None:
            self.tasks.pop(client_id, None)
            if key is not None:
                self.ctx.ops.limiter.release(key, reserve=reserve)

        task.add_done_callback(finished)

    def _inference(self, kind: str, raw: bytes) -> InferenceRequest:
        deadline = time.time() + self.ctx.config.controller.request_timeout_s
        body = msgspec.json.decode(raw)
        for envelope_field in ENVELOPE_FIELDS:  # the body proper is refused with unknown fields
            body.pop(envelope_field, None)
        raw = msgspec.json.encode(body)
        if kind == "chat":
            chat: ChatCompletionRequest = parse_body(raw, ChatCompletionRequest)
            cap = self.ctx.config.controller.default_max_tokens
            return chat_to_inference(chat, f"chatcmpl-{new_request_id()}", deadline, cap)
        text: CompletionRequest = parse_body(raw, CompletionRequest)
        return completion_to_inference(text, f"cmpl-{new_request_id()}", deadline)

    def _cancel(self, envelope: Envelope) -> None:
        task = self.tasks.get(envelope.id or "")
        if task is None:
            raise bad_request(f"No request with id '{envelope.id}' is running", "id", code="unknown_id")
        task.cancel()

    async def _run(self, client_id: str, inference: InferenceRequest) -> None:
        """Relay one request's frames as messages."""
        try:
            stream = self.ctx.dispatcher.stream(inference, disconnected=lambda: self.ws.closed)
            async with contextlib.aclosing(stream) as frames:
                messages = SocketStream(self.ws, client_id, inference.request_id)
                await relay(frames, messages, messages.flush, tools=may_call(inference))
        except asyncio.CancelledError:
            await self.send({"type": "done", "id": client_id, "finish_reason": "cancelled", "usage": None})
            raise
        except Exception:
            log.exception("websocket request %s failed", inference.request_id)
            internal = ApiError(500, "Internal server error", type="server_error", code="internal_error")
            await self.send(error_message(client_id, internal))

    async def close(self) -> None:
        """Cancel every request still running (the dispatcher tells their workers) and wait a little."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "Invalid or missing API key (send 'Authorization: Bearer <key>', '?api_key=<key>' "
        'or a first message {"type": "auth", "api_key": "<key>"})',
        code="invalid_api_key",
    )


@routes.get("/v1/ws")
async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Upgrade and serve JSON messages until the client closes the socket."""
    ctx: ControllerContext = request.app[CONTROLLER]
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=ctx.config.controller.max_body_bytes)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "/v1/ws is a WebSocket endpoint; connect with a WebSocket client", code="not_websocket")
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    session = Session(ctx, ws, authenticated=not request.get(API_KEY_PENDING, False), key=request.get(API_KEY))
    try:
        while not ws.closed:
            timeout = None if session.authenticated else AUTH_TIMEOUT_S
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                await session.send(error_message(None, unauthorized()))
                await ws.close(code=CLOSE_UNAUTHORIZED, message=b"no auth message in time")
                break
            if msg.type == WSMsgType.TEXT:
                await session.on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await session.send(error_message(None, bad_request("Send JSON text messages", code="invalid_message")))
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                break
    finally:
        await session.close()
    return ws
