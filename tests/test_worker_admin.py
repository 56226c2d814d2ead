"""Worker management at run time: drain (running streams finish, nothing new starts), resume, priority,
tags, forget; settings that survive heartbeats and come back when the worker re-registers; the CLI.

Real echo workers and the real controller app over the real nats-server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from cluster_harness import Cluster, RunningController, start_controller, wait_until
from typer.testing import CliRunner

from mlxcluster.cli import app as cli_app
from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer

HELLO = [{"role": "user", "content": "one two three four five six"}]


@pytest.fixture
async def two(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    async with Cluster(cluster_config) as cluster:
        await cluster.start_worker("w1", token_delay_ms=100)
        await cluster.start_worker("w2", token_delay_ms=100)
        controller = await cluster.start_controller()
        await controller.wait_online("w1", "w2")
        yield cluster


async def admin(controller: RunningController, worker: str, action: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    url = f"{controller.url}/api/cluster/workers/{worker}/{action}"
    async with controller.session().post(url, data=data) as resp:
        return resp.status, await resp.json()


async def worker(controller: RunningController, worker_id: str) -> dict[str, Any]:
    async with controller.session().get(f"{controller.url}/api/cluster/workers/{worker_id}") as resp:
        return await resp.json()


async def served_by(controller: RunningController, count: int) -> list[str]:
    """Run ``count`` requests one after the other; the worker of each, from the request monitor."""
    client = controller.client()
    for _ in range(count):
        await client.chat.completions.create(model="echo", messages=HELLO, max_tokens=2)
    async with controller.session().get(f"{controller.url}/api/cluster/requests") as resp:
        return [r["worker"] for r in (await resp.json())["recent"] if not r["stream"]][:count]


async def test_drain_lets_the_running_stream_finish_and_sends_nothing_new(two: Cluster) -> None:
    controller = two.controller
    assert controller is not None
    client = controller.client()
    stream = await client.chat.completions.create(model="echo", messages=HELLO, stream=True)
    chunks = aiter(stream)
    await anext(chunks)
    running_on = next(iter(controller.ctx.dispatcher.live.values())).worker
    assert running_on in ("w1", "w2")
    status, body = await admin(controller, running_on, "drain")
    assert (status, body["status"], body["inflight"]) == (200, "draining", 1)
    other = "w2" if running_on == "w1" else "w1"
    assert set(await served_by(controller, 4)) == {other}  # nothing new on the drained worker
    text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert text.strip().endswith("six")  # the stream ran to its end
    # heartbeats keep coming and say "online"; the controller keeps it draining
    heartbeats = two.workers[running_on].service
    seen = controller.ctx.registry._workers[running_on].heartbeat  # noqa: SLF001 - the last heartbeat object
    await wait_until(lambda: controller.ctx.registry._workers[running_on].heartbeat is not seen, what="a heartbeat")  # noqa: SLF001
    assert heartbeats is not None
    assert (await worker(controller, running_on))["status"] == "draining"
    status, body = await admin(controller, running_on, "resume")
    assert (status, body["status"]) == (200, "online")
    assert running_on in set(await served_by(controller, 6))


async def test_drained_worker_stays_drained_when_it_re_registers(two: Cluster) -> None:
    controller = two.controller
    assert controller is not None
    await admin(controller, "w1", "drain")
    await admin(controller, "w1", "settings", {"priority": 7, "tags": ["gpu", "big"]})
    await two.workers["w1"].stop()  # deregisters: the controller forgets the worker
    await wait_until(lambda: "w1" not in controller.ctx.registry, what="w1 removed")
    await two.start_worker("w1")
    await wait_until(lambda: "w1" in controller.ctx.registry, what="w1 registered again")
    data = await worker(controller, "w1")
    assert (data["status"], data["priority"], data["tags"], data["drained"]) == ("draining", 7, ["gpu", "big"], True)


async def test_priority_and_tags(two: Cluster) -> None:
    controller = two.controller
    assert controller is not None
    status, body = await admin(controller, "w2", "settings", {"priority": 5, "tags": ["fast"]})
    assert status == 200 and body["settings"] == {"drained": False, "priority": 5, "tags": ["fast"]}
    assert set(await served_by(controller, 4)) == {"w2"}  # the higher priority tier wins while it has room
    ids = [w["id"] for w in await controller.workers()]
    assert ids == ["w2", "w1"]
    async with controller.session().get(f"{controller.url}/api/cluster/workers?tag=fast") as resp:
        assert [w["id"] for w in (await resp.json())["workers"]] == ["w2"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"priority": "high"}, "priority"),
        ({"tags": "gpu"}, "tags"),
        ({"tags": [""]}, "tags"),
        ({"drained": 1}, "drained"),
        ({"colour": "red"}, "colour"),
        ({}, None),
        ([1], None),
    ],
)
async def test_bad_settings_are_400_naming_the_field(two: Cluster, body: Any, param: str | None) -> None:
    assert two.controller is not None
    status, data = await admin(two.controller, "w1", "settings", body)
    assert status == 400 and data["error"]["param"] == param, data


async def test_forget_only_an_offline_worker(two: Cluster) -> None:
    controller = two.controller
    assert controller is not None
    status, data = await admin(controller, "w1", "forget")
    assert (status, data["error"]["code"]) == (409, "worker_not_offline")
    await two.workers["w1"].stop(drain=False)  # vanishes without a word: offline after the timeout
    await wait_until(lambda: controller.ctx.registry.is_offline("w1"), what="w1 offline")
    status, data = await admin(controller, "w1", "forget")
    assert (status, data) == (200, {"id": "w1", "forgotten": True})
    status, data = await admin(controller, "w1", "drain")
    assert (status, data["error"]["code"]) == (404, "worker_not_found")


async def test_cli_drains_and_resumes(two: Cluster) -> None:
    controller = two.controller
    assert controller is not None
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(cli_app, [*args, "--url", controller.url], catch_exceptions=False)

    result = await asyncio.to_thread(cli, "workers", "drain", "w1")
    assert result.exit_code == 0 and "w1: draining" in result.output, result.output
    assert (await worker(controller, "w1"))["status"] == "draining"
    result = await asyncio.to_thread(cli, "workers", "set", "w1", "--priority", "3", "--tags", "a,b")
    assert result.exit_code == 0 and "priority 3, tags a,b" in result.output, result.output
    result = await asyncio.to_thread(cli, "workers", "resume", "w1")
    assert result.exit_code == 0 and "w1: online" in result.output, result.output
    result = await asyncio.to_thread(cli, "workers", "--status", "online")
    assert result.exit_code == 0 and "w1" in result.output and "w2" in result.output
    result = await asyncio.to_thread(cli, "workers", "forget", "nope")
    assert result.exit_code == 1 and "HTTP 404" in result.output
    result = await asyncio.to_thread(cli, "requests")
    assert result.exit_code == 0


async def test_a_request_for_a_fully_drained_model_is_503(two: Cluster) -> None:
    controller = two.controller
    assert controller is not None
    await admin(controller, "w1", "drain")
    await admin(controller, "w2", "drain")
    with pytest.raises(openai.APIStatusError) as caught:
        await controller.client().chat.completions.create(model="echo", messages=HELLO)
    assert caught.value.status_code == 503


async def test_settings_reach_every_controller_and_new_ones_learn_them(two: Cluster) -> None:
    """A drain through one controller holds on all of them; a controller started later learns it."""
    first = two.controller
    assert first is not None
    second = await start_controller(two.config)
    later: RunningController | None = None
    try:
        await second.wait_online("w1", "w2")
        status, _ = await admin(first, "w1", "drain")
        assert status == 200
        await wait_until(lambda: second.ctx.registry.get("w1").status == "draining", what="drained on the second")  # type: ignore[union-attr]
        assert set(await served_by(second, 4)) == {"w2"}
        await admin(second, "w2", "settings", {"priority": 9, "tags": ["big"]})
        await wait_until(lambda: first.ctx.registry.get("w2").priority == 9, what="priority on the first")  # type: ignore[union-attr]
        later = await start_controller(two.config)  # learns both from the others' answers to its announce
        await later.wait_online("w2")

        def learned() -> bool:
            w1, w2 = later.ctx.registry.get("w1"), later.ctx.registry.get("w2")  # type: ignore[union-attr]
            return bool(w1 and w2 and w1.status == "draining" and w2.priority == 9 and w2.tags == ("big",))

        await wait_until(learned, what="the third controller learns the settings")
        await admin(later, "w1", "resume")
        for controller in (first, second, later):
            await wait_until(lambda c=controller: c.ctx.registry.get("w1").status == "online", what="resumed")  # type: ignore[misc]
    finally:
        await second.stop()
        if later is not None:
            await later.stop()
