"""Dispatch on the real nats-server: retry before the first token, an error frame after it, circuit
breakers, timeouts, the NATS payload limit, and cancellation when the client goes away.

Misbehaving workers are :class:`~cluster_harness.FakeWorker` s: they register and heartbeat like real
ones (so the controller routes to them) but answer requests wrongly, or not at all. A static
``[[workers.static]]`` entry with a higher priority makes the controller try a fake first.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from cluster_harness import (
    Cluster,
    FakeWorker,
    barrier,
    chat_request,
    ignore,
    sse_events,
    wait_until,
    with_sections,
    words,
)
from loopback import make_config
from nats.aio.msg import Msg

from mlxcluster.api import RequestFinished, RequestMigrated, RequestRetried
from mlxcluster.bus import Bus
from mlxcluster.config import Config, StaticWorker
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.metering.dispatch_stats import DispatchStats
from mlxcluster.controller.routing.breaker import Breakers
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import Accepted, Cancel, Deregister, Done, Error, InferenceRequest, Token

USER = [{"role": "user", "content": "hello brave new world"}]
ANSWER = "hello brave new world"


def preferring(config: Config, *worker_ids: str, **controller: object) -> Config:
    """``config`` where ``worker_ids`` have priority 10 (tried before the real workers)."""
    static = [StaticWorker(name=worker_id, priority=10) for worker_id in worker_ids]
    return with_sections(config, workers={"static": static}, controller=controller)


async def breaker_state(cluster: Cluster, worker_id: str) -> str:
    assert cluster.controller is not None
    async with cluster.controller.session().get(f"{cluster.controller.url}/api/cluster/workers/{worker_id}") as resp:
        return (await resp.json())["breaker"]


# --- retry before the first token -------------------------------------------------------------


async def test_no_responders_is_retried_on_another_worker(cluster_config: Config, bus: Bus) -> None:
    async with Cluster(preferring(cluster_config, "w-ghost")) as cluster:
        real = await cluster.start_worker("w-real")
        await cluster.start_fake("w-ghost", None)  # registered, heartbeating, nobody on its inference subject
        controller = await cluster.start_controller()
        await controller.wait_online("w-real", "w-ghost")
        client = controller.client()
        stats = controller.ctx.dispatcher.stats

        started = time.monotonic()
        completion = await client.chat.completions.create(model="echo", messages=USER)
        assert completion.choices[0].message.content == ANSWER
        assert time.monotonic() - started < cluster_config.controller.accept_timeout_s  # "no responders": at once
        assert stats.retries >= 1
        assert controller.served() == {"w-real": 1}
        assert real.service.requests_total == 1

        # Each try failed the ghost's breaker; after the threshold it is skipped without a try.
        for _ in range(Breakers().threshold - 1):
            await client.chat.completions.create(model="echo", messages=USER)
        assert await breaker_state(cluster, "w-ghost") == "open"
        retries = stats.retries
        await client.chat.completions.create(model="echo", messages=USER)
        assert stats.retries == retries
        assert stats.failed == 0


async def test_worker_that_never_accepts_is_retried_and_its_breaker_opens(cluster_config: Config, bus: Bus) -> None:
    accept_timeout_s = 0.3
    async with Cluster(preferring(cluster_config, "w-silent", accept_timeout_s=accept_timeout_s)) as cluster:
        await cluster.start_worker("w-real")
        silent = await cluster.start_fake("w-silent", ignore)
        controller = await cluster.start_controller()
        await controller.wait_online("w-real", "w-silent")
        client = controller.client()
        threshold = Breakers().threshold

        for n in range(1, threshold + 1):
            started = time.monotonic()
            completion = await client.chat.completions.create(model="echo", messages=USER)
            elapsed = time.monotonic() - started
            assert completion.choices[0].message.content == ANSWER
            assert elapsed >= accept_timeout_s * 0.9
            assert len(silent.received) == n
        # The controller told the silent worker to forget each request it gave up on.
        await wait_until(lambda: len(silent.cancels) == threshold)
        assert {json.loads(c)["request_id"] for c in silent.cancels} == {r.request_id for r in silent.received}
        assert await breaker_state(cluster, "w-silent") == "open"

        await client.chat.completions.create(model="echo", messages=USER)
        assert len(silent.received) == threshold  # skipped while its breaker is open
        assert controller.ctx.dispatcher.stats.retries == threshold


async def overloaded(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Error(code="overloaded", message="queue full", retryable=True))


async def test_never_the_same_worker_twice(cluster_config: Config, bus: Bus) -> None:
    config = preferring(cluster_config, "w-f1", "w-f2", max_attempts=5)
    async with Cluster(config) as cluster:
        fakes = [await cluster.start_fake(worker_id, overloaded) for worker_id in ("w-f1", "w-f2")]
        controller = await cluster.start_controller()
        await controller.wait_online("w-f1", "w-f2")
        with pytest.raises(openai.InternalServerError) as caught:
            await controller.client().chat.completions.create(model="echo", messages=USER)
        assert caught.value.status_code == 503
        assert caught.value.code == "no_capacity"
        assert "w-f1" in caught.value.message and "w-f2" in caught.value.message
        assert caught.value.response.headers.get("Retry-After")
        assert [len(f.received) for f in fakes] == [1, 1]
        stats = controller.ctx.dispatcher.stats
        assert stats.failed == 1 and stats.retries == 1 and stats.in_flight == 0


async def test_attempts_are_bounded_by_max_attempts(cluster_config: Config, bus: Bus) -> None:
    ids = ("w-f1", "w-f2", "w-f3")
    config = preferring(cluster_config, *ids, max_attempts=2)
    async with Cluster(config) as cluster:
        fakes = [await cluster.start_fake(worker_id, overloaded) for worker_id in ids]
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online(*ids, "w-real")
        with pytest.raises(openai.InternalServerError):
            await controller.client().chat.completions.create(model="echo", messages=USER)
        assert sum(len(f.received) for f in fakes) == 2
        assert all(len(f.received) <= 1 for f in fakes)
        assert cluster.workers["w-real"].service.requests_total == 0  # lower priority, never reached


async def test_retryable_error_from_a_real_worker_is_retried(cluster_config: Config, bus: Bus) -> None:
    """A real worker with no queue refuses with a retryable 'overloaded'; the request lands elsewhere."""
    full = with_sections(cluster_config, worker={"max_concurrent": 1, "max_queue": 0})
    async with Cluster(preferring(cluster_config, "w-full")) as cluster:
        busy = await cluster.start_worker("w-full", config=full, token_delay_ms=30)
        await cluster.start_worker("w-free")
        controller = await cluster.start_controller()
        await controller.wait_online("w-full", "w-free")
        client = controller.client()
        hog = asyncio.create_task(
            client.chat.completions.create(model="echo", messages=[{"role": "user", "content": words(20)}])
        )
        await wait_until(lambda: busy.service.admission.active == 1)
        completion = await client.chat.completions.create(model="echo", messages=USER)
        assert completion.choices[0].message.content == ANSWER
        assert cluster.workers["w-free"].service.requests_total == 1
        assert (await hog).choices[0].message.content == words(20)


async def accept_then_leave(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await asyncio.sleep(0.5)  # a moment later (the controller waits for the first token by then)...
    fake.heartbeating = False  # ...it leaves
    await fake.bus.publish(fake.bus.subjects.deregister, Deregister(worker_id=fake.id, reason="leaving"))


async def test_a_worker_leaving_wakes_the_request_waiting_on_it(cluster_config: Config, bus: Bus) -> None:
    """The registry pushes "offline" to the streams waiting on a worker: the request goes to another worker
    at once, not after ``first_token_timeout_s`` (nothing polls the registry)."""
    async with Cluster(preferring(cluster_config, "w-leaving", first_token_timeout_s=60)) as cluster:
        await cluster.start_fake("w-leaving", accept_then_leave)
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-leaving", "w-real")
        create = controller.client().chat.completions.create(model="echo", messages=USER)
        completion = await asyncio.wait_for(create, 20)
        assert completion.choices[0].message.content == ANSWER
        assert controller.served() == {"w-real": 1}
        assert controller.ctx.dispatcher.stats.retries == 1


# --- after the first token --------------------------------------------------------------------


async def token_then_vanish(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Token(text="hello", seq=0))
    fake.heartbeating = False  # and never another word: the registry will mark it offline


async def test_worker_lost_after_first_token_ends_the_stream_with_an_error_when_migration_is_off(
    cluster_config: Config, bus: Bus
) -> None:
    """``controller.migration_limit = 0``: a started stream is never moved (tests/test_migration.py moves it)."""
    async with Cluster(preferring(cluster_config, "w-flaky", migration_limit=0)) as cluster:
        await cluster.start_fake("w-flaky", token_then_vanish)
        real = await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky", "w-real")
        body = {"model": "echo", "messages": USER, "stream": True}
        started = time.monotonic()
        async with controller.session().post(controller.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            events = [e async for e in sse_events(resp)]
        assert time.monotonic() - started < 5  # offline timeout 1 s + sweep (pushed), not request_timeout_s
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p.get("choices"))
        assert text == "hello"
        error = payloads[-1]["error"]
        assert error["code"] == "worker_lost" and "w-flaky" in error["message"]
        assert real.service.requests_total == 0  # never retried once a token went out
        assert controller.ctx.dispatcher.stats.in_flight == 0


async def test_worker_lost_mid_stream_through_the_openai_client(cluster_config: Config, bus: Bus) -> None:
    async with Cluster(preferring(cluster_config, "w-flaky")) as cluster:
        await cluster.start_fake("w-flaky", token_then_vanish)
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky")
        stream = await controller.client().chat.completions.create(model="echo", messages=USER, stream=True)
        received: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
        assert received == ["hello"]
        assert "stopped responding" in caught.value.message


async def test_worker_lost_mid_answer_non_stream_is_502(cluster_config: Config, bus: Bus) -> None:
    async with Cluster(preferring(cluster_config, "w-flaky")) as cluster:
        await cluster.start_fake("w-flaky", token_then_vanish)
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky")
        with pytest.raises(openai.APIStatusError) as caught:
            await controller.client().chat.completions.create(model="echo", messages=USER)
        assert caught.value.status_code == 502
        assert caught.value.code == "worker_lost"


async def garbled(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.bus.nc.publish(msg.reply, b"\x00 not a frame")
    await fake.send(msg, Token(text="fine", seq=0))
    await fake.send(msg, Done())


async def test_malformed_frame_is_dropped_and_counted(cluster_config: Config, bus: Bus) -> None:
    async with Cluster(cluster_config) as cluster:
        await cluster.start_fake("w-garbled", garbled)
        controller = await cluster.start_controller()
        await controller.wait_online("w-garbled")
        completion = await controller.client().chat.completions.create(model="echo", messages=USER)
        assert completion.choices[0].message.content == "fine"
        assert controller.bus.invalid_messages_total == 1


# --- timeouts ---------------------------------------------------------------------------------


async def accept_only(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))


async def test_first_token_timeout_is_an_error_not_a_hang(cluster_config: Config, bus: Bus) -> None:
    config = with_sections(cluster_config, controller={"first_token_timeout_s": 0.5})
    async with Cluster(config) as cluster:
        mute = await cluster.start_fake("w-mute", accept_only)
        controller = await cluster.start_controller()
        await controller.wait_online("w-mute")
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await controller.client().chat.completions.create(model="echo", messages=USER)
        assert time.monotonic() - started < 3
        assert caught.value.status_code in (503, 504)
        assert "first token" in caught.value.message
        await wait_until(lambda: len(mute.cancels) == 1)


async def test_first_token_timeout_is_retried_on_another_worker(cluster_config: Config, bus: Bus) -> None:
    config = preferring(cluster_config, "w-mute", first_token_timeout_s=0.5)
    async with Cluster(config) as cluster:
        await cluster.start_fake("w-mute", accept_only)
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-mute", "w-real")
        completion = await controller.client().chat.completions.create(model="echo", messages=USER)
        assert completion.choices[0].message.content == ANSWER
        assert controller.ctx.dispatcher.stats.retries == 1


async def token_then_stall(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Token(text="hello", seq=0))  # ...and stays online, silent


async def test_request_timeout_mid_stream_ends_with_an_error_event(cluster_config: Config, bus: Bus) -> None:
    config = with_sections(cluster_config, controller={"request_timeout_s": 1.0})
    async with Cluster(config) as cluster:
        await cluster.start_fake("w-stall", token_then_stall)
        controller = await cluster.start_controller()
        await controller.wait_online("w-stall")
        body = {"model": "echo", "messages": USER, "stream": True}
        started = time.monotonic()
        async with controller.session().post(controller.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            events = [e async for e in sse_events(resp)]
        assert time.monotonic() - started < 5
        assert events[-1] == "[DONE]", events
        error = json.loads(events[-2])["error"]
        assert error["code"] == "timeout", error


async def test_request_timeout_non_stream_is_504(cluster_config: Config, bus: Bus) -> None:
    config = with_sections(cluster_config, controller={"request_timeout_s": 1.0})
    async with Cluster(config) as cluster:
        await cluster.start_fake("w-stall", token_then_stall)
        controller = await cluster.start_controller()
        await controller.wait_online("w-stall")
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await controller.client().chat.completions.create(model="echo", messages=USER)
        assert caught.value.status_code == 504
        assert time.monotonic() - started < 5


# --- payload limit ----------------------------------------------------------------------------


@pytest.fixture
async def small_payload() -> AsyncIterator[Config]:
    """A nats-server whose max_payload is 64 KiB."""
    config = make_config(
        nats={"max_payload": 65536}, discovery={"heartbeat_interval_ms": 200, "offline_timeout_ms": 1000}
    )
    async with EmbeddedNatsServer(config.nats):
        yield config


async def test_request_larger_than_max_payload_is_413(small_payload: Config) -> None:
    async with Cluster(small_payload) as cluster:
        worker = await cluster.start_worker("w1")
        controller = await cluster.start_controller()
        await controller.wait_online("w1")
        assert controller.bus.max_payload == 65536
        client = controller.client()
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x" * 70_000}])
        assert time.monotonic() - started < 2  # refused, not timed out
        assert caught.value.status_code == 413
        assert caught.value.code == "payload_too_large"
        assert "max_payload" in caught.value.message
        assert worker.service.requests_total == 0
        # Below the limit is fine.
        big_word = "y" * 30_000
        completion = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": big_word}]
        )
        assert completion.choices[0].message.content == big_word


async def record_cancels(bus: Bus, worker_id: str) -> list[Cancel]:
    """Every Cancel the controller sends to ``worker_id``, as it arrives."""
    cancels: list[Cancel] = []

    async def on_cancel(cancel: Cancel, _msg: Msg) -> None:
        cancels.append(cancel)

    await bus.subscribe(bus.subjects.cancel(worker_id), Cancel, on_cancel)
    await barrier(bus)
    return cancels


# --- the client going away --------------------------------------------------------------------


async def test_client_disconnect_cancels_the_request_on_the_worker(cluster_config: Config, bus: Bus) -> None:
    cancels = await record_cancels(bus, "w-slow")
    async with Cluster(cluster_config) as cluster:
        worker = await cluster.start_worker("w-slow", token_delay_ms=30)
        controller = await cluster.start_controller()
        await controller.wait_online("w-slow")
        body = {"model": "echo", "messages": [{"role": "user", "content": words(300)}], "stream": True}
        resp = await controller.session().post(controller.url + "/v1/chat/completions", json=body)
        seen = 0
        async for _event in sse_events(resp):
            seen += 1
            if seen == 4:
                break
        assert worker.service.in_flight
        resp.close()  # the client hangs up mid-stream
        await wait_until(lambda: not worker.service.in_flight, timeout=3, what="the worker to stop generating")
        assert worker.service.tokens_total < 300
        await wait_until(lambda: cancels, timeout=2)
        assert cancels[0].request_id.startswith("chatcmpl-")
        ctx = controller.ctx
        await wait_until(lambda: ctx.dispatcher.stats.in_flight == 0 and ctx.dispatcher.inbox.open_count == 0)
        assert ctx.registry.stats().inflight == 0


async def test_closing_the_dispatch_stream_cancels_at_once(cluster_config: Config, bus: Bus) -> None:
    """Closing the frame iterator (what the route does when its client is gone) sends Cancel before it returns."""
    cancels = await record_cancels(bus, "w-slow")
    async with Cluster(cluster_config) as cluster:
        worker = await cluster.start_worker("w-slow", token_delay_ms=30)
        controller = await cluster.start_controller()
        await controller.wait_online("w-slow")
        ctx = controller.ctx
        request = chat_request(words(300), request_id="direct-1")
        frames = ctx.dispatcher.stream(request)
        assert isinstance(await anext(frames), Token)
        assert isinstance(await anext(frames), Token)
        await frames.aclose()  # type: ignore[attr-defined]
        # Bookkeeping is released synchronously with the close, not whenever the garbage collector runs.
        assert ctx.dispatcher.stats.in_flight == 0
        assert ctx.dispatcher.inbox.open_count == 0
        assert ctx.registry.stats().inflight == 0
        await wait_until(lambda: [c for c in cancels if c.request_id == "direct-1"], timeout=2)
        await wait_until(lambda: not worker.service.in_flight, timeout=2)


async def test_dispatch_stream_direct(cluster_config: Config, bus: Bus) -> None:
    async with Cluster(cluster_config) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller()
        await controller.wait_online("w1")
        dispatcher = controller.ctx.dispatcher
        frames = [f async for f in dispatcher.stream(chat_request("a b c"))]
        assert [f.text for f in frames if isinstance(f, Token)] in (["a", " b", " c"], ["a b c"])
        assert isinstance(frames[-1], Done) and frames[-1].usage.completion_tokens == 3
        with pytest.raises(ApiError) as caught:
            [f async for f in dispatcher.stream(chat_request("x", model="unknown"))]
        assert caught.value.status == 404


# --- breakers (fake clock) --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures() -> None:
    clock = FakeClock()
    breakers = Breakers(threshold=3, cooldown_s=5, clock=clock)
    assert breakers.state("w") == "closed" and breakers.allows("w")
    breakers.record_failure("w")
    breakers.record_failure("w")
    assert breakers.state("w") == "closed" and breakers.open_ids() == set()
    breakers.record_failure("w")
    assert breakers.state("w") == "open"
    assert not breakers.allows("w")
    assert breakers.open_ids() == {"w"}
    assert breakers.allows("other") and breakers.state("other") == "closed"


def test_success_resets_the_failure_count() -> None:
    breakers = Breakers(threshold=3, cooldown_s=5, clock=FakeClock())
    breakers.record_failure("w")
    breakers.record_failure("w")
    breakers.record_success("w")
    breakers.record_failure("w")
    breakers.record_failure("w")
    assert breakers.state("w") == "closed"


def test_half_open_allows_a_single_trial() -> None:
    clock = FakeClock()
    breakers = Breakers(threshold=2, cooldown_s=5, clock=clock)
    breakers.record_failure("w")
    breakers.record_failure("w")
    clock.now += 4.9
    assert breakers.state("w") == "open"
    clock.now += 0.2
    assert breakers.state("w") == "half_open"
    assert breakers.allows("w") and breakers.open_ids() == set()
    breakers.begin("w")  # the trial request goes out
    assert not breakers.allows("w")
    assert breakers.open_ids() == {"w"}


def test_half_open_trial_success_closes() -> None:
    clock = FakeClock()
    breakers = Breakers(threshold=2, cooldown_s=5, clock=clock)
    breakers.record_failure("w")
    breakers.record_failure("w")
    clock.now += 5
    breakers.begin("w")
    breakers.record_success("w")
    assert breakers.state("w") == "closed" and breakers.allows("w")
    breakers.record_failure("w")  # counting starts from zero again
    assert breakers.state("w") == "closed"


def test_half_open_trial_failure_reopens_for_a_full_cooldown() -> None:
    clock = FakeClock()
    breakers = Breakers(threshold=2, cooldown_s=5, clock=clock)
    breakers.record_failure("w")
    breakers.record_failure("w")
    clock.now += 6
    breakers.begin("w")
    breakers.record_failure("w")  # a single failure re-opens a breaker that was open
    assert breakers.state("w") == "open"
    clock.now += 4
    assert breakers.state("w") == "open"
    clock.now += 1
    assert breakers.state("w") == "half_open" and breakers.allows("w")


def test_begin_on_a_closed_breaker_is_not_a_trial() -> None:
    breakers = Breakers(threshold=2, cooldown_s=5, clock=FakeClock())
    breakers.begin("w")
    breakers.begin("w")
    assert breakers.allows("w")


async def test_failures_across_a_bus_outage_are_not_blamed_on_the_worker(cluster_config, nats_server) -> None:
    """A try that fails while our own NATS connection dropped says nothing about the worker: no breaker count."""
    from mlxcluster.bus import Bus, StreamInbox
    from mlxcluster.controller.routing.breaker import Breakers
    from mlxcluster.controller.routing.dispatch import Dispatcher
    from mlxcluster.controller.routing.registry import WorkerRegistry
    from mlxcluster.embedded import EmbeddedNatsServer

    bus = await Bus.connect(cluster_config.nats, name="blame-test", attempts=5)
    try:
        breakers = Breakers(threshold=1)
        dispatcher = Dispatcher(
            bus=bus,
            registry=WorkerRegistry(cluster_config),
            balancer=None,  # type: ignore[arg-type]
            config=cluster_config.controller,
            inbox=StreamInbox(bus, "c1"),
            breakers=breakers,
        )
        steady = bus.epoch
        dispatcher._blame("w-steady", steady)
        assert breakers.state("w-steady") == "open"  # same connection throughout: the worker's fault

        before = bus.epoch
        await nats_server.stop()
        await wait_until(lambda: not bus.is_connected, timeout=10, what="the bus to notice the server gone")
        assert bus.epoch != before  # dropped
        restarted = EmbeddedNatsServer(cluster_config.nats)
        await restarted.start()
        try:
            await wait_until(lambda: bus.is_connected, timeout=10, what="the bus to reconnect")
            assert bus.epoch != before  # back, on a new epoch
            dispatcher._blame("w-outage", before)
            assert breakers.state("w-outage") == "closed"
        finally:
            await restarted.stop()
    finally:
        await bus.close(drain=False)


def test_dispatch_stats_are_kept_from_the_dispatchers_events() -> None:
    """One ledger: the counters cluster status shows follow from the events the exporters get too."""
    live: dict[str, object] = {}
    stats = DispatchStats(live)

    def finished(**fields: Any) -> RequestFinished:
        return RequestFinished(time=0.0, request_id="r", model="m", duration_s=0.1, **fields)

    stats.on_event(finished(status="error", error="model_not_found", model_known=False))  # refused: not dispatched
    assert stats.requests == 0
    live["r-running"] = object()
    stats.on_event(finished(dispatched=True, status="ok", ttft_s=0.02, tokens_per_second=50.0))
    stats.on_event(finished(dispatched=True, status="error", error="worker_lost", error_frame=True, unmoved=True))
    stats.on_event(finished(dispatched=True, status="error", error="bad_grammar", error_frame=True))
    stats.on_event(finished(dispatched=True, status="error", error="no_capacity"))
    stats.on_event(finished(dispatched=True, status="cancelled"))
    stats.on_event(RequestRetried(time=0.0, request_id="r", model="m", worker="w1", attempt=2, reason="overloaded"))
    stats.on_event(
        RequestMigrated(time=0.0, request_id="r", model="m", worker="w1", to_worker="w2", migration=1, reason="offline")
    )
    assert (stats.requests, stats.in_flight, stats.completed, stats.errors, stats.failed) == (6, 1, 1, 2, 1)
    assert (stats.retries, stats.migrations, stats.migrations_failed) == (1, 1, 1)
    assert list(stats.recent_ttft_ms) == [20.0] and list(stats.recent_tokens_per_second) == [50.0]
