"""Garbage on every NATS subject: raw bytes and wrong-typed msgspec payloads (another message's JSON, wrong
field types, numbers beyond int64, missing fields, hostile worker ids). The controller and the worker drop
each one, count it (``invalid_messages_total`` in ``/api/cluster/status``, the worker bus's counter) and
keep serving: a chat request succeeds afterwards.

A frame published to a response subject for which no request is open is ignored without being counted:
late frames of abandoned streams arrive there routinely (a client that went away, a retried attempt), so
they are not "invalid". A garbage frame inside an open stream is counted and skipped; the stream goes on.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cluster_harness import (
    Cluster,
    FakeWorker,
    RunningController,
    RunningWorker,
    barrier,
    single_worker_cluster,
    wait_until,
)
from nats.aio.msg import Msg

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import (
    Accepted,
    Announce,
    Cancel,
    Capabilities,
    Deregister,
    Done,
    Frame,
    InferenceRequest,
    ProtocolError,
    Token,
    WorkerHeartbeat,
    WorkerRegistration,
    decode,
    encode,
)

USER = [{"role": "user", "content": "still serving"}]
HUGE = 10**30  # beyond int64
HUGE_FLOAT = b"1e400"  # beyond float64 (Python's json would write Infinity)


def raw_garbage(max_payload: int) -> list[bytes]:
    """Bytes that are no message of any type."""
    noise = random.Random(6).randbytes(4096)
    nested = b'{"worker_id": "w", "request_id": "r", "model": "echo", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    return [
        b"",
        b"\x00",
        b"\xff\xfe\xfd\xfc",
        noise,
        b"{",
        b"null",
        b"[]",
        b"42",
        b'"a string"',
        b"true",
        b'{"worker_id": "w\xff", "request_id": "r\xff", "controller_id": "c\xff", "model": "echo"}',  # bad UTF-8
        b'{"worker_id": "w", "request_id": "r", "model": "echo"} trailing',
        nested,  # deeper than the decoder's recursion limit
        b"\x00" * (max_payload - 4096),  # as big as the bus allows
    ]


def as_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


# Valid JSON that is not a valid message of the subject's type. Every payload is checked to really be invalid
# for its type (``test_the_payloads_are_invalid``), so the expected counts are exact.
WRONG_TYPED: dict[str, tuple[Any, list[bytes]]] = {
    "register": (
        WorkerRegistration,
        [
            b"{}",
            encode(Announce(controller_id="c-1")),
            encode(Token(text="hi")),
            as_json({"worker_id": 5}),
            as_json({"worker_id": None}),
            as_json({"worker_id": ["w"]}),
            as_json({"worker_id": "ghost", "capabilities": {"models": "echo"}}),
            as_json({"worker_id": "ghost", "capabilities": {"models": ["echo"], "max_concurrent": HUGE}}),
            as_json({"worker_id": "ghost", "capabilities": {"models": ["echo"], "max_concurrent": -1}}),
            as_json({"worker_id": "ghost", "hardware": "fast"}),
            as_json({"worker_id": "ghost", "hardware": {"cpu_cores": HUGE}}),
            b'{"worker_id": "ghost", "hardware": {"memory_gb": ' + HUGE_FLOAT + b"}}",
            as_json({"worker_id": "ghost", "started_at": "yesterday"}),
            as_json({"worker_id": "evil worker", "capabilities": {"models": ["echo"]}}),
            as_json({"worker_id": "evil.*", "capabilities": {"models": ["echo"]}}),
            as_json({"worker_id": "evil.>", "capabilities": {"models": ["echo"]}}),
            as_json({"worker_id": "", "capabilities": {"models": ["echo"]}}),
            as_json({"worker_id": "e\r\nPUB x 1\r\n", "capabilities": {"models": ["echo"]}}),
            as_json({"worker_id": "w" * 300, "capabilities": {"models": ["echo"]}}),
        ],
    ),
    "heartbeat": (
        WorkerHeartbeat,
        [
            b"{}",
            encode(Cancel(request_id="r-1")),
            as_json({"worker_id": 1}),
            as_json({"worker_id": "ghost", "status": "exploded", "models_loaded": ["echo"]}),
            as_json({"worker_id": "ghost", "active": "many", "models_loaded": ["echo"]}),
            as_json({"worker_id": "ghost", "active": HUGE, "models_loaded": ["echo"]}),
            as_json({"worker_id": "w1", "queued": HUGE}),  # the real worker's id: must not poison its entry
            as_json({"worker_id": "w1", "active": -5}),
            b'{"worker_id": "ghost", "tokens_per_second": ' + HUGE_FLOAT + b', "models_loaded": ["echo"]}',
            as_json({"worker_id": "ghost", "models_loaded": "echo"}),
            as_json({"worker_id": "ghost", "rss_bytes": 1.5}),
            as_json({"worker_id": "evil worker", "models_loaded": ["echo"]}),
        ],
    ),
    "deregister": (
        Deregister,
        [
            b"{}",
            encode(
                Token(text="not a deregister")
            ),  # another message's JSON (an Accepted would be valid: it has worker_id)
            as_json({"worker_id": 3}),
            as_json({"worker_id": "w1", "reason": {"why": "no"}}),
            as_json({"worker_id": "w1 "}),
        ],
    ),
    "announce": (
        Announce,
        [b"{}", encode(Deregister(worker_id="w1")), as_json({"controller_id": 5}), as_json({"controller_id": None})],
    ),
    "inference": (
        InferenceRequest,
        [
            b"{}",
            encode(WorkerHeartbeat(worker_id="w1")),
            as_json({"request_id": "r", "model": 5}),
            as_json({"request_id": "r", "model": "echo", "max_tokens": "many"}),
            as_json({"request_id": "r", "model": "echo", "max_tokens": HUGE}),
            as_json({"request_id": "r", "model": "echo", "messages": "hi"}),
            as_json({"request_id": "r", "model": "echo", "messages": [{"content": "no role"}]}),
            as_json({"request_id": "r", "model": "echo", "sampling": {"temperature": "hot"}}),
            as_json({"request_id": "r", "model": "echo", "stop": "not a list"}),
            b'{"request_id": "r", "model": "echo", "deadline": ' + HUGE_FLOAT + b"}",
        ],
    ),
    "cancel": (
        Cancel,
        [b"{}", encode(Announce(controller_id="c")), as_json({"request_id": 7}), as_json({"request_id": None})],
    ),
}


@pytest.fixture
async def cluster(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    async with single_worker_cluster(cluster_config) as running:
        yield running


def parts(cluster: Cluster) -> tuple[RunningController, RunningWorker]:
    assert cluster.controller is not None
    return cluster.controller, cluster.workers["w1"]


async def controller_invalid_total(controller: RunningController) -> int:
    async with controller.session().get(controller.url + "/api/cluster/status") as resp:
        assert resp.status == 200
        return (await resp.json())["nats"]["invalid_messages_total"]


async def serves(controller: RunningController, text: str = "still serving") -> None:
    completion = await controller.client().chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}]
    )
    assert completion.choices[0].message.content == text


def subject_for(bus: Bus, name: str, worker_id: str = "w1") -> str:
    subjects = bus.subjects
    return {
        "register": subjects.register,
        "heartbeat": subjects.heartbeat,
        "deregister": subjects.deregister,
        "announce": subjects.announce,
        "inference": subjects.inference(worker_id),
        "cancel": subjects.cancel(worker_id),
    }[name]


@pytest.mark.parametrize("name", list(WRONG_TYPED))
def test_the_payloads_are_invalid(name: str) -> None:
    message_type, payloads = WRONG_TYPED[name]
    for payload in [*payloads, *raw_garbage(64 * 1024)]:
        with pytest.raises(ProtocolError):
            decode(payload, message_type)


async def test_garbage_on_every_subject_is_dropped_counted_and_survived(cluster: Cluster, bus: Bus) -> None:
    controller, worker = parts(cluster)
    garbage = raw_garbage(bus.max_payload)
    expected_controller = expected_worker = 0
    for name, (_, wrong_typed) in WRONG_TYPED.items():
        subject = subject_for(bus, name)
        for payload in [*garbage, *wrong_typed]:
            # Inference requests also come with a reply subject, as the controller sends them.
            await bus.nc.publish(subject, payload, reply=bus.nc.new_inbox() if name == "inference" else "")
        sent = len(garbage) + len(wrong_typed)
        if name in ("register", "heartbeat", "deregister", "announce"):  # controllers hear each other's announce
            expected_controller += sent
        if name in ("announce", "inference", "cancel"):
            expected_worker += sent
    await barrier(bus)

    await wait_until(lambda: worker.bus.invalid_messages_total >= expected_worker, what="the worker to count all")

    async def controller_counted() -> bool:
        return await controller_invalid_total(controller) >= expected_controller

    await wait_until(controller_counted, what="the controller to count all")
    assert await controller_invalid_total(controller) == expected_controller
    assert worker.bus.invalid_messages_total == expected_worker
    subjects = bus.subjects
    assert set(controller.bus.invalid_messages) == {
        subjects.register,
        subjects.heartbeat,
        subjects.deregister,
        subjects.announce,
    }
    assert set(worker.bus.invalid_messages) == {subjects.announce, subjects.inference("w1"), subjects.cancel("w1")}

    # Nothing registered from the garbage, the real worker's entry is intact, both nodes serve.
    workers = await controller.workers()
    assert [w["id"] for w in workers] == ["w1"], workers
    assert workers[0]["status"] == "online" and workers[0]["load"] == 0
    assert worker.service.requests_total == 0
    for i in range(3):
        await serves(controller, f"still serving {i}")
    assert worker.service.requests_total == 3


async def test_hostile_but_valid_registrations_do_not_break_dispatch(cluster: Cluster, bus: Bus) -> None:
    """Workers that register for the model but never answer, with extreme (in-range) numbers: requests are
    retried onto the real worker; status and worker list still render."""
    controller, _ = parts(cluster)
    int64_max = 2**63 - 1
    capabilities = Capabilities(models=["echo"], max_concurrent=int64_max, max_queue=int64_max)
    for worker_id in ("ghost-a", "ghost.b", "ghost-\u00e9\U0001f600"):
        await bus.publish(bus.subjects.register, WorkerRegistration(worker_id=worker_id, capabilities=capabilities))
        heartbeat = WorkerHeartbeat(
            worker_id=worker_id,
            active=int64_max,
            queued=int64_max,
            tokens_per_second=1e308,
            available_memory_gb=1e308,
            models_loaded=["echo"],
        )
        await bus.publish(bus.subjects.heartbeat, heartbeat)
    await barrier(bus)
    await wait_until(lambda: controller.ctx.registry.stats().total == 4, what="the ghosts to register")
    for i in range(4):
        await serves(controller, f"past the ghosts {i}")
    async with controller.session().get(controller.url + "/api/cluster/status") as resp:
        assert resp.status == 200
        status = await resp.json()
    assert status["workers"]["total"] == 4
    assert status["nats"]["invalid_messages_total"] == 0  # valid messages, just unhelpful ones
    for worker in await controller.workers():
        async with controller.session().get(f"{controller.url}/api/cluster/workers/{worker['id']}") as resp:
            assert resp.status == 200, worker["id"]


async def test_stray_frames_on_the_response_inbox_are_ignored(cluster: Cluster, bus: Bus) -> None:
    """No request open for the subject: dropped without counting (late frames of abandoned streams land here)."""
    controller, _ = parts(cluster)
    inbox = bus.subjects.response(controller.ctx.controller_id, "no-such-request.1")
    for payload in [*raw_garbage(bus.max_payload), encode(Token(text="stray")), encode(Done())]:
        await bus.nc.publish(inbox, payload)
    await barrier(bus)
    await serves(controller)  # the inbox subscription is still alive and routes real frames
    assert controller.ctx.dispatcher.inbox.open_count == 0
    assert await controller_invalid_total(controller) == 0


async def test_garbage_inside_an_open_stream_is_counted_and_skipped(
    cluster: Cluster, nats_server: EmbeddedNatsServer
) -> None:
    """A worker (here a fake one) that mixes garbage into its frames: the stream still completes."""
    controller, real = parts(cluster)
    await real.stop()  # only the fake serves "echo" now
    await wait_until(lambda: controller.ctx.registry.stats().total == 0, what="w1 to leave")
    garbage = [b"\xff", b"{", b"null", encode(WorkerHeartbeat(worker_id="x")), as_json({"type": "token", "text": 5})]

    async def noisy(fake: FakeWorker, request: InferenceRequest, msg: Msg) -> None:
        frames: list[Frame] = [Accepted(worker_id=fake.id), Token(text="one"), Token(text=" two", seq=1), Done()]
        for frame in frames:
            for junk in garbage:
                await fake.bus.nc.publish(msg.reply, junk)
            await fake.send(msg, frame)

    await cluster.start_fake("noisy", noisy)
    await controller.wait_online("noisy")
    completion = await controller.client().chat.completions.create(model="echo", messages=USER)
    assert completion.choices[0].message.content == "one two"
    assert await controller_invalid_total(controller) == len(garbage) * 4
