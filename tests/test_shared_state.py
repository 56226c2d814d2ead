"""Shared state in NATS JetStream: keys created at runtime, in force on every controller within a second; usage
that counts every answered request exactly once and survives a controller's restart; worker settings applied by
every controller and kept when they all restart; the start refused without JetStream (and ``--no-shared-state``
running without it); R3 on a three-node NATS cluster; the users file's controller role; malformed entries
dropped and counted.

Two real controller apps (the factory) and an echo worker over one real nats-server with JetStream (its store
in the test's tmp dir), real HTTP clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cluster_harness import Cluster, RunningController, start_controller, wait_until
from loopback import free_port, make_config, shared_config
from typer.testing import CliRunner, Result

from mlxcluster.bus import Bus
from mlxcluster.bus.jetstream import open_jetstream
from mlxcluster.cli import app
from mlxcluster.config import Config
from mlxcluster.controller.controller_role import serve_controller
from mlxcluster.embedded import EmbeddedNatsServer, nats_server_binary
from mlxcluster.errors import NodeError

ADMIN = "sk-admin-shared-5e5e"
HELLO = [{"role": "user", "content": "one two three"}]
CHAT = "/v1/chat/completions"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return shared_config(
        str(tmp_path / "js"),
        discovery={"heartbeat_interval_ms": 200, "offline_timeout_ms": 1000},
        controller={"keys": [{"name": "ops", "key": ADMIN, "admin": True}]},
    )


@pytest.fixture
def cluster_config(config: Config) -> Config:
    """This module's config is the one conftest's ``nats_server`` starts with (JetStream on)."""
    return config


@pytest.fixture
async def cluster(config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    async with Cluster(config) as running:
        await running.start_worker("w1")
        yield running


@pytest.fixture
async def pair(cluster: Cluster) -> AsyncIterator[tuple[RunningController, RunningController]]:
    """Two controllers on the one nats-server (the cluster stops the first, this fixture the second)."""
    first = await cluster.start_controller()
    second = await start_controller(cluster.config)
    try:
        await online(first)
        await online(second)
        yield first, second
    finally:
        with contextlib.suppress(Exception):  # the restart test stops it itself
            await second.stop()


async def online(controller: RunningController) -> None:
    await wait_until(lambda: controller.ctx.registry.stats().online >= 1, what="the worker online")


async def call(
    controller: RunningController, method: str, path: str, key: str | None = ADMIN, body: Any = None, raw: bytes = b""
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = json.dumps(body).encode() if body is not None else raw or None
    async with controller.session().request(method, controller.url + path, data=data, headers=headers) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def chat(controller: RunningController, key: str, model: str = "echo") -> int:
    status, _ = await call(controller, "POST", CHAT, key, {"model": model, "messages": HELLO})
    return status


async def until_status(controller: RunningController, key: str, expected: int, within: float = 1.0) -> float:
    """Seconds until a chat request with ``key`` answers ``expected`` (fails after ``within``)."""
    started = time.monotonic()
    await wait_until(lambda: _is(chat(controller, key), expected), within, f"HTTP {expected} for the key")
    return time.monotonic() - started


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)


async def test_a_key_created_on_one_controller_works_on_the_other_until_revoked(
    cluster: Cluster, pair: tuple[RunningController, RunningController]
) -> None:
    first, second = pair
    status, created = await call(first, "POST", "/api/cluster/keys", body={"name": "team-a", "rpm": 100})
    assert status == 201, created
    secret = created.pop("key")
    assert secret.startswith("sk-mlx-") and created["source"] == "api" and created["rpm"] == 100
    assert await chat(first, secret) == 200
    await until_status(second, secret, 200)
    status, listed = await call(second, "GET", "/api/cluster/keys")
    rows = {row["name"]: row for row in listed["keys"]}
    assert rows["team-a"]["source"] == "api" and rows["ops"]["source"] == "config"
    assert secret not in json.dumps(listed) and "sha256" not in json.dumps(listed)

    status, revoked = await call(first, "POST", "/api/cluster/keys/team-a/revoke")
    assert (status, revoked["revoked"]) == (200, True)
    assert await chat(first, secret) == 401
    assert await until_status(second, secret, 401) < 1.0
    status, body = await call(second, "POST", "/api/cluster/keys", body={"name": "team-a"})
    assert (status, body["error"]["code"], body["error"]["param"]) == (409, "key_conflict", "name")
    status, body = await call(first, "POST", "/api/cluster/keys/nobody/revoke")
    assert (status, body["error"]["code"]) == (404, "key_not_found")


async def test_rotate_patch_and_expiry(cluster: Cluster, pair: tuple[RunningController, RunningController]) -> None:
    first, second = pair
    _, created = await call(first, "POST", "/api/cluster/keys", body={"name": "rot", "models": ["echo"]})
    old = created["key"]
    await until_status(second, old, 200)
    status, rotated = await call(second, "POST", "/api/cluster/keys/rot/rotate")
    assert status == 200 and rotated["key"] != old and rotated["generation"] == 2
    assert await chat(second, rotated["key"]) == 200 and await chat(second, old) == 401
    await until_status(first, old, 401)
    assert await chat(first, rotated["key"]) == 200

    status, patched = await call(first, "PATCH", "/api/cluster/keys/rot", body={"rpm": 1, "models": []})
    assert (status, patched["rpm"], patched["models"]) == (200, 1, [])
    assert await chat(first, rotated["key"]) == 200
    assert await chat(first, rotated["key"]) == 429  # the new limit: one a minute
    status, patched = await call(first, "PATCH", "/api/cluster/keys/rot", body={"rpm": None})
    assert (status, patched["rpm"]) == (200, None)
    assert await chat(first, rotated["key"]) == 200
    status, body = await call(first, "PATCH", "/api/cluster/keys/ops", body={"rpm": 5})
    assert (status, body["error"]["code"]) == (409, "key_conflict")  # a config key changes in its file

    expires_at = time.time() + 1.0
    _, short = await call(first, "POST", "/api/cluster/keys", body={"name": "brief", "expires_at": expires_at})
    await until_status(second, short["key"], 200)
    await asyncio.sleep(expires_at - time.time() + 0.05)
    assert await chat(first, short["key"]) == 401 and await chat(second, short["key"]) == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "rpm": "many"}, "rpm"),
        ({"name": "x", "rpm": 0}, "rpm"),
        ({"name": "x", "colour": "red"}, "colour"),
        ({"name": "bad name!"}, "name"),
        ({"rpm": 5}, "name"),
        ({"name": "x", "expires_at": 1.0}, "expires_at"),
        ({"name": "x", "models": "echo"}, "models"),
    ],
)
async def test_a_bad_key_body_is_a_400_naming_the_field(cluster: Cluster, body: dict[str, Any], param: str) -> None:
    controller = await cluster.start_controller()
    status, answer = await call(controller, "POST", "/api/cluster/keys", body=body)
    assert (status, answer["error"]["param"]) == (400, param), answer


async def test_usage_counts_every_answered_request_once_and_survives_a_restart(
    cluster: Cluster, pair: tuple[RunningController, RunningController]
) -> None:
    first, second = pair
    _, created = await call(first, "POST", "/api/cluster/keys", body={"name": "meter"})
    key = created["key"]
    await until_status(second, key, 200)  # one answered request on the second controller
    statuses = await asyncio.gather(*(chat(c, key) for c in (first, second) * 10))
    statuses += [await chat(first, key, model="no-such-model")]  # an error: counted apart
    answered = statuses.count(200) + 1
    assert answered == 21 and statuses.count(404) == 1

    status, usage = await call(second, "GET", "/api/cluster/usage?key=meter")
    assert status == 200, usage
    assert usage["key"] == "meter" and usage["requests"] == answered and usage["errors"] == 1
    assert usage["completion_tokens"] == 3 * answered and usage["prompt_tokens"] > 0
    assert len(usage["rows"]) == 1 and usage["rows"][0]["requests"] == answered
    _, by_model = await call(first, "GET", "/api/cluster/usage?key=meter&by=model&since=2020-01-01")
    models = {row["model"]: row["requests"] for row in by_model["rows"]}
    assert models == {"echo": answered, "no-such-model": 0} and by_model["requests"] == answered

    await second.stop()
    await first.stop()
    cluster.controller = None
    again = await cluster.start_controller()
    await online(again)
    assert await chat(again, key) == 200  # the runtime key is still there
    _, usage = await call(again, "GET", "/api/cluster/usage?key=meter")
    assert usage["requests"] == answered + 1 and usage["errors"] == 1


async def test_usage_query_errors(cluster: Cluster) -> None:
    controller = await cluster.start_controller()
    for query, param, code in [
        ("key=ops&colour=red", "colour", 400),
        ("key=ops&by=week", "by", 400),
        ("key=ops&since=yesterday", "since", 400),
        ("key=ops&since=2026-13-40", "since", 400),
        ("key=ghost", "key", 404),
    ]:
        status, body = await call(controller, "GET", f"/api/cluster/usage?{query}")
        assert (status, body["error"]["param"]) == (code, param), query
    status, body = await call(controller, "GET", "/api/cluster/usage?key=ops&since=0")
    assert (status, body["requests"], body["rows"]) == (200, 0, [])


async def test_malformed_entries_are_dropped_and_counted(cluster: Cluster, config: Config) -> None:
    controller = await cluster.start_controller()
    await online(controller)
    js = (await open_jetstream(controller.bus)).js
    keys = await js.key_value("mlxcluster_keys")
    await keys.put("key.garbage", b"{not json")
    await keys.put("key.wrong", json.dumps({"name": "wrong", "sha256": 5}).encode())
    await js.publish("mlxcluster.usage.ops", b"\x00\x01 not a record", stream="mlxcluster_USAGE")

    async def counted() -> bool:
        _, status = await call(controller, "GET", "/api/cluster/status")
        return bool(status["shared"]["invalid_records"] >= 3)

    await wait_until(counted, 3.0, "three malformed entries counted")
    assert await chat(controller, ADMIN) == 200
    status, usage = await call(controller, "GET", "/api/cluster/usage?key=ops")
    assert (status, usage["requests"]) == (200, 1)
    _, body = await call(controller, "GET", "/api/cluster/status")
    assert body["shared_state"] is True and body["shared"]["replicas"] == 1


async def test_without_jetstream_the_start_is_refused_unless_shared_state_is_off(tmp_path: Path) -> None:
    plain = make_config()  # a nats-server without JetStream
    nats = EmbeddedNatsServer(plain.nats)
    await nats.start()
    try:
        bus = await Bus.connect(plain.nats, name="test", attempts=5)
        wants_shared = make_config(nats={"url": plain.nats.url}, controller={"shared_state": True})
        with pytest.raises(NodeError, match="does not run JetStream") as refused:
            await serve_controller(wants_shared, bus, asyncio.Event())
        assert "\n" not in str(refused.value) and "--no-shared-state" in str(refused.value)
        await bus.close()
        exit_code, output = await run_controller(plain, tmp_path, [])
        assert exit_code == 2 and "does not run JetStream" in output, output
        exit_code, output = await run_controller(plain, tmp_path, ["--no-shared-state"], until_ready=True)
        assert exit_code == 0, output
    finally:
        await nats.stop()


async def run_controller(
    config: Config, tmp_path: Path, flags: list[str], until_ready: bool = False
) -> tuple[int, str]:
    """``mlxcluster run --mode controller`` against ``config``'s NATS: its exit code (0: it served
    ``/api/cluster/status`` with ``shared_state: false`` and was stopped) and its output."""
    port = free_port()
    toml = tmp_path / f"controller-{port}.toml"
    toml.write_text(f'[cluster]\nmode = "controller"\n[nats]\nmode = "external"\nurl = "{config.nats.url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXCLUSTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "mlxcluster", "run", "-c", str(toml), "--port", str(port), *flags]
    process = await asyncio.create_subprocess_exec(*command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not until_ready:
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        return process.returncode or 0, output.decode()
    import aiohttp

    async def serving() -> bool:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/api/cluster/status") as r,
            ):
                return r.status == 200 and (await r.json())["shared_state"] is False
        except aiohttp.ClientError:
            return False

    try:
        await wait_until(serving, 20.0, "the controller serving without shared state", interval=0.1)
    finally:
        process.terminate()
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    return 0, output.decode()


async def test_on_a_three_node_nats_cluster_the_state_has_three_replicas_and_outlives_a_node(tmp_path: Path) -> None:
    binary = str(nats_server_binary())
    ports, routes = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    route_urls = ",".join(f"nats://127.0.0.1:{port}" for port in routes)
    nodes = [
        await asyncio.create_subprocess_exec(
            *[binary, "-a", "127.0.0.1", "-p", str(port), "-n", f"n{i}", "-js", "-sd", str(tmp_path / f"n{i}")],
            *["--cluster_name", "c", "--cluster", f"nats://127.0.0.1:{route}", "--routes", route_urls],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, (port, route) in enumerate(zip(ports, routes, strict=True))
    ]
    try:
        url = ",".join(f"nats://127.0.0.1:{port}" for port in ports)
        config = make_config(
            nats={"url": url, "randomize_servers": False},
            controller={"shared_state": True, "keys": [{"name": "ops", "key": ADMIN, "admin": True}]},
        )
        bus = await Bus.connect(config.nats, name="test", attempts=20)
        controller = await start_controller(config, bus)
        try:
            shared = controller.ctx.shared
            assert shared is not None and shared.replicas == 3
            js = (await open_jetstream(bus)).js
            for stream in ("KV_mlxcluster_keys", "mlxcluster_USAGE", "KV_mlxcluster_usage", "KV_mlxcluster_limits"):
                assert (await js.stream_info(stream)).config.num_replicas == 3
            # lose a server that is not the keys bucket's leader (a leader's loss costs an election: seconds of
            # 503s, not waited for here) nor the one the controller is connected to (node 0)
            leader = (await js.stream_info("KV_mlxcluster_keys")).cluster.leader  # type: ignore[union-attr]
            lost = next(i for i in (1, 2) if f"n{i}" != leader)
            nodes[lost].kill()
            await nodes[lost].wait()
            status, created = await call(controller, "POST", "/api/cluster/keys", body={"name": "after", "rpm": 2})
            assert status == 201, created
            # authenticated (no model on this cluster: 404) and limited: the limits bucket outlived the node too
            # (503 shared_state_unavailable while its stream elects a new leader, if the lost node led it)
            answers: list[int] = []
            deadline = time.monotonic() + 20
            while len(answers) < 3 and time.monotonic() < deadline:
                answer = await chat(controller, created["key"])
                if answer == 503:
                    await asyncio.sleep(0.2)
                else:
                    answers.append(answer)
            assert answers == [404, 404, 429]
        finally:
            await controller.stop()
            await bus.close()
    finally:
        for node in nodes:
            if node.returncode is None:
                node.kill()
                await node.wait()


async def test_the_keys_commands(cluster: Cluster) -> None:
    controller = await cluster.start_controller()
    await online(controller)

    async def cli(*args: str) -> Result:
        env = {"MLXCLUSTER_API_KEY": ADMIN}
        return await asyncio.to_thread(
            CliRunner().invoke, app, [*args, "--url", controller.url], env=env, catch_exceptions=False
        )

    created = await cli("keys", "create", "cli-key", "--rpm", "50", "--model", "echo", "--expires-in", "1h")
    assert created.exit_code == 0, created.output
    name, value = created.stdout.strip().split(": ")
    assert name == "key cli-key" and value.startswith("sk-mlx-")
    assert await chat(controller, value) == 200
    rotated = json.loads((await cli("keys", "rotate", "cli-key", "--json")).stdout)
    assert rotated["generation"] == 2 and await chat(controller, rotated["key"]) == 200
    listed = await cli("keys", "list")
    row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("cli-key"))
    assert row[2] == "50" and row[-1] == "api"
    usage = await cli("keys", "usage", "cli-key")
    assert usage.exit_code == 0, usage.output
    day, total = usage.stdout.splitlines()[1:]
    assert day.split()[1] == "2" and total.split()[:2] == ["total", "2"]  # two requests answered
    assert (await cli("keys", "revoke", "cli-key")).exit_code == 0
    assert await chat(controller, rotated["key"]) == 401
    refused = await cli("keys", "create", "cli-key")
    assert refused.exit_code == 1 and "HTTP 409" in refused.stderr


async def test_a_controller_honours_only_its_own_config_keys(cluster: Cluster, config: Config) -> None:
    keys = [{"name": "ops", "key": ADMIN, "admin": True}, {"name": "only-here", "key": "sk-only-here-1"}]
    with_extra = shared_config(
        "unused",
        nats=msgspec.to_builtins(config.nats),
        controller={"keys": keys},
        discovery={"heartbeat_interval_ms": 200},
    )
    first = await start_controller(with_extra)
    try:
        second = await cluster.start_controller()  # its file has only "ops"
        await online(first)
        await online(second)
        assert await chat(first, "sk-only-here-1") == 200
        assert await chat(second, "sk-only-here-1") == 401  # seeded, but from another controller's file
        status, body = await call(second, "POST", "/api/cluster/keys", body={"name": "only-here"})
        assert (status, body["error"]["code"]) == (409, "key_conflict")  # the seeded record reserves the name
    finally:
        await first.stop()


async def test_worker_settings_reach_every_controller_and_outlive_them_all(
    cluster: Cluster, pair: tuple[RunningController, RunningController]
) -> None:
    first, second = pair

    async def status_on(controller: RunningController) -> str:
        _, worker = await call(controller, "GET", "/api/cluster/workers/w1")
        return str(worker["status"])

    status, body = await call(first, "POST", "/api/cluster/workers/w1/settings", body={"drained": True, "priority": 7})
    assert (status, body["status"]) == (200, "draining"), body
    await wait_until(lambda: _equals(status_on(second), "draining"), 1.0, "the drain on the other controller")
    js = (await open_jetstream(first.bus)).js
    await (await js.key_value("mlxcluster_settings")).put("worker.garbage", b"[1, 2")

    await second.stop()
    await first.stop()
    cluster.controller = None
    again = await cluster.start_controller()  # every controller stopped: the settings are in JetStream
    await wait_until(lambda: again.ctx.registry.stats().total >= 1, what="the worker known")
    await wait_until(lambda: _equals(status_on(again), "draining"), 2.0, "the drain after a restart")
    assert again.ctx.registry.settings_of("w1").priority == 7  # type: ignore[union-attr]
    _, body = await call(again, "GET", "/api/cluster/status")
    assert body["shared"]["invalid_records"] == 1  # the malformed settings entry, dropped
    status, body = await call(again, "POST", "/api/cluster/workers/w1/resume")
    assert (status, body["status"]) == (200, "online")


async def _equals(value: Any, expected: str) -> bool:
    return bool(await value == expected)


async def test_the_controller_role_of_a_users_file_may_use_the_shared_state(config: Config, tmp_path: Path) -> None:
    made = CliRunner().invoke(app, ["config", "init", "--secure", str(tmp_path / "secure"), "--controller-host", "h"])
    assert made.exit_code == 0, made.output
    users_file = tmp_path / "secure" / "nats-users.json"
    users = {u["role"]: u for u in json.loads(users_file.read_text())["users"] if not u.get("worker_id")}

    def as_role(role: str) -> Config:
        embedded = msgspec.structs.replace(config.nats.embedded, users_file=str(users_file))
        user, password = users[role]["user"], users[role]["password"]
        nats = msgspec.structs.replace(config.nats, user=user, password=password, embedded=embedded)
        return msgspec.structs.replace(config, nats=nats)

    async with EmbeddedNatsServer(as_role("controller").nats), Cluster(as_role("controller")) as cluster:
        await cluster.start_worker("w1", config=as_role("worker"))
        controller = await cluster.start_controller()
        await online(controller)
        status, created = await call(controller, "POST", "/api/cluster/keys", body={"name": "perm", "rpm": 50})
        assert status == 201, created
        assert await chat(controller, created["key"]) == 200  # leased from the limits bucket: the role may
        status, usage = await call(controller, "GET", "/api/cluster/usage?key=perm")
        assert (status, usage["requests"]) == (200, 1), usage
        status, body = await call(controller, "POST", "/api/cluster/workers/w1/drain")
        assert (status, body["status"]) == (200, "draining")
        settings = await (await open_jetstream(controller.bus)).js.key_value("mlxcluster_settings")
        assert b'"drained":true' in (await settings.get("worker.w1")).value  # written: the role may
        assert controller.ctx.shared is not None and controller.ctx.shared.usage.unsent == 0
