"""The HTTP API through the official ``openai`` client and raw HTTP: chat and text completions (streamed
and not), models, errors in OpenAI's shape, auth, CORS, request ids, health/readiness, the cluster API,
body limits, draining, and a 50-concurrent load test over three echo workers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from cluster_harness import (
    Cluster,
    RunningController,
    single_worker_cluster,
    sse_events,
    wait_until,
    with_sections,
    words,
)
from loopback import free_port

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.controller.controller_role import serve_controller
from mlxcluster.controller.http.openai_schema import MAX_TOKENS_LIMIT
from mlxcluster.embedded import EmbeddedNatsServer

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello brave new world"}]


@pytest.fixture
async def cluster(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    """A controller and one echo worker ``w1``, online."""
    async with single_worker_cluster(cluster_config) as running:
        yield running


@pytest.fixture
def controller(cluster: Cluster) -> RunningController:
    assert cluster.controller is not None
    return cluster.controller


@pytest.fixture
def client(controller: RunningController) -> openai.AsyncOpenAI:
    return controller.client()


async def post(controller: RunningController, path: str, body: Any, **options: Any) -> tuple[int, Any, Any]:
    """POST JSON (or raw bytes) and return (status, parsed JSON body, headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **options.pop("headers", {})}
    async with controller.session().post(controller.url + path, data=data, headers=headers, **options) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def get(controller: RunningController, path: str, **options: Any) -> tuple[int, Any, Any]:
    async with controller.session().get(controller.url + path, **options) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def assert_error_shape(body: Any, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, body
    if param is not None:
        assert error["param"] == param, body
    return error


# --- chat and text completions ----------------------------------------------------------------


async def test_chat_non_stream(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello brave new world"}],
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "echo"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "hello brave new world"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 6  # the echo engine's tokens are words, counted by the worker
    assert completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == 10


async def test_chat_max_tokens_gives_length(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="echo", messages=USER, max_tokens=2)
    assert completion.choices[0].message.content == "hello brave"
    assert completion.choices[0].finish_reason == "length"
    completion = await client.chat.completions.create(model="echo", messages=USER, max_completion_tokens=3)
    assert completion.choices[0].message.content == "hello brave new"


async def test_chat_stop_and_content_parts(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="echo", messages=USER, stop=[" new"])
    assert completion.choices[0].message.content == "hello brave"
    parts = [{"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}]
    completion = await client.chat.completions.create(model="echo", messages=parts)
    assert completion.choices[0].message.content == "two parts"


async def test_chat_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="echo", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == "hello brave new world"
    finishes = [c.choices[0].finish_reason for c in content_chunks]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (4, 4)


async def test_chat_stream_raw_sse_ends_with_done(controller: RunningController) -> None:
    body = {"model": "echo", "messages": USER, "stream": True}
    async with controller.session().post(controller.url + CHAT, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [event async for event in sse_events(resp)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # not asked for
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_completions(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model="echo", prompt="one two three", max_tokens=10)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "one two three"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    short = await client.completions.create(model="echo", prompt="one two three", max_tokens=1)
    assert short.choices[0].text == "one" and short.choices[0].finish_reason == "length"


async def test_completions_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model="echo", prompt="alpha beta gamma", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "alpha beta gamma"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6


async def test_models(client: openai.AsyncOpenAI, cluster: Cluster) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == ["echo"]
    assert page.data[0].object == "model"
    assert page.data[0].owned_by == "mlxcluster"
    assert (await client.models.retrieve("echo")).id == "echo"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")
    await cluster.start_worker("w2", models=["other", "echo"])
    assert cluster.controller is not None
    await cluster.controller.wait_online("w2")
    assert [m.id for m in (await client.models.list()).data] == ["echo", "other"]


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-17", messages=USER)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "gpt-17" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="gpt-17", prompt="x")


# --- bad bodies -------------------------------------------------------------------------------

BAD_BODIES = [
    pytest.param(b"{not json", None, "invalid_json", id="invalid-json"),
    pytest.param(b"", None, "invalid_json", id="empty-body"),
    pytest.param(b"[1, 2]", None, None, id="not-an-object"),
    pytest.param({"messages": USER}, "model", "missing_required_parameter", id="missing-model"),
    pytest.param({"model": "echo"}, "messages", "missing_required_parameter", id="missing-messages"),
    pytest.param({"model": 5, "messages": USER}, "model", None, id="model-not-a-string"),
    pytest.param({"model": "echo", "messages": "hi"}, "messages", None, id="messages-not-a-list"),
    pytest.param({"model": "echo", "messages": []}, "messages", None, id="empty-messages"),
    pytest.param({"model": "echo", "messages": [{"content": "x"}]}, "messages[0].role", None, id="no-role"),
    pytest.param(
        {"model": "echo", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None, id="unknown-role"
    ),
    pytest.param(
        {"model": "echo", "messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        None,
        id="content-not-text",
    ),
    pytest.param(
        {"model": "echo", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0].type",
        None,
        id="image-part",
    ),
    pytest.param({"model": "echo", "messages": USER, "n": 2}, "n", None, id="n-2"),
    pytest.param({"model": "echo", "messages": USER, "max_tokens": -1}, "max_tokens", None, id="negative-max-tokens"),
    pytest.param(
        {"model": "echo", "messages": USER, "max_tokens": MAX_TOKENS_LIMIT + 1},
        "max_tokens",
        None,
        id="huge-max-tokens",
    ),
    pytest.param({"model": "echo", "messages": USER, "max_tokens": "ten"}, "max_tokens", None, id="max-tokens-str"),
    pytest.param(
        {"model": "echo", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", None, id="too-many-stops"
    ),
    pytest.param({"model": "echo", "messages": USER, "stop": 7}, "stop", None, id="stop-not-text"),
    pytest.param({"model": "echo", "messages": USER, "temperature": 3}, "temperature", None, id="temperature"),
    pytest.param({"model": "echo", "messages": USER, "top_p": 0}, "top_p", None, id="top-p"),
    pytest.param({"model": "echo", "messages": USER, "stream": "yes"}, "stream", None, id="stream-not-bool"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_BODIES)
async def test_bad_chat_body_is_400_naming_the_field(
    controller: RunningController, body: Any, param: str | None, code: str | None
) -> None:
    status, data, _ = await post(controller, CHAT, body)
    assert status == 400, data
    error = assert_error_shape(data, code=code, param=param)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert param.split(".")[-1].split("[")[0] in error["message"]


async def test_bad_completion_bodies(controller: RunningController) -> None:
    cases = [
        ({"model": "echo"}, "prompt"),
        ({"model": "echo", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "echo", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "echo", "prompt": "x", "n": 3}, "n"),
    ]
    for body, param in cases:
        status, data, _ = await post(controller, "/v1/completions", body)
        assert status == 400, (body, data)
        assert_error_shape(data, param=param)


async def test_bad_request_is_refused_through_the_openai_client(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="echo", messages=USER, n=2)
    assert caught.value.param == "n"


async def test_openai_fields_are_accepted_and_unknown_fields_refused(controller: RunningController) -> None:
    body = {"model": "echo", "messages": USER, "frequency_penalty": 0.5, "logit_bias": {}, "tools": []}
    status, data, _ = await post(controller, CHAT, body)
    assert status == 200, data
    assert data["choices"][0]["message"]["content"] == "hello brave new world"
    status, data, _ = await post(controller, CHAT, {"model": "echo", "messages": USER, "temprature": 0.5})
    assert status == 400, data
    assert data["error"]["param"] == "temprature"
    assert data["error"]["code"] == "unknown_parameter"


async def test_unknown_path_and_method_are_errors_in_shape(controller: RunningController) -> None:
    status, data, _ = await get(controller, "/v1/nothing-here")
    assert status == 404
    assert_error_shape(data)
    status, data, _ = await get(controller, CHAT)
    assert status == 405
    assert_error_shape(data)


# --- auth, CORS, request ids, limits ----------------------------------------------------------


async def test_api_keys(cluster_config: Config, nats_server: EmbeddedNatsServer) -> None:
    config = with_sections(cluster_config, controller={"api_keys": ["k-one", "k-two"]})
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller()
        for path in ("/v1/models", "/api/cluster/status", "/api/cluster/workers"):
            status, data, _ = await get(controller, path)
            assert status == 401, path
            assert_error_shape(data, code="invalid_api_key")
            status, _, _ = await get(controller, path, headers={"Authorization": "Bearer wrong"})
            assert status == 401
            status, _, _ = await get(controller, path, headers={"Authorization": "Basic k-one"})
            assert status == 401
            status, _, _ = await get(controller, path, headers={"Authorization": "Bearer k-two"})
            assert status == 200, path
        status, data, _ = await post(controller, CHAT, {"model": "echo", "messages": USER})
        assert status == 401
        status, data, _ = await get(controller, "/health")
        assert (status, data["status"], data["state"]) == (200, "ok", "ready")
        assert abs(data["time"] - time.time()) < 60

        with pytest.raises(openai.AuthenticationError) as caught:
            await controller.client(api_key="wrong").models.list()
        assert caught.value.code == "invalid_api_key"
        good = controller.client(api_key="k-one")

        async def online() -> bool:
            return bool((await good.models.list()).data)

        await wait_until(online)
        completion = await good.chat.completions.create(model="echo", messages=USER)
        assert completion.choices[0].message.content == "hello brave new world"


async def test_cors(cluster_config: Config, nats_server: EmbeddedNatsServer) -> None:
    allowed = "https://app.example"
    config = with_sections(cluster_config, controller={"cors": [allowed]})
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller()
        await controller.wait_online("w1")
        session = controller.session()
        preflight = {
            "Origin": allowed,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with session.options(controller.url + CHAT, headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == allowed
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
        async with session.options(
            controller.url + CHAT, headers={**preflight, "Origin": "https://evil.example"}
        ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with session.get(controller.url + "/v1/models", headers={"Origin": allowed}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == allowed
        body = {"model": "echo", "messages": USER, "stream": True}
        async with session.post(controller.url + CHAT, json=body, headers={"Origin": allowed}) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == allowed
            assert [e async for e in sse_events(resp)][-1] == "[DONE]"
        async with session.get(controller.url + "/v1/models", headers={"Origin": "https://evil.example"}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_preflight_is_answered_before_auth(cluster_config: Config, nats_server: EmbeddedNatsServer) -> None:
    config = with_sections(cluster_config, controller={"cors": ["*"], "api_keys": ["k"]})
    async with Cluster(config) as cluster:
        controller = await cluster.start_controller()
        headers = {"Origin": "https://x.example", "Access-Control-Request-Method": "POST"}
        async with controller.session().options(controller.url + CHAT, headers=headers) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://x.example"
        # An error response still carries the CORS header, so a browser can read the 401.
        async with controller.session().get(
            controller.url + "/v1/models", headers={"Origin": "https://x.example"}
        ) as r:
            assert r.status == 401
            assert r.headers.get("Access-Control-Allow-Origin") == "https://x.example"


async def test_request_id_is_echoed(controller: RunningController) -> None:
    status, _, headers = await get(controller, "/health", headers={"x-request-id": "my-id-123"})
    assert headers["x-request-id"] == "my-id-123"
    status, _, headers = await get(controller, "/health")
    generated = headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    status, _, headers = await post(
        controller, CHAT, {"model": "nope", "messages": USER}, headers={"x-request-id": "err-id"}
    )
    assert status == 404 and headers["x-request-id"] == "err-id"
    status, _, headers = await post(controller, CHAT, b"{bad", headers={"x-request-id": "bad-id"})
    assert status == 400 and headers["x-request-id"] == "bad-id"
    body = {"model": "echo", "messages": USER, "stream": True}
    async with controller.session().post(controller.url + CHAT, json=body, headers={"x-request-id": "sse-id"}) as resp:
        assert resp.headers["x-request-id"] == "sse-id"
        await resp.read()
    status, _, headers = await get(controller, "/health", headers={"x-request-id": "x" * 200})
    assert headers["x-request-id"] != "x" * 200  # an absurd id is replaced, not echoed


async def test_body_over_max_body_bytes_is_413(cluster_config: Config, nats_server: EmbeddedNatsServer) -> None:
    config = with_sections(cluster_config, controller={"max_body_bytes": 2048})
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller()
        await controller.wait_online("w1")
        big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 4096}]}
        status, data, _ = await post(controller, CHAT, big)
        assert status == 413
        assert_error_shape(data, code="payload_too_large")
        small = {"model": "echo", "messages": [{"role": "user", "content": "x" * 512}]}
        status, data, _ = await post(controller, CHAT, small)
        assert status == 200, data


# --- health, readiness, cluster API -----------------------------------------------------------


async def test_health_and_ready(cluster_config: Config, nats_server: EmbeddedNatsServer) -> None:
    async with Cluster(cluster_config) as cluster:
        controller = await cluster.start_controller()
        status, data, _ = await get(controller, "/health")
        assert (status, data["status"], data["state"]) == (200, "ok", "ready")
        assert abs(data["time"] - time.time()) < 60
        status, data, _ = await get(controller, "/ready")
        assert status == 503
        assert data["ready"] is False and data["workers_online"] == 0 and data["state"] == "ready"
        await cluster.start_worker("w1")

        async def ready() -> bool:
            return (await get(controller, "/ready"))[0] == 200

        await wait_until(ready)
        status, data, _ = await get(controller, "/ready")
        assert data == {"ready": True, "state": "ready", "workers_online": 1}


async def test_cluster_status(controller: RunningController, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="echo", messages=USER)
    status, data, _ = await get(controller, "/api/cluster/status")
    assert status == 200
    assert data["controller_id"] == controller.ctx.controller_id
    assert data["state"] == "ready"
    assert data["balancer"] == "cache_aware"  # the default strategy
    assert data["workers"]["online"] == 1 and data["workers"]["total"] == 1
    assert data["workers"]["capacity"] == controller.ctx.config.worker.max_concurrent
    assert data["models"] == ["echo"]
    assert data["requests"]["total"] == 1
    assert data["requests"]["in_flight"] == 0
    assert data["requests"]["failed"] == 0
    assert data["nats"]["connected"] is True
    assert data["nats"]["max_payload"] == controller.bus.max_payload
    assert data["nats"]["invalid_messages_total"] == 0
    assert data["nats"]["state"] == "connected" and data["nats"]["reconnects"] == 0
    assert data["uptime_s"] >= 0 and data["version"]
    assert data["mode"] == controller.ctx.config.cluster.mode == "dual"  # the default [cluster] mode
    assert data["requests"]["success_rate"] == 1.0 and data["requests"]["success_rate_window_s"] == 300


async def test_cluster_workers(controller: RunningController, cluster: Cluster) -> None:
    status, data, _ = await get(controller, "/api/cluster/workers?status=online")
    assert status == 200
    [worker] = data["workers"]
    assert worker["id"] == "w1"
    assert worker["status"] == "online"
    assert worker["models"] == ["echo"]
    assert worker["engine"] == "echo"
    assert worker["breaker"] == "closed"
    assert worker["max_concurrent"] == controller.ctx.config.worker.max_concurrent
    assert data["total"] == 1
    assert (await get(controller, "/api/cluster/workers?status=offline"))[1] == {"workers": [], "total": 0}
    assert [w["id"] for w in (await get(controller, "/api/cluster/workers?model=echo"))[1]["workers"]] == ["w1"]
    assert (await get(controller, "/api/cluster/workers?model=zzz"))[1] == {"workers": [], "total": 0}
    status, data, _ = await get(controller, "/api/cluster/workers?status=sleepy")
    assert status == 400
    assert_error_shape(data, param="status")
    status, data, _ = await get(controller, "/api/cluster/workers/w1")
    assert status == 200 and data["id"] == "w1"
    status, data, _ = await get(controller, "/api/cluster/workers/ghost")
    assert status == 404
    assert_error_shape(data, code="worker_not_found")
    assert "ghost" in data["error"]["message"]


async def test_worker_that_leaves_goes_and_its_model_is_unknown(
    controller: RunningController, cluster: Cluster, client: openai.AsyncOpenAI
) -> None:
    await cluster.workers["w1"].stop()  # drains and deregisters
    await wait_until(lambda: not controller.ctx.registry.stats().total)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="echo", messages=USER)
    assert (await get(controller, "/ready"))[0] == 503


async def test_model_known_but_no_worker_available_is_503_with_retry_after(
    controller: RunningController, cluster: Cluster
) -> None:
    service = cluster.workers["w1"].service
    service.status = "draining"  # as during a drain: still registered, takes nothing new
    await service.publish_heartbeat()
    await wait_until(lambda: controller.ctx.registry.stats().draining == 1)
    status, data, headers = await post(controller, CHAT, {"model": "echo", "messages": USER})
    assert status == 503
    assert_error_shape(data, code="no_capacity")
    assert int(headers["Retry-After"]) >= 1
    service.status = "online"


async def test_draining_controller_refuses_new_requests(controller: RunningController) -> None:
    controller.ctx.lifecycle.to("draining")
    status, data, headers = await post(controller, CHAT, {"model": "echo", "messages": USER})
    assert status == 503
    assert_error_shape(data, code="not_ready")
    assert "Retry-After" in headers
    status, data, _ = await get(controller, "/ready")
    assert status == 503 and data["state"] == "draining"
    assert (await get(controller, "/api/cluster/status"))[1]["state"] == "draining"
    assert (await get(controller, "/health"))[0] == 200


async def test_draining_lets_streams_in_flight_finish(cluster_config: Config, nats_server: EmbeddedNatsServer) -> None:
    async with Cluster(cluster_config) as cluster:
        await cluster.start_worker("w-slow", token_delay_ms=20)
        controller = await cluster.start_controller()
        await controller.wait_online("w-slow")
        client = controller.client()
        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": words(20)}], stream=True
        )
        pieces: list[str] = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if len(pieces) == 2:
                    controller.ctx.lifecycle.to("draining")
        assert "".join(pieces) == words(20)
        status, _, _ = await post(controller, CHAT, {"model": "echo", "messages": USER})
        assert status == 503


# --- load -------------------------------------------------------------------------------------


async def test_fifty_concurrent_requests_over_three_workers(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    async with Cluster(cluster_config) as cluster:
        for worker_id in ("wa", "wb", "wc"):
            await cluster.start_worker(worker_id, token_delay_ms=2)
        controller = await cluster.start_controller()
        await controller.wait_online("wa", "wb", "wc")
        client = controller.client(timeout=60.0)

        async def one(i: int) -> bool:
            text = words(8, stem=f"r{i}-")
            if i % 2:
                completion = await client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": text}]
                )
                return completion.choices[0].message.content == text
            stream = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": text}], stream=True
            )
            got = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return got == text

        results = await asyncio.gather(*(one(i) for i in range(50)), return_exceptions=True)
        failures = [r for r in results if r is not True]
        assert not failures, failures[:3]
        served = {worker_id: w.service.requests_total for worker_id, w in cluster.workers.items()}
        assert sum(served.values()) == 50, served
        assert all(count > 0 for count in served.values()), served
        stats = controller.ctx.dispatcher.stats
        assert stats.requests == 50 and stats.failed == 0 and stats.in_flight == 0
        assert controller.served().total() == 50


# --- the controller role's lifetime -----------------------------------------------------------


async def test_serve_controller_drains_in_flight_streams_on_stop(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    port = free_port()
    config = with_sections(cluster_config, controller={"port": port, "drain_timeout_s": 10})
    async with Cluster(config) as cluster:
        await cluster.start_worker("w-slow", token_delay_ms=20)
        controller_bus = await Bus.connect(config.nats, name="test-serve-controller", attempts=5)
        stop = asyncio.Event()
        task = asyncio.create_task(serve_controller(config, controller_bus, stop))
        url = f"http://127.0.0.1:{port}"
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        try:
            async with aiohttp.ClientSession() as session:

                async def ready() -> bool:
                    try:
                        async with session.get(f"{url}/ready") as resp:
                            return resp.status == 200
                    except aiohttp.ClientConnectionError:
                        return False

                async def not_ready() -> bool:
                    async with session.get(f"{url}/ready") as resp:
                        return resp.status == 503

                await wait_until(ready)
                stream = await client.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": words(30)}], stream=True
                )
                pieces: list[str] = []
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.append(chunk.choices[0].delta.content)
                        if len(pieces) == 1:
                            stop.set()  # as on SIGTERM
                            await wait_until(not_ready, what="the controller draining")
                            async with session.post(
                                f"{url}/v1/chat/completions", json={"model": "echo", "messages": USER}
                            ) as resp:
                                assert resp.status == 503  # draining: no new requests
                                assert (await resp.json())["error"]["code"] == "not_ready"
                assert "".join(pieces) == words(30)  # the stream in flight finished
                await asyncio.wait_for(task, 10)
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with session.get(f"{url}/health"):
                        pass
        finally:
            if not task.done():
                task.cancel()
            await client.close()
            await controller_bus.close()
