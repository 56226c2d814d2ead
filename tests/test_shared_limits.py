"""Rate limits across controllers (issue 22, item 4): ``rpm``, ``tpm`` and ``max_concurrent`` leased from one
JetStream KV bucket. Two limiters on one bucket never admit more than a minute's budget between them; a lost
compare-and-set is retried; a request within this controller's lease does no I/O; a dead controller's slots
lapse; a malformed entry is dropped and counted. Then two real controllers, hammered at once.

A real nats-server with JetStream throughout (no NATS mocks); a fixed clock for the limiter-level tests, so no
test straddles a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import Cluster, RunningController, start_controller, wait_until
from loopback import shared_config

from mlxcluster.bus import Bus
from mlxcluster.bus.jetstream import Bucket, open_jetstream
from mlxcluster.config import Config
from mlxcluster.controller.metering.keys import ApiKey
from mlxcluster.controller.metering.ratelimit import RateLimited
from mlxcluster.controller.shared.limits import FULL_RECHECK_S, IDLE_RETURN_S, ClusterLimits
from mlxcluster.controller.shared.records import WindowLeases, encoder, window_decoder
from mlxcluster.embedded import EmbeddedNatsServer

ADMIN = "sk-admin-limits-7a7a"
NOW = 1_000_000 * 60 + 5.0
"""Five seconds into a minute: the fixed clock of the limiter-level tests."""
MINUTE = int(NOW // 60)


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
async def bucket(config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Bucket]:
    bus = await Bus.connect(config.nats, name="test-limits", attempts=5)
    try:
        yield await (await open_jetstream(bus)).bucket("test_limits", ttl_s=300.0)
    finally:
        await bus.close()


class CountingBucket(Bucket):
    """The real bucket, counting the calls that go to the server."""

    def __init__(self, bucket: Bucket) -> None:
        super().__init__(bucket.kv)
        self.calls = 0

    async def get(self, key: str) -> Any:
        self.calls += 1
        return await super().get(key)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.calls += 1
        return await super().update(key, value, last)

    async def create(self, key: str, value: bytes) -> int:
        self.calls += 1
        return await super().create(key, value)


class RacingBucket(Bucket):
    """The real bucket where another controller leases 5 requests between this one's read and its first write."""

    def __init__(self, bucket: Bucket) -> None:
        super().__init__(bucket.kv)
        self.raced = False

    async def update(self, key: str, value: bytes, last: int) -> int:
        await self._race(key)
        return await super().update(key, value, last)

    async def create(self, key: str, value: bytes) -> int:
        await self._race(key)
        return await super().create(key, value)

    async def _race(self, key: str) -> None:
        if not self.raced:
            self.raced = True
            await self.kv.put(key, encoder.encode(WindowLeases(requests=5)))


def fixed(at: list[float]) -> Any:
    return lambda: at[0]


async def outcome(limits: ClusterLimits, key: ApiKey, reserve: int = 0) -> dict[str, str] | RateLimited:
    try:
        return await limits.admit(key, reserve)
    except RateLimited as exc:
        return exc


async def window(bucket: Bucket, name: str) -> WindowLeases:
    entry = await bucket.get(f"{name}.w{MINUTE}")
    assert entry is not None and entry.value is not None
    return window_decoder.decode(entry.value)


async def test_two_limiters_admit_exactly_a_minutes_budget_between_them(bucket: Bucket) -> None:
    clock = [NOW]
    first, second = ClusterLimits(bucket, "c1", clock=fixed(clock)), ClusterLimits(bucket, "c2", clock=fixed(clock))
    key = ApiKey(name="team", digest=b"", rpm=20)
    results = await asyncio.gather(*(outcome(limits, key) for _ in range(30) for limits in (first, second)))
    admitted = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 20 and len(refused) == 40
    assert (await window(bucket, "team")).requests == 20
    for exc in refused:
        assert exc.status == 429 and exc.type == "requests"
        assert exc.headers["x-ratelimit-limit-requests"] == "20"
        assert exc.headers["x-ratelimit-remaining-requests"] == "0"
        assert exc.headers["x-ratelimit-reset-requests"] == "55s" and exc.retry_after == 55.0
    clock[0] = NOW + 60  # the next minute: a fresh budget
    assert isinstance(await outcome(first, key), dict)


async def test_a_lost_compare_and_set_is_retried_not_lost(bucket: Bucket) -> None:
    racing = RacingBucket(bucket)
    limits = ClusterLimits(racing, "c1", clock=fixed([NOW]))
    headers = await limits.admit(ApiKey(name="team", digest=b"", rpm=160))  # leases 160 / 16 = 10
    assert racing.raced and limits.conflicts == 1
    assert (await window(bucket, "team")).requests == 15  # the other controller's 5 and this one's 10
    assert headers["x-ratelimit-remaining-requests"] == str(160 - 15 + 9)


