"""Several machines, for real: a three-node NATS cluster (three nats-server processes joined by cluster routes)
with the controller on node 1 and a worker on each of nodes 2 and 3.

Run as root with ``ip`` available, each node is a network namespace of its own with its own address (a
"machine"); otherwise the nodes are told apart by loopback ports. Every client is given every node's URL, its
own node first, with ``nats.randomize_servers = false`` so it prefers that node and fails over in order.
NATS clustering is the distributed engine; we write none of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from cluster_harness import wait_until
from fault_harness import (
    Controller,
    Machines,
    NatsNode,
    Proc,
    Processes,
    failure_kinds,
    make_machines,
    remote_endpoints,
    start_load,
    tally,
)

from mlxcluster.bus import connect_options
from mlxcluster.config import from_dict

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

DEADLINE_S = 30.0
ORDERED = {"MLXCLUSTER_NATS_RANDOMIZE_SERVERS": "false"}


def test_randomize_servers_false_keeps_the_url_order() -> None:
    options = connect_options(from_dict({"nats": {"randomize_servers": False}}).nats, name="n")
    assert options["dont_randomize"] is True
    assert connect_options(from_dict({}).nats, name="n")["dont_randomize"] is False


@pytest.fixture
def machines() -> Iterator[Machines]:
    made = make_machines(3)
    try:
        yield made
    finally:
        made.close()


def connected_node(proc: Proc, nodes: list[NatsNode]) -> str | None:
    """The node ``proc`` holds its one NATS connection to (``None``: none, or several)."""
    by_address = {(node.host, node.port): node.name for node in nodes}
    found = {by_address[end] for end in remote_endpoints(proc.pid) if end in by_address}
    return found.pop() if len(found) == 1 else None


async def wait_routes(nodes: list[NatsNode], timeout: float = 20.0) -> None:
    """Wait until a message published on each node reaches a subscriber on every other node."""
    clients = [await nats.connect(servers=[n.url], dont_randomize=True, allow_reconnect=False) for n in nodes]
    try:
        seen: set[tuple[int, int]] = set()

        def receiver(index: int):  # type: ignore[no-untyped-def]
            async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
                seen.add((int(msg.data), index))

            return on_message

        for index, client in enumerate(clients):
            await client.subscribe(f"routes.check.{index}", cb=receiver(index))
            await client.flush()
        wanted = {(a, b) for a in range(len(nodes)) for b in range(len(nodes)) if a != b}

        async def every_path() -> bool:
            for a, b in wanted - seen:
                await clients[a].publish(f"routes.check.{b}", str(a).encode())
            for client in clients:
                await client.flush()
            await asyncio.sleep(0.05)
            return wanted <= seen

        await wait_until(every_path, timeout, "routes between every pair of nodes", interval=0.1)
    finally:
        for client in clients:
            await client.close()


async def served(controller: Controller, worker_id: str) -> int:
    view = await controller.worker(worker_id)
    return view["requests_total"] if view else 0


async def served_more(controller: Controller, worker_id: str, than: int) -> bool:
    return await served(controller, worker_id) > than


async def in_flight(controller: Controller) -> bool:
    status, body = await controller.get("/api/cluster/status")
    return status == 200 and body["requests"]["in_flight"] > 0


async def test_three_node_nats_cluster_survives_losing_a_node(tmp_path: Path, machines: Machines) -> None:
    procs = Processes(tmp_path)
    try:
        n1, n2, n3 = nodes = await procs.nats_cluster(machines, 3)
        reach_n1 = machines.runner(0)
        await (reach_n1(wait_routes(nodes)) if reach_n1 else wait_routes(nodes))
        controller = procs.controller([n1.url, n2.url, n3.url], machines=machines, machine=0, **ORDERED)
        workers = {
            "w-n2": procs.worker("w-n2", [n2.url, n1.url, n3.url], prefix=machines.prefix(1), **ORDERED),
            "w-n3": procs.worker("w-n3", [n3.url, n1.url, n2.url], prefix=machines.prefix(2), **ORDERED),
        }
        await controller.wait_status(workers, "online")
        placement = {name: connected_node(p, nodes) for name, p in {"controller": controller.proc, **workers}.items()}
        assert placement == {"controller": "n1", "w-n2": "n2", "w-n3": "n3"}

        # requests cross the routes: the controller is on n1, the workers on n2 and n3
        across = await controller.batch(30, 10, DEADLINE_S)
        assert tally(across) == {"ok": 30}, tally(across)
        assert await served(controller, "w-n2") > 0 and await served(controller, "w-n3") > 0

        # lose n2 under load: its worker fails over to n1 (next in its list) and serves on, the same process
        pid = workers["w-n2"].pid
        load = start_load(procs, controller, clients=20, per_client=200, words=10, deadline_s=DEADLINE_S, duration_s=8)
        await wait_until(lambda: in_flight(controller), 30, "load running", interval=0.05)
        assert n2.proc is not None
        killed_at = time.monotonic()
        n2.proc.kill()
        await wait_until(lambda: connected_node(workers["w-n2"], nodes) == "n1", 15, "w-n2 on n1", interval=0.05)
        moved_s = time.monotonic() - killed_at
        await asyncio.sleep(0.5)  # heartbeats sent before the kill are in; count what it serves from now on
        before = await served(controller, "w-n2")
        await wait_until(lambda: served_more(controller, "w-n2", before), 30, "w-n2 serving again", interval=0.1)
        serving_s = time.monotonic() - killed_at
        outcomes = await load.outcomes()
        view = await controller.worker("w-n2")
        after = await controller.batch(30, 10, DEADLINE_S)
        print(
            f"\nnats cluster ({machines.kind}): w-n2 reconnected to n1 {moved_s:.2f}s after n2 died and served again "
            f"after {serving_s:.2f}s; load during the loss {dict(tally(outcomes))} {failure_kinds(outcomes)}; "
            f"after: {dict(tally(after))}"
        )
        bad = [o for o in outcomes if o.kind not in ("ok", "sse_error", "http_error")]
        assert not bad, f"requests lost silently or hung: {tally(bad)}; first: {bad[0]}"
        assert tally(outcomes)["ok"] >= 0.9 * len(outcomes), tally(outcomes)
        assert tally(after) == {"ok": 30}, tally(after)
        assert workers["w-n2"].alive and workers["w-n2"].pid == pid, "the worker was restarted"
        assert view is not None and view["status"] == "online"
        assert connected_node(controller.proc, nodes) == "n1" and connected_node(workers["w-n3"], nodes) == "n3"
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()
