"""Models as a fleet resource, through the real controller and the real worker role (echo engines over model dirs
of chosen sizes, so nothing is loaded but the bookkeeping is the real one): the fleet-wide ``/v1/models``,
load on demand (eight first requests, one load), keep-alive 0, the admin routes and their auth, placement, and
the 400 for a request no worker's memory could ever hold."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from cluster_harness import Cluster, RunningController, wait_until, with_sections
from nats.aio.msg import Msg
from test_model_host import MIB, model_dir

from mlxcluster.bus import Bus
from mlxcluster.config import ApiKeyEntry, Config
from mlxcluster.protocol import Accepted, Error, InferenceRequest
from mlxcluster.worker.worker_role import serve_worker

ADMIN, USER = "admin-secret", "user-secret"


@contextlib.asynccontextmanager
async def fleet(cluster_config: Config, tmp_path: Path, *, budget: int = 10 * MIB) -> AsyncIterator[RunningController]:
    """A controller and one echo worker whose catalogue holds a (4 MiB), b (4 MiB) and big (20 MiB), none loaded."""
    dirs = [str(model_dir(tmp_path, name, size)) for name, size in (("a", 4 * MIB), ("b", 4 * MIB), ("big", 20 * MIB))]
    keys = [
        msgspec.convert({"name": "ops", "key": ADMIN, "admin": True}, ApiKeyEntry),
        msgspec.convert({"name": "app", "key": USER}, ApiKeyEntry),
    ]
    config = with_sections(
        cluster_config,
        worker={"engine": "echo", "id": "w1", "models": dirs, "memory_budget_bytes": budget, "echo_token_delay_ms": 5},
        controller={"keys": keys},
    )
    worker_bus = await Bus.connect(config.nats, name="test-fleet-worker", attempts=5)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_worker(config, worker_bus, stop))
    try:
        async with Cluster(config) as cluster:
            controller = await cluster.start_controller()

            async def online() -> bool:
                _, body = await get(controller, "/api/cluster/workers?status=online")
                return [w["id"] for w in body["workers"]] == ["w1"]

            await wait_until(online, what="w1 online")
            yield controller
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
        await worker_bus.close()


async def get(controller: RunningController, path: str, key: str = USER) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(controller.url + path, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        return response.status, await response.json()


async def post(controller: RunningController, path: str, body: Any = None, key: str = ADMIN) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(controller.url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        return response.status, await response.json()


async def loaded_on(controller: RunningController, model: str) -> list[str]:
    _, listing = await get(controller, "/v1/models")
    return next(m["loaded_on"] for m in listing["data"] if m["id"] == model)


async def test_load_on_demand_keep_alive_and_the_fleet_listing(
    cluster_config: Config, bus: Bus, tmp_path: Path
) -> None:
    async with fleet(cluster_config, tmp_path) as controller:
        status, listing = await get(controller, "/v1/models")
        assert status == 200
        models = {m["id"]: m for m in listing["data"]}
        assert sorted(models) == ["a", "b", "big"]
        assert models["a"]["loaded_on"] == [] and models["a"]["available_on"] == ["w1"]
        assert models["big"]["size_bytes"] == 20 * MIB and models["a"]["object"] == "model"

        client = controller.client(api_key=USER)
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(model="a", messages=[{"role": "user", "content": f"hello {i}"}])
                for i in range(8)
            )
        )
        assert [a.choices[0].message.content for a in answers] == [f"hello {i}" for i in range(8)]
        assert controller.ctx.loader.loads_started == 1  # eight first requests, one load
        assert await loaded_on(controller, "a") == ["w1"]

        async def idle_with_a_deadline() -> dict[str, Any] | None:  # the heartbeat after the requests ended
            _, detail = await get(controller, "/api/cluster/models?model=a")
            return detail if detail["workers"][0]["models"][0]["expires_at"] is not None else None

        detail = await wait_until(idle_with_a_deadline, what="model a idle with its keep-alive deadline")
        (state,) = detail["workers"][0]["models"]
        assert state["state"] == "loaded" and state["weights_bytes"] == 4 * MIB and state["expires_at"] > 0
        assert detail["workers"][0]["memory"]["budget_bytes"] == 10 * MIB

        answer = await client.chat.completions.create(
            model="b", messages=[{"role": "user", "content": "once"}], extra_body={"keep_alive": 0}
        )
        assert answer.choices[0].message.content == "once"
        assert controller.ctx.loader.loads_started == 2

        async def b_gone() -> bool:
            return await loaded_on(controller, "b") == []

        await wait_until(b_gone, what="b unloaded after a keep_alive 0 request")

        status, error = await post(
            controller,
            "/v1/chat/completions",
            {"model": "a", "messages": [{"role": "user", "content": "x"}], "keep_alive": "5 minutes"},
            USER,
        )
        assert status == 400 and error["error"]["param"] == "keep_alive"


async def test_admin_routes_auth_placement_and_force(cluster_config: Config, bus: Bus, tmp_path: Path) -> None:
    async with fleet(cluster_config, tmp_path) as controller:
        status, _ = await post(controller, "/api/cluster/models/a/load", {}, key=USER)
        assert status == 403
        status, body = await post(controller, "/api/cluster/models/a/load", {"keep_alive": "10m", "pin": True})
        assert status == 200, body
        assert body["worker"] == "w1" and body["state"]["pinned"] and body["state"]["state"] == "loaded"

        status, preview = await get(controller, "/api/cluster/placement?model=big")
        assert status == 200 and preview["worker"] is None and preview["weights_bytes"] == 20 * MIB
        (candidate,) = preview["candidates"]
        assert not candidate["fits"] and candidate["reason"] == (
            "needs 20.0 MiB for weights; 6.0 MiB of its 10.0 MiB budget would be free after unloading every idle "
            "unpinned model"
        )
        status, preview = await get(controller, "/api/cluster/placement?model=b")
        assert preview["worker"] == "w1" and preview["candidates"][0]["reason"] == "fits"

        status, refused = await post(controller, "/api/cluster/models/big/load", {})
        assert status == 409 and "cannot be loaded" in refused["error"]["message"]
        status, forced = await post(controller, "/api/cluster/models/big/load", {"force": True})
        assert status == 200 and "forced past the memory budget" in forced["warning"]

        status, body = await post(controller, "/api/cluster/models/big/unload", {})
        assert status == 200 and body["unloaded"] == ["w1"]
        status, body = await post(controller, "/api/cluster/models/nope/load", {})
        assert status == 404
        status, body = await post(controller, "/api/cluster/models/a/load", {"pin": "yes"})
        assert status == 400 and body["error"]["param"] == "pin"
        status, body = await post(controller, "/api/cluster/models/a/load", {"colour": 1})
        assert status == 400 and body["error"]["param"] == "colour"


async def test_a_request_no_worker_could_ever_hold_is_a_400(cluster_config: Config, bus: Bus) -> None:
    async def too_big(fake: Any, request: InferenceRequest, msg: Msg) -> None:
        await fake.send(msg, Accepted(worker_id=fake.id))
        await fake.send(
            msg,
            Error(code="exceeds_memory_budget", message="needs 9 GiB of KV, budget 8 GiB", retryable=True),
        )

    async with Cluster(cluster_config) as cluster:
        await cluster.start_fake("f1", too_big, models=["m"])
        await cluster.start_fake("f2", too_big, models=["m"])
        controller = await cluster.start_controller()
        await controller.wait_online("f1", "f2")
        status, body = await post(
            controller, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 400
        assert body["error"]["param"] == "max_tokens" and body["error"]["code"] == "exceeds_memory_budget"
        assert "needs 9 GiB of KV" in body["error"]["message"]


async def test_models_commands(cluster_config: Config, bus: Bus, tmp_path: Path) -> None:
    """``models ps|load|unload|placement`` against the fleet (the admin key from MLXCLUSTER_API_KEY)."""
    from test_cli_commands import cli

    async with fleet(cluster_config, tmp_path) as controller:
        base = ("--url", controller.url)
        env = {"MLXCLUSTER_API_KEY": ADMIN}
        result = await cli("models", "ps", *base, env=env)
        assert result.exit_code == 0 and "no model is loaded on any worker" in result.output
        result = await cli("models", "load", "a", "--pin", "--keep-alive", "1h", *base, env=env)
        assert result.exit_code == 0 and result.output.strip() == "a: loaded on w1", result.output
        result = await cli("models", "ps", *base, env=env)
        row = next(line for line in result.output.splitlines() if line.startswith("a "))
        assert row.split()[:5] == ["a", "w1", "loaded", "pinned", "4"] and row.endswith("never")
        result = await cli("models", "placement", "big", *base, env=env)
        assert "would load on no worker" in result.output and "needs 20.0 MiB for weights" in result.output
        result = await cli("models", "load", "big", *base, env=env)
        assert result.exit_code == 1 and "HTTP 409" in result.output
        result = await cli("models", "unload", "a", *base, env=env)
        assert result.exit_code == 0 and result.output.strip() == "a: unloaded from w1"
        result = await cli("models", "load", "a", *base, env={"MLXCLUSTER_API_KEY": USER})
        assert result.exit_code == 1 and "HTTP 403" in result.output
