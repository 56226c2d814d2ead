"""API keys as records: roles, allowed models, rate limits (429 with OpenAI's headers), usage per key in
``/api/cluster/keys`` and in Prometheus, and key values that appear in no response, log line or config dump.

A real controller app, an echo worker and the real ``openai`` client over the real nats-server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from cluster_harness import Cluster, RunningController, wait_until, with_sections
from loopback import free_port
from prometheus_client.parser import text_string_to_metric_families

from mlxcluster.config import Config, ConfigError, from_dict, to_dict
from mlxcluster.controller.metering.keys import KeyRing
from mlxcluster.controller.metering.ratelimit import format_reset
from mlxcluster.embedded import EmbeddedNatsServer

ADMIN = "sk-admin-3f9a1c77"
USER = "sk-user-58d2e0aa"
LIMITED = "sk-limited-c0ffee11"
TOKENS = "sk-tokens-1234abcd"
SLOW = "sk-slow-9911beef"
HASHED = "sk-hashed-77aa55cc"
ENV_KEY = "sk-from-env-0d0d0d0d"
BUDGET = "sk-budget-4242abab"
ALL_VALUES = (ADMIN, USER, LIMITED, TOKENS, SLOW, HASHED, ENV_KEY, BUDGET)
HELLO = [{"role": "user", "content": "hello brave new world"}]  # echo: 4 completion tokens
CHAT = "/v1/chat/completions"


def key_entries() -> list[dict[str, Any]]:
    return [
        {"name": "ops", "key": ADMIN, "admin": True},
        {"name": "alice", "key": USER, "models": ["echo"]},
        {"name": "limited", "key": LIMITED, "rpm": 2},
        {"name": "tokens", "key": TOKENS, "tpm": 8},
        {"name": "slow", "key": SLOW, "max_concurrent": 1},
        {"name": "hashed", "key_sha256": hashlib.sha256(HASHED.encode()).hexdigest()},
        {"name": "env", "key_env": "OPS_TEST_KEY"},
        {"name": "budget", "key": BUDGET, "tpm": 100},
    ]


@pytest.fixture
async def keyed(
    cluster_config: Config, nats_server: EmbeddedNatsServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RunningController]:
    monkeypatch.setenv("OPS_TEST_KEY", ENV_KEY)
    config = with_sections(
        cluster_config,
        controller={"keys": from_dict({"controller": {"keys": key_entries()}}).controller.keys},
        metrics={"exporters": ["prometheus"], "snapshot_interval_s": 0.1},
    )
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1")
        await cluster.start_worker("slowpoke", models=["slow"], token_delay_ms=200)
        controller = await cluster.start_controller()
        await wait_until(lambda: controller.ctx.registry.stats().online >= 2, what="two workers online")
        yield controller


async def call(
    controller: RunningController, method: str, path: str, key: str | None, body: Any = None
) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = json.dumps(body).encode() if body is not None else None
    async with controller.session().request(method, controller.url + path, data=data, headers=headers) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None, resp.headers


async def test_every_kind_of_key_authenticates(keyed: RunningController) -> None:
    for key in (ADMIN, USER, HASHED, ENV_KEY):
        completion = await keyed.client(api_key=key).chat.completions.create(model="echo", messages=HELLO)
        assert completion.choices[0].message.content == "hello brave new world"
    with pytest.raises(openai.AuthenticationError):
        await keyed.client(api_key=hashlib.sha256(HASHED.encode()).hexdigest()).models.list()  # the hash is no key
    async with keyed.session().get(keyed.url + "/v1/models", headers={"x-api-key": USER}) as resp:
        assert resp.status == 200  # the header Anthropic's clients use
    async with keyed.session().get(keyed.url + "/v1/models", headers={"x-api-key": "sk-nope"}) as resp:
        assert resp.status == 401


async def test_only_admin_keys_reach_mutating_cluster_api_and_keys(keyed: RunningController) -> None:
    status, body, _ = await call(keyed, "POST", "/api/cluster/workers/w1/drain", USER)
    assert (status, body["error"]["code"]) == (403, "admin_required")
    status, body, _ = await call(keyed, "GET", "/api/cluster/keys", USER)
    assert (status, body["error"]["code"]) == (403, "admin_required")
    status, _, _ = await call(keyed, "GET", "/api/cluster/workers", USER)
    assert status == 200  # reading the cluster needs any key
    status, body, _ = await call(keyed, "POST", "/api/cluster/workers/w1/drain", ADMIN)
    assert (status, body["status"]) == (200, "draining")
    status, body, _ = await call(keyed, "POST", "/api/cluster/workers/w1/resume", ADMIN)
    assert (status, body["status"]) == (200, "online")


async def test_a_key_uses_only_its_models(keyed: RunningController) -> None:
    alice = keyed.client(api_key=USER)
    assert [m.id for m in (await alice.models.list()).data] == ["echo"]  # "slow" is served, but not for alice
    assert {m.id for m in (await keyed.client(api_key=ADMIN).models.list()).data} == {"echo", "slow"}
    with pytest.raises(openai.NotFoundError):
        await alice.models.retrieve("slow")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await alice.chat.completions.create(model="slow", messages=HELLO)
    assert caught.value.code == "model_not_allowed"
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert (await alice.chat.completions.create(model="echo", messages=HELLO)).choices


async def test_rpm_limit_answers_429_with_openai_headers(keyed: RunningController) -> None:
    client = keyed.client(api_key=LIMITED)
    first = await client.chat.completions.with_raw_response.create(model="echo", messages=HELLO)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    second = await client.chat.completions.with_raw_response.create(model="echo", messages=HELLO, stream=True)
    assert second.headers["x-ratelimit-remaining-requests"] == "0"  # on a stream (SSE) too
    async for _ in second.parse():
        pass
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="echo", messages=HELLO)
    response = caught.value.response
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.body["type"] == "requests"  # type: ignore[index]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    # another key is not affected
    assert (await keyed.client(api_key=USER).chat.completions.create(model="echo", messages=HELLO)).choices


async def test_tpm_limit_counts_prompt_and_completion_tokens(keyed: RunningController) -> None:
    client = keyed.client(api_key=TOKENS)
    first = await client.chat.completions.with_raw_response.create(model="echo", messages=HELLO)
    assert first.headers["x-ratelimit-limit-tokens"] == "8"
    assert first.headers["x-ratelimit-remaining-tokens"] == "8"
    usage = first.parse().usage
    assert usage is not None and usage.total_tokens == 8  # 4 prompt words + 4 echoed: the window is full

    async def refused() -> bool:
        try:
            await client.chat.completions.create(model="echo", messages=HELLO)
        except openai.RateLimitError as exc:
            return exc.body["type"] == "tokens"  # type: ignore[index]
        return False

    assert await refused()
    status, body, headers = await call(keyed, "POST", CHAT, TOKENS, {"model": "echo", "messages": HELLO})
    assert status == 429 and headers["x-ratelimit-remaining-tokens"] == "0"
    assert "tokens per min" in body["error"]["message"]


async def test_max_concurrent_refuses_a_second_request_while_one_runs(keyed: RunningController) -> None:
    client = keyed.client(api_key=SLOW)
    stream = await client.chat.completions.create(model="slow", messages=HELLO, stream=True)
    chunks = aiter(stream)
    await anext(chunks)  # the first request runs
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="slow", messages=HELLO)
    assert "max_concurrent" in caught.value.message
    async for _ in chunks:
        pass
    await wait_until(lambda: keyed.ctx.ops.limiter.running(keyed.ctx.ops.keys.get("slow")) == 0)  # type: ignore[arg-type]
    assert (await client.chat.completions.create(model="slow", messages=HELLO)).choices


async def test_usage_per_key_in_the_keys_api_and_prometheus(keyed: RunningController) -> None:
    alice = keyed.client(api_key=USER)
    for _ in range(3):
        await alice.chat.completions.create(model="echo", messages=HELLO)
    limited = keyed.client(api_key=LIMITED)
    for _ in range(2):
        await limited.chat.completions.create(model="echo", messages=HELLO)
    with pytest.raises(openai.RateLimitError):
        await limited.chat.completions.create(model="echo", messages=HELLO)
    status, body, _ = await call(keyed, "GET", "/api/cluster/keys", ADMIN)
    assert status == 200
    rows = {row["name"]: row for row in body["keys"]}
    assert set(rows) == {"ops", "alice", "limited", "tokens", "slow", "hashed", "env", "budget"}
    assert rows["alice"]["usage"]["requests"] == 3
    assert rows["alice"]["usage"]["completion_tokens"] == 12
    assert rows["alice"]["usage"]["prompt_tokens"] > 0
    assert rows["alice"]["models"] == ["echo"] and rows["ops"]["admin"] is True
    assert rows["limited"]["usage"]["rate_limited"] == 1
    assert rows["limited"]["limits"] == {"rpm": 2, "tpm": None, "max_concurrent": None}
    assert rows["limited"]["window"]["requests_last_minute"] == 2
    text = json.dumps(body)
    assert not any(value in text for value in ALL_VALUES)

    async def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with keyed.session().get(keyed.url + "/metrics") as resp:
            families = text_string_to_metric_families(await resp.text())
            return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}

    async def exported() -> bool:
        samples = await scraped()
        return (
            samples.get(("mlxcluster_key_requests_total", (("key", "alice"), ("status", "ok")))) == 3
            and samples.get(("mlxcluster_key_tokens_total", (("key", "alice"), ("kind", "completion")))) == 12
            and samples.get(("mlxcluster_key_rate_limited_total", (("key", "limited"),))) == 1
        )

    await wait_until(exported, what="per-key metrics in /metrics")


async def test_key_values_never_in_logs_or_config_show(
    keyed: RunningController, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for key in ALL_VALUES:
        try:
            await keyed.client(api_key=key).chat.completions.create(model="echo", messages=HELLO)
        except openai.APIStatusError:
            pass
    await call(keyed, "POST", CHAT, "sk-wrong-value-x", {"model": "echo", "messages": HELLO})
    logged = "\n".join(record.getMessage() + json.dumps(record.__dict__, default=str) for record in caplog.records)
    assert "request_id=" in logged  # the access log ran
    assert not any(value in logged for value in ALL_VALUES)
    shown = json.dumps(to_dict(keyed.ctx.config))
    assert not any(value in shown for value in ALL_VALUES)
    assert repr(keyed.ctx.ops.keys.keys()).count("digest") == 0


async def test_plain_api_keys_keep_working_as_admin_keys(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    config = with_sections(cluster_config, controller={"api_keys": ["k-plain"]})
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller()
        await controller_ready(controller)
        status, body, _ = await call(controller, "GET", "/api/cluster/keys", "k-plain")
        assert status == 200 and [row["name"] for row in body["keys"]] == ["api_keys[0]"]
        status, _, _ = await call(controller, "POST", "/api/cluster/workers/w1/drain", "k-plain")
        assert status == 200


async def controller_ready(controller: RunningController) -> None:
    await wait_until(lambda: controller.ctx.registry.stats().online >= 1, what="a worker online")


def test_key_entries_are_checked_at_startup() -> None:
    def ring(entries: list[dict[str, Any]], **env: str) -> KeyRing:
        return KeyRing.from_config(from_dict({"controller": {"keys": entries}}).controller, env)

    with pytest.raises(ConfigError, match=r"controller.keys\[0\]: give exactly one of key, key_env or key_sha256"):
        ring([{"name": "a"}])
    with pytest.raises(ConfigError, match=r"controller.keys\[0\]: give exactly one"):
        ring([{"name": "a", "key": "x", "key_env": "Y"}])
    with pytest.raises(ConfigError, match=r"controller.keys\[0\].key_env: environment variable NOPE"):
        ring([{"name": "a", "key_env": "NOPE"}])
    with pytest.raises(ConfigError, match="two keys are named 'a'"):
        ring([{"name": "a", "key": "x"}, {"name": "a", "key": "y"}])
    with pytest.raises(ConfigError, match="same value"):
        ring([{"name": "a", "key": "x"}, {"name": "b", "key": "x"}])
    with pytest.raises(ConfigError, match=r"controller.keys\[0\].rpm"):
        from_dict({"controller": {"keys": [{"name": "a", "key": "x", "rpm": 0}]}})
    with pytest.raises(ConfigError, match=r"controller.keys\[0\].key_sha256"):
        from_dict({"controller": {"keys": [{"name": "a", "key_sha256": "abc"}]}})
    assert ring([{"name": "a", "key_env": "K"}], K="v").lookup("v") is not None


def test_reset_durations_use_openai_format() -> None:
    assert format_reset(0.02) == "20ms"
    assert format_reset(6) == "6s"
    assert format_reset(90) == "1m30s"
    assert format_reset(0) == "0s"


async def test_rate_limit_window_slides(cluster_config: Config) -> None:
    """The limiter with a clock under test control: requests leave the window after 60 s."""
    from mlxcluster.controller.metering.ratelimit import RateLimited, RateLimiter

    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    key = KeyRing.from_config(
        from_dict({"controller": {"keys": [{"name": "a", "key": "x", "rpm": 1}]}}).controller
    ).get("a")
    assert key is not None
    limiter.admit(key)
    limiter.release(key)
    now[0] += 30
    with pytest.raises(RateLimited) as caught:
        limiter.admit(key)
    assert caught.value.retry_after == pytest.approx(30)
    now[0] += 30.01
    assert limiter.admit(key)["x-ratelimit-remaining-requests"] == "0"
    await asyncio.sleep(0)


async def test_websocket_requests_pass_the_same_limits(keyed: RunningController) -> None:
    """Over /v1/ws the key's model list and rpm apply per message; the request meter sees the key."""
    async with keyed.session().ws_connect(f"{keyed.url}/v1/ws?api_key={LIMITED}") as ws:
        replies: list[dict[str, Any]] = []
        for i in range(3):
            await ws.send_json({"type": "chat", "id": f"r{i}", "model": "echo", "messages": HELLO})
            while True:
                message = await ws.receive_json(timeout=10)
                if message["type"] in ("done", "error"):
                    replies.append(message)
                    break
    assert [r["type"] for r in replies] == ["done", "done", "error"]
    assert replies[2]["error"]["code"] == "rate_limit_exceeded"
    status, body, _ = await call(keyed, "GET", "/api/cluster/keys", ADMIN)
    usage = {row["name"]: row["usage"] for row in body["keys"]}["limited"]
    assert (usage["requests"], usage["rate_limited"]) == (2, 1)
    async with keyed.session().ws_connect(f"{keyed.url}/v1/ws") as ws:
        await ws.send_json({"type": "auth", "api_key": USER})
        assert (await ws.receive_json(timeout=10))["type"] == "auth"
        await ws.send_json({"type": "chat", "id": "x", "model": "slow", "messages": HELLO})
        message = await ws.receive_json(timeout=10)
        assert message["type"] == "error" and message["error"]["code"] == "model_not_allowed"