async def test_a_request_within_the_lease_does_no_io(bucket: Bucket) -> None:
    counting = CountingBucket(bucket)
    limits = ClusterLimits(counting, "c1", clock=fixed([NOW]))
    key = ApiKey(name="busy", digest=b"", rpm=1600, tpm=1_600_000)  # leases of 100 requests, 100,000 tokens
    await limits.admit(key, reserve=10)
    assert counting.calls == 2  # one read, one compare-and-set
    for _ in range(99):
        limits.release(key, reserve=10)
        limits.record_tokens("busy", 20)
        await limits.admit(key, reserve=10)
    assert counting.calls == 2
    await limits.admit(key, reserve=10)  # the 101st: the lease ran out
    assert counting.calls == 4


async def test_a_spent_minute_is_refused_without_io_for_a_second_then_read_once(bucket: Bucket) -> None:
    clock = [NOW]
    counting = CountingBucket(bucket)
    limits = ClusterLimits(counting, "c1", clock=fixed(clock))
    key = ApiKey(name="small", digest=b"", rpm=2)
    await limits.admit(key)
    await limits.admit(key)
    assert isinstance(await outcome(limits, key), RateLimited)  # reads the entry: all leased
    calls = counting.calls
    for _ in range(20):
        clock[0] += FULL_RECHECK_S / 25
        refused = await outcome(limits, key)
        assert isinstance(refused, RateLimited) and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert counting.calls == calls
    clock[0] += FULL_RECHECK_S  # a peer may have given some back: one read, still full
    assert isinstance(await outcome(limits, key), RateLimited) and counting.calls == calls + 1
    assert isinstance(await outcome(limits, ApiKey(name="small", digest=b"", rpm=3)), dict)  # a raised limit: read
    clock[0] = NOW + 60
    assert isinstance(await outcome(limits, key), dict)


async def test_an_idle_controller_gives_back_its_unspent_lease_to_a_busy_one(bucket: Bucket) -> None:
    clock = [NOW]
    first, second = ClusterLimits(bucket, "c1", clock=fixed(clock)), ClusterLimits(bucket, "c2", clock=fixed(clock))
    key = ApiKey(name="moved", digest=b"", rpm=32, tpm=3200)  # slices of 2 requests, 200 tokens
    await first.admit(key, reserve=10)  # leases 2 requests, holds 1 unspent, and 190 tokens
    first.release(key, reserve=10)
    first.record_tokens("moved", 10)
    admitted = 0
    while isinstance(await outcome(second, key, reserve=10), dict):  # the traffic moved to the second
        admitted += 1
    assert admitted == 30  # 32 less the 2 the first leased, one of which it never spent
    assert await first.give_back_idle() == 0  # not idle for long enough yet
    clock[0] += IDLE_RETURN_S
    assert await first.give_back_idle() == 1 and await first.give_back_idle() == 0
    assert (await window(bucket, "moved")).requests == 31
    assert isinstance(await outcome(second, key, reserve=10), dict)  # past the recheck it reads the entry again
    assert isinstance(await outcome(second, key, reserve=10), RateLimited)
    assert (await window(bucket, "moved")).requests == 32


async def test_tpm_holds_across_limiters_charged_when_requests_end(bucket: Bucket) -> None:
    clock = [NOW]
    first, second = ClusterLimits(bucket, "c1", clock=fixed(clock)), ClusterLimits(bucket, "c2", clock=fixed(clock))
    key = ApiKey(name="tokens", digest=b"", tpm=160)
    charged = 0
    refused: RateLimited | None = None
    for turn in range(40):
        limits = (first, second)[turn % 2]
        result = await outcome(limits, key, reserve=8)
        if isinstance(result, RateLimited):
            refused = result
            break
        limits.release(key, reserve=8)
        limits.record_tokens("tokens", 12)  # 4 more than reserved: charged at the end, as on one controller
        charged += 12
    assert refused is not None and refused.type == "tokens"
    # at most one request's excess per controller over; under by what the other controller leased and kept
    assert 160 - 2 * 16 <= charged <= 160 + 2 * 12
    assert refused.headers["x-ratelimit-limit-tokens"] == "160"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert (await window(bucket, "tokens")).tokens <= 160


async def test_slots_are_cluster_wide_given_back_and_lapse_with_a_dead_controller(bucket: Bucket) -> None:
    clock = [NOW]
    first = ClusterLimits(bucket, "c1", clock=fixed(clock), slot_ttl_s=10.0)
    second = ClusterLimits(bucket, "c2", clock=fixed(clock), slot_ttl_s=10.0)
    key = ApiKey(name="one", digest=b"", max_concurrent=1)
    await first.admit(key)
    refused = await outcome(second, key)
    assert isinstance(refused, RateLimited) and refused.status == 429
    first.release(key)
    await first.close()  # waits for the slot given back in the background
    await second.admit(key)
    assert isinstance(await outcome(first, key), RateLimited)
    clock[0] += 11.0  # the second controller died holding its slot: it lapses
    await first.admit(key)
    assert first.running(key) == 1


