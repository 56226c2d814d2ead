"""``mlxcluster bench nats``: the message bus on loopback, against the embedded nats-server.

The one module besides :mod:`mlxcluster.bus` that uses the raw NATS client (``bus.nc``): it measures raw NATS
request/reply and publish rates, which the Bus's typed helpers would only add to.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from pathlib import Path

import msgspec

from mlxcluster.bench.stats import machine_line, percentile
from mlxcluster.bus import Bus
from mlxcluster.config import Config, from_dict, load
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.tables import table


class NatsBenchResult(msgspec.Struct):
    """What ``bench nats`` measured."""

    machine: str
    server_start_ms: float
    config_load_ms: float
    request_p50_ms: float
    request_p99_ms: float
    requests: int
    publish_msgs_per_s: float
    messages: int
    payload_bytes: int

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bench_config() -> Config:
    """Embedded server on free loopback ports, no monitoring port."""
    port = free_port()
    return from_dict({"nats": {"url": f"nats://127.0.0.1:{port}", "embedded": {"port": port, "http_port": 0}}})


def time_config_load() -> float:
    """Milliseconds to load and validate the commented default config file."""
    from mlxcluster.config_template import DEFAULT_CONFIG_TOML

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.toml"
        path.write_text(DEFAULT_CONFIG_TOML)
        started = time.perf_counter()
        load(path, env={})
        return (time.perf_counter() - started) * 1000


async def run_nats_bench(*, requests: int, messages: int, payload: int) -> NatsBenchResult:
    """Start the server, time request/reply round trips and a publish burst through one subscriber."""
    config = bench_config()
    server = EmbeddedNatsServer(config.nats)
    started = time.perf_counter()
    await server.start()
    start_ms = (time.perf_counter() - started) * 1000
    try:
        bus = await Bus.connect(config.nats, name="bench", attempts=3)
        try:
            latencies = await _request_reply(bus, requests, payload)
            rate = await _publish_rate(bus, messages, payload)
        finally:
            await bus.close()
    finally:
        await server.stop()
    return NatsBenchResult(
        machine=machine_line(),
        server_start_ms=round(start_ms, 1),
        config_load_ms=round(time_config_load(), 2),
        request_p50_ms=round(percentile(latencies, 50), 3),
        request_p99_ms=round(percentile(latencies, 99), 3),
        requests=requests,
        publish_msgs_per_s=round(rate),
        messages=messages,
        payload_bytes=payload,
    )


async def _request_reply(bus: Bus, count: int, payload: int) -> list[float]:
    nc = bus.nc

    async def echo(msg) -> None:  # type: ignore[no-untyped-def]
        await msg.respond(msg.data)

    sub = await nc.subscribe("bench.echo", cb=echo)
    body = b"x" * payload
    latencies: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        await nc.request("bench.echo", body, timeout=2.0)
        latencies.append((time.perf_counter() - started) * 1000)
    await sub.unsubscribe()
    return latencies


async def _publish_rate(bus: Bus, count: int, payload: int) -> float:
    """Messages per second from first publish until the subscriber has received all of them."""
    nc = bus.nc
    received = 0
    done = asyncio.Event()

    async def on_message(_msg) -> None:  # type: ignore[no-untyped-def]
        nonlocal received
        received += 1
        if received == count:
            done.set()

    sub = await nc.subscribe("bench.pub", cb=on_message, pending_msgs_limit=count + 1, pending_bytes_limit=-1)
    await nc.flush()
    body = b"x" * payload
    started = time.perf_counter()
    for _ in range(count):
        await nc.publish("bench.pub", body)
    await nc.flush()
    await asyncio.wait_for(done.wait(), timeout=60)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return count / elapsed


def format_table(result: NatsBenchResult) -> str:
    """Human-readable result with the seed's targets beside each figure."""
    rows = [
        ["embedded server start", f"{result.server_start_ms:.0f} ms", "< 2000 ms"],
        ["config load", f"{result.config_load_ms:.2f} ms", "< 100 ms"],
        [
            f"request/reply p50 ({result.requests} x {result.payload_bytes} B)",
            f"{result.request_p50_ms:.3f} ms",
            "< 10 ms",
        ],
        ["request/reply p99", f"{result.request_p99_ms:.3f} ms", ""],
        [f"publish → subscriber ({result.messages} msgs)", f"{result.publish_msgs_per_s:,.0f} msg/s", "> 10,000"],
    ]
    return f"bench nats — {result.machine}\n" + table(["measure", "result", "target"], rows)