def test_a_bad_key_entry_stops_the_controller_with_the_key_path(tmp_path: Path) -> None:
    """A real ``run --mode controller``: a missing key_env is a one-line error (exit 2), not a traceback."""
    nats_port = free_port()
    (tmp_path / "cluster.toml").write_text(
        f"""
[nats]
url = "nats://127.0.0.1:{nats_port}"
[nats.embedded]
port = {nats_port}
http_port = 0
[controller]
port = {free_port()}
[[controller.keys]]
name = "ci"
key_env = "OPS_TEST_UNSET_KEY"
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXCLUSTER_") and k != "OPS_TEST_UNSET_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "mlxcluster", "run", "--mode", "controller"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "controller.keys[0].key_env: environment variable OPS_TEST_UNSET_KEY is not set" in done.stderr
    assert "Traceback" not in done.stderr


async def test_running_requests_reserve_their_max_tokens_against_tpm(keyed: RunningController) -> None:
    """Long requests started together cannot each spend the whole TPM budget: max_tokens is reserved."""
    client = keyed.client(api_key=BUDGET)
    first = await client.chat.completions.with_raw_response.create(
        model="slow", messages=HELLO, stream=True, max_tokens=95
    )
    assert first.headers["x-ratelimit-remaining-tokens"] == "5"  # 100 - 95 reserved
    chunks = aiter(first.parse())
    await anext(chunks)
    second = await client.chat.completions.with_raw_response.create(model="echo", messages=HELLO, max_tokens=3)
    assert second.headers["x-ratelimit-remaining-tokens"] == "2"  # 95 reserved < 100: admitted, 3 more reserved
    used = second.parse().usage
    assert used is not None
    status, body, headers = await call(keyed, "POST", CHAT, BUDGET, {"model": "echo", "messages": HELLO})
    assert status == 429, body  # used + 95 reserved by the running stream >= 100
    assert "reserved by running requests 95" in body["error"]["message"]
    assert body["error"]["type"] == "tokens" and int(headers["Retry-After"]) >= 1
    async for _ in chunks:
        pass
    key = keyed.ctx.ops.keys.get("budget")
    assert key is not None
    await wait_until(lambda: keyed.ctx.ops.limiter.running(key) == 0, what="the stream finished")
    window = keyed.ctx.ops.limiter.snapshot(key)
    assert window["tokens_reserved"] == 0  # reservations end with their requests; actual use stays
    assert window["tokens_last_minute"] > used.total_tokens