async def test_a_running_controller_renews_its_slots(bucket: Bucket) -> None:
    first = ClusterLimits(bucket, "c1", slot_ttl_s=0.6)
    second = ClusterLimits(bucket, "c2", slot_ttl_s=0.6)
    key = ApiKey(name="long", digest=b"", max_concurrent=1)
    renewal = asyncio.create_task(first.run())
    try:
        await first.admit(key)  # a request longer than the slots' lifetime
        await asyncio.sleep(1.0)
        assert isinstance(await outcome(second, key), RateLimited)
    finally:
        renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewal
    await asyncio.sleep(0.8)  # the first controller stopped renewing (died): its slot lapsed
    await second.admit(key)


async def test_a_malformed_entry_is_dropped_and_counted(bucket: Bucket) -> None:
    await bucket.put(f"bad.w{MINUTE}", b"{not json")
    await bucket.put("bad.slots", json.dumps({"slots": {"c9": {"held": "x"}}}).encode())
    limits = ClusterLimits(bucket, "c1", clock=fixed([NOW]))
    await limits.admit(ApiKey(name="bad", digest=b"", rpm=10, max_concurrent=2))
    assert limits.invalid_records == 2
    assert (await window(bucket, "bad")).requests == 1


@pytest.fixture
async def pair(config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[tuple[RunningController, ...]]:
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1", token_delay_ms=40.0)
        first = await cluster.start_controller()
        second = await start_controller(config)
        try:
            for controller in (first, second):
                await wait_until(lambda c=controller: c.ctx.registry.stats().online >= 1, what="the worker online")
            yield first, second
        finally:
            await second.stop()


async def post(controller: RunningController, path: str, key: str, body: Any) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with controller.session().post(controller.url + path, json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def new_key(pair: tuple[RunningController, ...], limits: dict[str, int]) -> str:
    status, _, created = await post(pair[0], "/api/cluster/keys", ADMIN, {"name": "team", **limits})
    assert status == 201, created
    await wait_until(lambda: pair[1].ctx.ops.keys.lookup(created["key"]) is not None, what="the key on the second")
    return str(created["key"])


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "one two"}], "max_tokens": 2}


async def test_two_controllers_hammered_admit_at_most_rpm(pair: tuple[RunningController, ...]) -> None:
    secret = await new_key(pair, {"rpm": 20})
    if time.time() % 60 > 50:  # the hammering must fit in one minute
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    results = await asyncio.gather(
        *(post(controller, "/v1/chat/completions", secret, CHAT) for _ in range(30) for controller in pair)
    )
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 20 and statuses.count(429) == 40, statuses
    for status, headers, body in results:
        if status == 429:
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert headers["x-ratelimit-limit-requests"] == "20"
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert 0 < int(headers["Retry-After"]) <= 60


async def test_max_concurrent_holds_across_two_controllers(pair: tuple[RunningController, ...]) -> None:
    secret = await new_key(pair, {"max_concurrent": 2})
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            live = sum(1 for c in pair for meter in list(c.ctx.dispatcher.live.values()) if meter.key == "team")
            peak = max(peak, live)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    body = {**CHAT, "max_tokens": 6}
    results = await asyncio.gather(
        *(post(controller, "/v1/chat/completions", secret, body) for _ in range(6) for controller in pair)
    )
    done.set()
    await sampler
    statuses = [status for status, _, _ in results]
    assert 2 <= statuses.count(200) and statuses.count(429) >= 1, statuses
    assert 1 <= peak <= 2
    # every slot was given back: two more at once are admitted
    await asyncio.sleep(0.2)
    again = await asyncio.gather(
        post(pair[0], "/v1/chat/completions", secret, CHAT), post(pair[1], "/v1/chat/completions", secret, CHAT)
    )
    assert [status for status, _, _ in again] == [200, 200]


async def test_websocket_requests_share_the_cluster_wide_budget(pair: tuple[RunningController, ...]) -> None:
    secret = await new_key(pair, {"rpm": 2})
    if time.time() % 60 > 55:
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    assert (await post(pair[0], "/v1/chat/completions", secret, CHAT))[0] == 200
    url = pair[1].url.replace("http://", "ws://") + f"/v1/ws?api_key={secret}"
    async with pair[1].session().ws_connect(url) as ws:
        finished: dict[str, dict[str, Any]] = {}
        for client_id in ("a", "b"):
            await ws.send_json({"type": "chat", "id": client_id, **CHAT})
        while len(finished) < 2:
            message = await ws.receive_json(timeout=10.0)
            if message["type"] in ("done", "error"):
                finished[message["id"]] = message
    assert finished["a"]["type"] == "done"
    assert finished["b"]["type"] == "error" and finished["b"]["error"]["code"] == "rate_limit_exceeded"
