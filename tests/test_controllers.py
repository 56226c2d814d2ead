"""Two controllers on one NATS serve the same cluster: same registry, each other in the status, no double booking.

In-process (the real app factory, the real nats-server, echo workers); tests/test_faults.py kills one of
two controller processes under load.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cluster_harness import Cluster, RunningController, start_controller, wait_until, with_sections, words

from mlxcluster.bus import Bus
from mlxcluster.cli.workers import format_requests
from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import ControllerHeartbeat


async def status(controller: RunningController) -> dict[str, Any]:
    async with controller.session().get(controller.url + "/api/cluster/status") as resp:
        assert resp.status == 200
        return await resp.json()


async def requests_listing(controller: RunningController, query: str = "") -> dict[str, Any]:
    async with controller.session().get(controller.url + "/api/cluster/requests" + query) as resp:
        assert resp.status == 200
        return await resp.json()


async def known_controllers(controller: RunningController) -> dict[str, str]:
    """Controller id → status, as ``controller``'s status route lists them."""
    return {c["id"]: c["status"] for c in (await status(controller))["controllers"]}


async def test_two_controllers_know_each_other_and_share_the_workers(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    config = with_sections(cluster_config, worker={"max_concurrent": 2, "max_queue": 0})
    async with Cluster(config) as cluster:
        for worker_id in ("w1", "w2"):
            await cluster.start_worker(worker_id, token_delay_ms=20)
        first = await cluster.start_controller()
        second = await start_controller(config)
        try:
            await first.wait_online("w1", "w2")
            await second.wait_online("w1", "w2")
            ids = {first.ctx.controller_id, second.ctx.controller_id}

            async def both_listed() -> bool:
                views = [await known_controllers(c) for c in (first, second)]
                return all(v == dict.fromkeys(ids, "online") for v in views)

            await wait_until(both_listed, what="each controller listing both")
            listing = (await status(first))["controllers"]
            assert listing[0]["self"] and listing[0]["id"] == first.ctx.controller_id
            assert not listing[1]["self"] and listing[1]["address"].endswith(f":{config.controller.port}")

            # 4 slots in all, no queue: 4 long streams through each controller at once; the workers admit 4,
            # the rest are refused by the worker ("overloaded") and retried, then fail with 503: never 5 running
            async def one(controller: RunningController) -> str:
                try:
                    answer = await controller.client().chat.completions.create(
                        model="echo", messages=[{"role": "user", "content": words(40)}]
                    )
                except Exception as exc:  # the refused ones: an explicit 503
                    return type(exc).__name__
                return "ok" if answer.choices[0].message.content == words(40) else "corrupt"

            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    active = sum(w.service.admission.active for w in cluster.workers.values())
                    peak = max(peak, active)
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            outcomes = await asyncio.gather(*(one(c) for c in (first, second) for _ in range(4)))
            watcher.cancel()
            assert peak <= 4 and outcomes.count("ok") >= 4 and "corrupt" not in outcomes, (peak, outcomes)
            assert set(outcomes) <= {"ok", "InternalServerError", "APIStatusError"}, outcomes

            # the request monitor shows the whole tier, whichever controller answers, each request's controller
            for asked in (first, second):
                tier = await requests_listing(asked)
                assert tier["controllers"][0] == asked.ctx.controller_id and set(tier["controllers"]) == ids
                assert tier["unreachable"] == [] and tier["recent_capacity"] == 2 * config.controller.recent_requests
                served = [r["controller"] for r in tier["recent"]]
                assert len(served) == 8 and all(served.count(c) == 4 for c in ids), served
                ended = [r["started"] + r["total_ms"] / 1000 for r in tier["recent"]]
                assert ended == sorted(ended, reverse=True)
            assert len((await requests_listing(first, "?limit=3"))["recent"]) == 3

            await second.stop()  # says goodbye: forgotten at once, not after the offline timeout
            await wait_until(lambda: _only(first), what="the stopped controller forgotten")
        finally:
            await second.stop()


async def _only(controller: RunningController) -> bool:
    return list(await known_controllers(controller)) == [controller.ctx.controller_id]


async def test_a_silent_controller_is_listed_offline(cluster_config: Config, bus: Bus) -> None:
    async with Cluster(cluster_config) as cluster:
        controller = await cluster.start_controller()

        async def beating_and_listed() -> bool:  # a live controller heartbeats; then it falls silent
            await bus.publish(bus.subjects.controller_heartbeat, ControllerHeartbeat(controller_id="c-ghost"))
            return await _status_of(controller, "c-ghost", "online")

        await wait_until(beating_and_listed, what="the ghost listed online", interval=0.1)
        tier = await requests_listing(controller)  # the ghost is online but does not answer: named, not waited on
        assert tier["controllers"] == [controller.ctx.controller_id] and tier["unreachable"] == ["c-ghost"]
        await wait_until(lambda: _status_of(controller, "c-ghost", "offline"), what="the ghost listed offline")
        await bus.nc.publish(bus.subjects.controller_heartbeat, b'{"controller_id": 5}')  # malformed: dropped
        await wait_until(lambda: controller.bus.invalid_messages[bus.subjects.controller_heartbeat] == 1)


async def _status_of(controller: RunningController, controller_id: str, wanted: str) -> bool:
    return (await known_controllers(controller)).get(controller_id) == wanted


def test_the_requests_table_names_each_requests_controller_only_for_a_tier() -> None:
    record = {"id": "chatcmpl-1", "key": None, "model": "echo", "worker": "w1", "state": "ok", "total_ms": 12.0}
    alone = format_requests({"in_flight": [], "recent": [record], "controllers": ["c1"], "unreachable": []})
    assert "controller" not in alone.splitlines()[0]
    tier = format_requests(
        {"in_flight": [], "recent": [record | {"controller": "c2"}], "controllers": ["c1", "c2"], "unreachable": ["c3"]}
    )
    header, row, missing = tier.splitlines()
    assert header.split()[4] == "controller" and row.split()[4] == "c2"
    assert missing == "not answering (their requests are missing): c3"
