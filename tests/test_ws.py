"""``GET /v1/ws`` on the real nats-server with echo workers: several requests multiplexed by id on one
socket, cancel by message and by closing the socket (the worker gets ``Cancel`` and stops), bad messages
that leave the socket open, and the three ways to present an API key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cluster_harness import (
    Cluster,
    RunningController,
    RunningWorker,
    barrier,
    single_worker_cluster,
    wait_until,
    with_sections,
    words,
)
from nats.aio.msg import Msg

from mlxcluster.bus import Bus
from mlxcluster.config import ApiKeyEntry, Config
from mlxcluster.controller.http.routes_ws import CLOSE_UNAUTHORIZED
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import Cancel

KEY = "sk-test-ws"
TIMEOUT_S = 10.0


@pytest.fixture
async def cluster(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    """A controller and one echo worker ``w1`` that waits 20 ms per token."""
    async with single_worker_cluster(cluster_config, token_delay_ms=20) as running:
        yield running


@pytest.fixture
def controller(cluster: Cluster) -> RunningController:
    assert cluster.controller is not None
    return cluster.controller


@pytest.fixture
def worker(cluster: Cluster) -> RunningWorker:
    return cluster.workers["w1"]


def ws_url(controller: RunningController, query: str = "") -> str:
    return controller.url.replace("http://", "ws://") + "/v1/ws" + query


def chat(client_id: str, text: str, **fields: Any) -> dict[str, Any]:
    return {"type": "chat", "id": client_id, "model": "echo", "messages": [{"role": "user", "content": text}], **fields}


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    return await ws.receive_json(timeout=TIMEOUT_S)


async def until_finished(ws: aiohttp.ClientWebSocketResponse, *ids: str) -> list[dict[str, Any]]:
    """Messages until every id in ``ids`` got its done or error."""
    messages: list[dict[str, Any]] = []
    pending = set(ids)
    while pending:
        message = await receive(ws)
        messages.append(message)
        if message["type"] in ("done", "error"):
            pending.discard(message["id"])
    return messages


def text_of(messages: list[dict[str, Any]], client_id: str) -> str:
    return "".join(m["text"] for m in messages if m["type"] == "token" and m["id"] == client_id)


async def test_two_requests_multiplexed_on_one_socket(controller: RunningController) -> None:
    async with controller.session().ws_connect(ws_url(controller)) as ws:
        await ws.send_json(chat("a", words(12, "a")))
        await ws.send_json(chat("b", words(12, "b"), max_tokens=5))
        messages = await until_finished(ws, "a", "b")
    assert text_of(messages, "a") == words(12, "a")
    assert text_of(messages, "b") == words(5, "b")
    done = {m["id"]: m for m in messages if m["type"] == "done"}
    assert done["a"]["finish_reason"] == "stop" and done["b"]["finish_reason"] == "length"
    assert done["a"]["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 12,
        "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert done["a"]["completion_id"].startswith("chatcmpl-")
    order = [m["id"] for m in messages if m["type"] == "token"]
    assert order.index("b") < len(order) - order[::-1].index("a") - 1, "the two streams should interleave"


async def test_text_completion_and_explicit_cancel(controller: RunningController, worker: RunningWorker) -> None:
    async with controller.session().ws_connect(ws_url(controller)) as ws:
        await ws.send_json({"type": "completion", "id": "t", "model": "echo", "prompt": "one two three"})
        assert text_of(await until_finished(ws, "t"), "t") == "one two three"
        await ws.send_json(chat("long", words(500)))
        first = await receive(ws)
        assert first["type"] == "token"
        await ws.send_json({"type": "cancel", "id": "long"})
        messages = await until_finished(ws, "long")
        assert messages[-1] == {"type": "done", "id": "long", "finish_reason": "cancelled", "usage": None}
        await wait_until(lambda: not worker.service.in_flight, timeout=3, what="the worker to stop generating")
        await ws.send_json({"type": "cancel", "id": "long"})
        error = await receive(ws)
        assert error["type"] == "error" and error["error"]["code"] == "unknown_id"


async def test_closing_the_socket_cancels_its_requests(
    controller: RunningController, worker: RunningWorker, bus: Bus
) -> None:
    cancels: list[Cancel] = []

    async def on_cancel(cancel: Cancel, _msg: Msg) -> None:
        cancels.append(cancel)

    await bus.subscribe(bus.subjects.cancel("w1"), Cancel, on_cancel)
    await barrier(bus)
    ws = await controller.session().ws_connect(ws_url(controller))
    await ws.send_json(chat("x", words(400, "x")))
    await ws.send_json(chat("y", words(400, "y")))
    seen: set[str] = set()
    while seen != {"x", "y"}:
        message = await receive(ws)
        assert message["type"] == "token", message
        seen.add(message["id"])
    assert len(worker.service.in_flight) == 2
    await ws.close()
    await wait_until(lambda: not worker.service.in_flight, timeout=3, what="the worker to stop both requests")
    await wait_until(lambda: len(cancels) == 2, timeout=3, what="two Cancel messages")
    assert all(c.request_id.startswith("chatcmpl-") for c in cancels)
    assert worker.service.tokens_total < 800
    ctx = controller.ctx
    await wait_until(lambda: ctx.dispatcher.stats.in_flight == 0 and ctx.dispatcher.inbox.open_count == 0)


async def test_bad_messages_get_errors_and_the_socket_stays_open(controller: RunningController) -> None:
    async with controller.session().ws_connect(ws_url(controller)) as ws:
        await ws.send_str("{not json")
        error = await receive(ws)
        assert error["type"] == "error" and error["id"] is None
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["code"] == "invalid_json"

        await ws.send_json({"type": "shout", "id": "s"})
        error = await receive(ws)
        assert error["id"] == "s" and error["error"]["param"] == "type"

        await ws.send_json({"type": "chat", "id": "m", "model": "echo"})
        error = await receive(ws)
        assert error["id"] == "m"
        assert error["error"]["code"] == "missing_required_parameter" and error["error"]["param"] == "messages"

        await ws.send_json(chat("r", "hi", temperature=9))
        error = await receive(ws)
        assert error["id"] == "r" and error["error"]["param"] == "temperature"

        await ws.send_json(chat("nomodel", "hi", model="no-such-model"))
        error = await receive(ws)
        assert error["id"] == "nomodel" and error["error"]["code"] == "model_not_found"

        await ws.send_json(chat("", "hi"))
        error = await receive(ws)
        assert error["error"]["code"] == "invalid_id"

        await ws.send_bytes(b"\x00binary")
        error = await receive(ws)
        assert error["error"]["code"] == "invalid_message"

        await ws.send_json(chat("dup", words(200)))
        await ws.send_json(chat("dup", "again"))
        messages = await until_finished(ws, "dup")
        duplicate = [m for m in messages if m["type"] == "error"]
        assert duplicate and duplicate[0]["error"]["code"] == "duplicate_id", messages
        assert await until_finished(ws, "dup")  # the first "dup" still runs to its end
        await ws.send_json(chat("ok", "still open"))
        assert text_of(await until_finished(ws, "ok"), "ok") == "still open"


async def test_plain_http_get_is_a_400(controller: RunningController) -> None:
    async with controller.session().get(controller.url + "/v1/ws") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "not_websocket"


@pytest.fixture
async def keyed(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[RunningController]:
    """A controller that requires the API key ``KEY``, with one echo worker."""
    config = with_sections(cluster_config, controller={"api_keys": [KEY]})
    async with Cluster(config) as running:
        await running.start_worker("w1")
        controller = await running.start_controller()
        await wait_until(lambda: controller.ctx.registry.stats().online == 1, what="w1 online")  # no key here
        yield controller


async def echo_works(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_json(chat("k", "authorized"))
    assert text_of(await until_finished(ws, "k"), "k") == "authorized"


async def test_api_key_in_the_query(keyed: RunningController) -> None:
    async with keyed.session().ws_connect(ws_url(keyed, f"?api_key={KEY}")) as ws:
        await echo_works(ws)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await keyed.session().ws_connect(ws_url(keyed, "?api_key=wrong"))
    assert caught.value.status == 401


async def test_api_key_in_the_header(keyed: RunningController) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with keyed.session().ws_connect(ws_url(keyed), headers=headers) as ws:
        await echo_works(ws)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await keyed.session().ws_connect(ws_url(keyed), headers={"Authorization": "Bearer wrong"})
    assert caught.value.status == 401


async def test_api_key_in_a_first_auth_message(keyed: RunningController) -> None:
    async with keyed.session().ws_connect(ws_url(keyed)) as ws:
        await ws.send_json({"type": "auth", "api_key": KEY})
        assert await receive(ws) == {"type": "auth", "ok": True}
        await echo_works(ws)


async def test_no_key_closes_the_socket(keyed: RunningController) -> None:
    async with keyed.session().ws_connect(ws_url(keyed)) as ws:
        await ws.send_json(chat("early", "no key yet"))
        error = await receive(ws)
        assert error["id"] == "early" and error["error"]["code"] == "invalid_api_key"
        closing = await ws.receive(timeout=TIMEOUT_S)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert closing.data == CLOSE_UNAUTHORIZED
    async with keyed.session().ws_connect(ws_url(keyed)) as ws:
        await ws.send_json({"type": "auth", "api_key": "wrong"})
        assert (await receive(ws))["error"]["code"] == "invalid_api_key"
        await asyncio.wait_for(ws.receive(), TIMEOUT_S)
        assert ws.closed


async def test_a_request_without_max_tokens_reserves_nothing_against_tpm(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    """As over HTTP: with no max_tokens the worker gives the context's room (at most the controller's cap), which
    is no reservation; a max_tokens given is reserved while the request runs."""
    config = with_sections(cluster_config, controller={"keys": [ApiKeyEntry(name="budget", key=KEY, tpm=1000)]})
    async with Cluster(config) as running:
        await running.start_worker("w1", token_delay_ms=20)
        controller = await running.start_controller()
        await wait_until(lambda: controller.ctx.registry.stats().online == 1, what="w1 online")
        key = controller.ctx.ops.keys.get("budget")
        assert key is not None
        limiter = controller.ctx.ops.limiter
        async with controller.session().ws_connect(ws_url(controller, f"?api_key={KEY}")) as ws:
            for client_id, fields, reserved in (("auto", {}, 0), ("given", {"max_tokens": 60}, 60)):
                await ws.send_json(chat(client_id, words(40), **fields))  # 40 tokens, 20 ms each
                assert (await receive(ws))["type"] == "token"
                assert limiter.running(key) == 1 and limiter.snapshot(key)["tokens_reserved"] == reserved
                await until_finished(ws, client_id)
