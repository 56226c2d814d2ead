"""Fault injection with real processes: nats-server, a controller and echo workers, each its own process.

Workers stream one word per token with a 20 ms delay; the load is the official openai client with no
retries. A request may fail only with an explicit error (an SSE ``error`` event, or an HTTP error status
when it never started); a silently truncated, corrupted or hanging stream fails the test.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import openai
import pytest
from cluster_harness import Cluster, FakeHandler, FakeWorker, RunningController, wait_until, with_sections
from conftest import free_port
from fault_harness import (
    OFFLINE_TIMEOUT_MS,
    Controller,
    NatsNode,
    Outcome,
    Processes,
    failure_kinds,
    first_success,
    log_times,
    prompt_words,
    start_load,
    stream_many,
    tally,
)
from nats.aio.msg import Msg

from mlxcluster.bus import Bus
from mlxcluster.config import Config, StaticWorker
from mlxcluster.controller import dispatch
from mlxcluster.protocol import PROBE_HEADER, Accepted, Done, InferenceRequest, Token

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

WORKERS = ("w1", "w2", "w3")
DEADLINE_S = 30.0  # per request: nothing may take longer (a hang)
WORKER_SLOTS = 8  # worker.max_concurrent default
NATS_DOWN_S = 0.5  # a restart takes a moment; shorter than the offline timeout, so workers stay "online"


def explicit_failures_only(outcomes: list[Outcome], allowed: tuple[str, ...] = ("sse_error", "http_error")) -> None:
    """Every request either completed intact or ended with one of the ``allowed`` explicit errors."""
    bad = [o for o in outcomes if o.kind != "ok" and o.kind not in allowed]
    assert not bad, f"{len(bad)} request(s) ended badly: {tally(bad)}; first: {bad[0]}"


async def requests_total(controller: Controller, worker_id: str) -> int:
    view = await controller.worker(worker_id)
    return view["requests_total"] if view else 0


async def served_at_least(controller: Controller, worker_id: str, count: int) -> bool:
    return await requests_total(controller, worker_id) >= count


async def start_cluster(procs: Processes, **controller_env: str) -> tuple[NatsNode, dict, Controller]:
    node = await procs.nats(NatsNode("nats", free_port()))
    workers = {w: procs.worker(w, [node.url]) for w in WORKERS}
    controller = procs.controller([node.url], **controller_env)
    await controller.wait_status(WORKERS, "online")
    return node, workers, controller


async def test_kill_9_worker_mid_run(tmp_path: Path) -> None:
    """100 concurrent clients send 10 streamed requests each (1,000 in all) to three workers; ``kill -9`` one
    mid-run, then start a new worker under the same id.

    A worker generates at most ``max_concurrent`` (8) streams at once and queues the rest. The killed worker's
    queued and unanswered requests have no token yet and are retried elsewhere; only the streams it was
    generating fail, each with an SSE ``error`` event, never silently: at most 8 of 1,000, so ≥ 99 % complete.
    """
    procs = Processes(tmp_path)
    try:
        node, workers, controller = await start_cluster(procs, MLXCLUSTER_CONTROLLER_FIRST_TOKEN_TIMEOUT_S="10")
        load = start_load(procs, controller, clients=100, per_client=10, words=12, deadline_s=DEADLINE_S)
        async with controller.client() as client:
            # mid-run: the victim has taken a good share (its heartbeats count the requests it received)
            await wait_until(lambda: served_at_least(controller, "w1", 60), 60, "w1 serving 60 requests", interval=0.1)
            killed_at, killed_wall = time.monotonic(), time.time()
            workers["w1"].signal(signal.SIGKILL)
            offline_s = await controller.wait_status(["w1"], "offline", timeout=10)
            assert not load.done, "the load ended before the kill; it was not mid-run"
            restarted = procs.worker("w1", [node.url])
            rejoin_s = await controller.wait_status(["w1"], "online")
            await asyncio.sleep(0.5)  # the new process's heartbeats have replaced the dead one's last
            served_before = await requests_total(controller, "w1")
            outcomes = await load.outcomes()

            # the restarted worker (same id) takes work again once its breaker lets it through
            async def serving() -> bool:
                await first_success(client, prompt_words(5), 10)
                return await requests_total(controller, "w1") > served_before

            await wait_until(serving, 30, "the restarted w1 serving requests", interval=0.1)
        detected = log_times(controller.proc, "worker w1: online → offline", killed_wall)
        counts = tally(outcomes)
        completed = counts["ok"] / len(outcomes)
        failed = [o for o in outcomes if o.kind != "ok"]
        load_s = max(o.ended for o in outcomes) - min(o.started for o in outcomes)
        print(
            f"\nkill -9: {len(outcomes)} requests in {load_s:.1f}s, {completed:.2%} completed; failures "
            f"{failure_kinds(outcomes)}; the registry marked it offline "
            f"{', '.join(f'{t - killed_wall:.2f}s' for t in detected)} and the API showed it {offline_s:.2f}s after "
            f"the kill; the restarted worker was online {rejoin_s:.2f}s after its start"
        )
        explicit_failures_only(outcomes, allowed=("sse_error",))
        assert all(o.tokens > 0 and "worker_lost" in o.detail for o in failed), failed[:3]
        assert len(failed) <= WORKER_SLOTS, f"more failures than streams the victim could run: {counts}"
        assert completed >= 0.99, counts
        assert offline_s <= OFFLINE_TIMEOUT_MS / 1000 + 1.0
        assert max(o.ended - o.started for o in outcomes) < DEADLINE_S
        assert killed_at < max(o.ended for o in outcomes)
        assert restarted.alive
        assert all(workers[w].alive for w in ("w2", "w3")) and controller.proc.alive
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()


async def breaker(controller: Controller, worker_id: str) -> str | None:
    view = await controller.worker(worker_id)
    return view["breaker"] if view else None


async def test_sigstop_worker_times_out_retries_opens_breaker_and_recovers(tmp_path: Path) -> None:
    """A frozen worker (TCP alive, no progress): its requests time out waiting for ``Accepted`` and are retried
    elsewhere, its breaker opens; after SIGCONT it is online again and a successful trial closes the breaker.

    The controller's offline timeout is 6 s here (the default), longer than the 3 s accept timeout, so it is the
    dispatcher's own timeout, not the registry, that notices the frozen worker.
    """
    procs = Processes(tmp_path)
    try:
        _node, workers, controller = await start_cluster(procs, MLXCLUSTER_DISCOVERY_OFFLINE_TIMEOUT_MS="6000")
        load = start_load(procs, controller, clients=30, per_client=200, words=10, deadline_s=DEADLINE_S, duration_s=14)
        await wait_until(lambda: served_at_least(controller, "w1", 20), 60, "w1 serving", interval=0.1)
        stopped_at = time.monotonic()
        workers["w1"].signal(signal.SIGSTOP)
        await wait_until(lambda: breaker_is(controller, "w1", "open"), 15, "w1's breaker open", interval=0.05)
        open_s = time.monotonic() - stopped_at
        workers["w1"].signal(signal.SIGCONT)
        resumed_at = time.monotonic()

        async def heard_from() -> bool:
            view = await controller.worker("w1")
            return bool(view) and view["status"] == "online" and view["seen_ago_s"] < 0.5

        await wait_until(heard_from, 10, "w1 heartbeating again", interval=0.05)
        online_s = time.monotonic() - resumed_at
        async with controller.client() as client:

            async def breaker_closed() -> bool:
                if load.done:  # keep requests coming, so a half-open trial happens
                    await first_success(client, prompt_words(5), 10)
                return await breaker_is(controller, "w1", "closed")

            await wait_until(breaker_closed, 30, "w1's breaker closed", interval=0.1)
        closed_s = time.monotonic() - resumed_at
        outcomes = await load.outcomes()
        _, status = await controller.get("/api/cluster/status")
        retries = status["requests"]["retries"]
        counts = tally(outcomes)
        print(
            f"\nSIGSTOP: breaker open {open_s:.2f}s after the stop; {len(outcomes)} requests {dict(counts)}, "
            f"{retries} retries; after SIGCONT heard from in {online_s:.2f}s, breaker closed in {closed_s:.2f}s"
        )
        explicit_failures_only(outcomes, allowed=("sse_error",))
        assert all(o.tokens > 0 for o in outcomes if o.kind != "ok"), "a request without tokens was not retried"
        log = controller.proc.output(10**7)
        timed_out = sum(log.count(f"w1 failed before the first token ({why}") for why in ("did not accept", "no first"))
        assert retries >= 1 and timed_out >= 1, (retries, timed_out)
        assert all(p.alive for p in workers.values()) and controller.proc.alive
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()


async def breaker_is(controller: Controller, worker_id: str, state: str) -> bool:
    return await breaker(controller, worker_id) == state


async def test_nats_server_restart_under_load(tmp_path: Path) -> None:
    """Kill nats-server under load and start a new one on the same port: every node reconnects by itself,
    a request succeeds within 5 s of the restart, no process exits, nothing is lost silently.

    Frames in flight when the server dies are lost; a stream that lost its tail (its worker finished or
    forgot it) must still end, with an error, once neither frames nor the worker's liveness probes come.
    """
    procs = Processes(tmp_path)
    try:
        node, workers, controller = await start_cluster(procs)
        pids = {name: p.pid for name, p in {**workers, "controller": controller.proc}.items()}
        load = start_load(procs, controller, clients=30, per_client=200, words=10, deadline_s=DEADLINE_S, duration_s=8)
        await wait_until(lambda: served_at_least(controller, "w1", 20), 60, "load running", interval=0.1)
        assert node.proc is not None
        killed_at = time.monotonic()
        node.proc.kill()
        await asyncio.sleep(NATS_DOWN_S)
        await procs.nats(node)
        restarted_at = time.monotonic()
        async with controller.client() as client:
            back_s = await first_success(client, prompt_words(5), 15, attempt_s=5)
        online_s = await controller.wait_status(WORKERS, "online", timeout=15)
        outcomes = await load.outcomes()
        counts = tally(outcomes)
        print(
            f"\nnats restart: server down {restarted_at - killed_at:.2f}s; first success {back_s:.2f}s after the "
            f"restart; all workers online {online_s:.2f}s after that; load {dict(counts)} {failure_kinds(outcomes)}"
        )
        explicit_failures_only(outcomes)
        assert back_s <= 5.0
        alive = {name: p.pid for name, p in {**workers, "controller": controller.proc}.items() if p.alive}
        assert alive == pids, "a process exited or was replaced"
        async with controller.client() as client:
            after = await stream_many(client, 30, prompt_words(10), DEADLINE_S)
        assert tally(after) == {"ok": 30}, tally(after)
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()


async def test_controller_restart(tmp_path: Path) -> None:
    """Kill -9 the controller under load, start a new one on the same port: workers re-register on its
    announce, in-flight requests of the old one ended with an error, new ones succeed; SIGTERM drains."""
    procs = Processes(tmp_path)
    try:
        node, workers, first = await start_cluster(procs)
        worker_pids = {w: p.pid for w, p in workers.items()}
        load = start_load(procs, first, clients=30, per_client=100, words=40, deadline_s=DEADLINE_S, duration_s=4)
        await wait_until(lambda: busy(first, done=20, in_flight=20), 60, "requests done and in flight", interval=0.05)
        first.proc.kill()
        outcomes = await load.outcomes()

        second = procs.controller([node.url], port=first.port)
        started = time.monotonic()
        await wait_until(lambda: answers(second), 30, "the new controller answering", interval=0.05)
        answering_s = time.monotonic() - started

        async def all_registered() -> bool:
            known = await second.workers()
            return all(known.get(w, {}).get("status") == "online" and known[w]["registered"] for w in WORKERS)

        await wait_until(all_registered, 10, "workers registered with the new controller", interval=0.05)
        listed_s = time.monotonic() - started - answering_s
        controller_id = (await second.get("/api/cluster/status"))[1]["controller_id"]
        async with second.client() as client:
            after = await stream_many(client, 30, prompt_words(10), DEADLINE_S)

        draining = start_load(procs, second, clients=20, per_client=1, words=80, deadline_s=DEADLINE_S)
        await wait_until(lambda: busy(second, in_flight=20), 60, "all 20 requests in flight", interval=0.02)
        second.proc.signal(signal.SIGTERM)
        code = await second.proc.wait_exit(20)
        drained = await draining.outcomes()

        counts = tally(outcomes)
        print(
            f"\ncontroller kill -9: in-flight {dict(counts)}; new controller answered {answering_s:.2f}s after its "
            f"start and listed all workers registered {listed_s:.2f}s later; after: {dict(tally(after))}; "
            f"SIGTERM under load: {dict(tally(drained))}, exit code {code}"
        )
        explicit_failures_only(outcomes, allowed=("connection",))
        assert counts["ok"] >= 20 and any(o.kind == "connection" and o.tokens > 0 for o in outcomes), (
            "no stream was in progress when the controller died"
        )
        assert all(f"controller {controller_id} announced itself" in p.output(10**6) for p in workers.values())
        assert tally(after) == {"ok": 30}, tally(after)
        assert tally(drained) == {"ok": 20}, "SIGTERM must let in-flight requests finish"
        assert code == 0
        assert {w: p.pid for w, p in workers.items() if p.alive} == worker_pids
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()


async def answers(controller: Controller) -> bool:
    status, _ = await controller.get("/health")
    return status == 200


async def busy(controller: Controller, *, in_flight: int, done: int = 0) -> bool:
    """At least ``in_flight`` requests in flight and ``done`` finished."""
    status, body = await controller.get("/api/cluster/status")
    if status != 200:
        return False
    requests = body["requests"]
    return requests["in_flight"] >= in_flight and requests["total"] - requests["in_flight"] >= done


# --- frames lost on the bus (NATS delivers at most once): deterministic, with fake workers ------------

USER = [{"role": "user", "content": "hello brave new world"}]


def preferring(config: Config, worker_id: str) -> Config:
    """``config`` where ``worker_id`` is tried before any other worker."""
    return with_sections(config, workers={"static": [StaticWorker(name=worker_id, priority=10)]})


async def collect(controller: RunningController) -> tuple[str, Exception | None]:
    """Stream the chat ``USER`` through the openai client: the text received and the error it ended with."""
    text: list[str] = []
    try:
        stream = await controller.client().chat.completions.create(model="echo", messages=USER, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
    except openai.APIError as exc:
        return "".join(text), exc
    return "".join(text), None


async def middle_frame_lost(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Token(text="hello", seq=0))
    await fake.send(msg, Token(text=" new", seq=2))  # #1 " brave" never arrived
    await fake.send(msg, Done(seq=3))


async def frames_before_done_lost(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Token(text="hello", seq=0))
    await fake.send(msg, Done(seq=4))  # #1 to #3 never arrived


@pytest.mark.parametrize("handler", [middle_frame_lost, frames_before_done_lost])
async def test_lost_frames_end_the_stream_with_an_error(cluster_config: Config, bus: Bus, handler: FakeHandler) -> None:
    async with Cluster(cluster_config) as cluster:
        await cluster.start_fake("w-lossy", handler)
        controller = await cluster.start_controller()
        await controller.wait_online("w-lossy")
        text, error = await collect(controller)
        assert text == "hello"  # never a part of the answer passed off as the whole
        assert isinstance(error, openai.APIError) and not isinstance(error, openai.APIConnectionError)
        assert "frames_lost" in error.message


async def token_lost_first(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Token(text=" brave", seq=1))  # #0 never arrived


async def all_tokens_lost(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Done(seq=4))  # #0 to #3 never arrived


@pytest.mark.parametrize("handler", [token_lost_first, all_tokens_lost])
async def test_lost_first_frames_are_retried_on_another_worker(
    cluster_config: Config, bus: Bus, handler: FakeHandler
) -> None:
    async with Cluster(preferring(cluster_config, "w-lossy")) as cluster:
        lossy = await cluster.start_fake("w-lossy", handler)
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-lossy", "w-real")
        assert await collect(controller) == ("hello brave new world", None)
        assert len(lossy.received) == 1 and controller.ctx.dispatcher.stats.retries == 1
        await wait_until(lambda: len(lossy.cancels) == 1)  # the abandoned generation is cancelled


async def tail_lost(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Token(text="hello", seq=0))  # then Done was lost, and the worker forgot the request


async def slow_but_alive(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
    await fake.send(msg, Accepted(worker_id=fake.id))
    await fake.send(msg, Token(text="hello", seq=0))
    for _ in range(8):  # silent for longer than the stall timeout, but probing like a real worker does
        await asyncio.sleep(0.2)
        await fake.bus.nc.request(msg.reply, b"", timeout=2, headers={PROBE_HEADER: "1"})
    await fake.send(msg, Token(text=" world", seq=1))
    await fake.send(msg, Done())


@pytest.mark.parametrize(("handler", "expected"), [(tail_lost, ("hello", "worker_lost")), (slow_but_alive, None)])
async def test_a_silent_stream_ends_when_the_worker_no_longer_probes_it(
    cluster_config: Config, bus: Bus, monkeypatch: pytest.MonkeyPatch, handler: FakeHandler, expected: object
) -> None:
    """Mid-stream silence with the worker still online: the stream is lost once neither frames nor the
    worker's liveness probes come for ``controller.stall_timeout_s``; a worker that still probes is waited
    for. With no other worker to continue it, the lost stream ends with an error."""
    monkeypatch.setattr(dispatch, "POLL_S", 0.1)
    async with Cluster(with_sections(cluster_config, controller={"stall_timeout_s": 0.6})) as cluster:
        await cluster.start_fake("w-quiet", handler)
        controller = await cluster.start_controller()
        await controller.wait_online("w-quiet")
        started = time.monotonic()
        text, error = await asyncio.wait_for(collect(controller), 10)
        if expected is None:
            assert (text, error) == ("hello world", None)
        else:
            assert error is not None and (text, error.code) == expected
            assert time.monotonic() - started < 3  # the stall timeout, not request_timeout_s
