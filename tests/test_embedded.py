"""The embedded nats-server: the packaged binary, start/stop, busy port, generated auth config."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import msgspec
import psutil
import pytest
from loopback import free_port, make_config

from mlxcluster.bus import Bus, BusError
from mlxcluster.config import Config, NatsSection
from mlxcluster.embedded import (
    EmbeddedNatsServer,
    EmbeddedServerError,
    jetstream_store,
    nats_server_binary,
    port_in_use,
    server_config_text,
)


def test_binary_is_found_in_the_installed_package() -> None:
    binary = nats_server_binary()
    assert binary.is_file()
    assert os.access(binary, os.X_OK)
    assert binary.name.startswith("nats-server")


async def test_starts_accepts_connections_and_stops(cluster_config: Config) -> None:
    server = EmbeddedNatsServer(cluster_config.nats)
    await server.start()
    try:
        process = server.process
        assert process is not None and process.returncode is None
        pid = server.pid
        assert pid is not None and psutil.pid_exists(pid)
        assert server.url == cluster_config.nats.url
        with socket.create_connection(("127.0.0.1", cluster_config.nats.embedded.port), timeout=2) as conn:
            assert conn.recv(4) == b"INFO"  # the NATS protocol greets every client
    finally:
        await server.stop()
    assert server.process is None
    assert process.returncode is not None
    assert not psutil.pid_exists(pid)  # reaped, not a zombie
    assert not port_in_use("127.0.0.1", cluster_config.nats.embedded.port)


async def test_stop_twice_and_context_manager(cluster_config: Config) -> None:
    async with EmbeddedNatsServer(cluster_config.nats) as server:
        pid = server.pid
        assert pid is not None
    assert not psutil.pid_exists(pid)
    await server.stop()  # already stopped: nothing to do


async def test_port_in_use_has_a_clear_message() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = make_config(nats={"url": f"nats://127.0.0.1:{port}", "embedded": {"port": port, "http_port": 0}})
        with pytest.raises(EmbeddedServerError) as info:
            await EmbeddedNatsServer(config.nats).start()
    assert str(info.value) == f'port {port} is in use; set nats.embedded.port or use nats.mode = "external"'


async def test_port_used_by_another_embedded_server(nats_server: EmbeddedNatsServer, cluster_config: Config) -> None:
    second = EmbeddedNatsServer(cluster_config.nats)
    with pytest.raises(EmbeddedServerError, match=f"^port {cluster_config.nats.embedded.port} is in use; "):
        await second.start()
    assert second.process is None


async def test_monitoring_port_in_use() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        http_port = holder.getsockname()[1]
        port = free_port()
        config = make_config(nats={"embedded": {"port": port, "http_port": http_port}})
        with pytest.raises(EmbeddedServerError, match=f"monitoring port {http_port} is in use"):
            await EmbeddedNatsServer(config.nats).start()


async def test_monitoring_port_serves_varz() -> None:
    import urllib.request

    port, http_port = free_port(), free_port()
    config = make_config(nats={"url": f"nats://127.0.0.1:{port}", "embedded": {"port": port, "http_port": http_port}})
    async with EmbeddedNatsServer(config.nats):
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/varz", timeout=2) as response:
            varz = json.load(response)
    assert varz["port"] == port
    assert varz["max_payload"] == config.nats.max_payload


def test_server_config_text() -> None:
    config = make_config(nats={"user": "u", "password": "p", "max_payload": 65536})
    conf = json.loads(server_config_text(config.nats))
    assert conf["port"] == config.nats.embedded.port
    assert conf["host"] == "127.0.0.1"
    assert conf["max_payload"] == 65536
    assert conf["authorization"] == {"user": "u", "password": "p"}
    assert "http_port" not in conf and "http" not in conf  # 0 disables monitoring
    token = json.loads(server_config_text(make_config(nats={"token": "t"}).nats))
    assert token["authorization"] == {"token": "t"}
    assert "authorization" not in json.loads(server_config_text(make_config().nats))


def test_monitoring_stays_on_loopback_when_the_client_port_opens() -> None:
    opened = make_config(nats={"embedded": {"host": "0.0.0.0", "http_port": 8222}})
    conf = json.loads(server_config_text(opened.nats))
    assert conf["host"] == "0.0.0.0" and conf["http"] == "127.0.0.1:8222" and "http_port" not in conf
    chosen = make_config(nats={"embedded": {"http_host": "::1", "http_port": 8222}})
    assert json.loads(server_config_text(chosen.nats))["http"] == "[::1]:8222"


async def assert_connects(config: NatsSection) -> None:
    bus = await Bus.connect(config, name="auth-ok", attempts=1)
    try:
        assert bus.is_connected
    finally:
        await bus.close()


async def assert_refused(config: NatsSection) -> None:
    with pytest.raises(BusError, match="cannot connect to NATS"):
        await Bus.connect(config, name="auth-bad", attempts=1)


async def test_user_password_auth() -> None:
    config = make_config(nats={"user": "mlx", "password": "s3cret"}).nats
    async with EmbeddedNatsServer(config):
        await assert_connects(config)
        await assert_refused(msgspec.structs.replace(config, password="wrong"))
        await assert_refused(msgspec.structs.replace(config, user="intruder"))
        await assert_refused(msgspec.structs.replace(config, user=None, password=None))


async def test_token_auth() -> None:
    config = make_config(nats={"token": "tok-123"}).nats
    async with EmbeddedNatsServer(config):
        await assert_connects(config)
        await assert_refused(msgspec.structs.replace(config, token="wrong"))
        await assert_refused(msgspec.structs.replace(config, token=None))


async def test_jetstream_store_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "js"
    port = free_port()
    embedded = {"port": port, "http_port": 0, "jetstream": True, "store_dir": str(store)}
    config = make_config(nats={"url": f"nats://127.0.0.1:{port}", "embedded": embedded}).nats
    async with EmbeddedNatsServer(config):
        bus = await Bus.connect(config, name="js", attempts=3)
        try:
            info = await bus.nc.jetstream().account_info()
            assert info is not None
        finally:
            await bus.close()
    assert (store / f"mlxcluster-{port}" / "jetstream").is_dir()  # one dir per embedded server


async def test_jetstream_is_on_by_default_in_the_data_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = json.loads(server_config_text(Config().nats))  # conftest points XDG_DATA_HOME at a tmp dir
    assert text["jetstream"]["store_dir"] == str(jetstream_store(None) / "mlxcluster-4222")
    assert jetstream_store(None, {}) == Path("~/.local/share/mlxcluster/jetstream").expanduser()
    assert jetstream_store(None, {"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "mlxcluster" / "jetstream"
    assert jetstream_store("~/js", {}) == Path("~/js").expanduser()


async def test_server_that_exits_at_once_is_reported(cluster_config: Config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\necho 'boom: bad config' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = EmbeddedNatsServer(cluster_config.nats, binary=fake)
    with pytest.raises(EmbeddedServerError, match="exited with code 3"):
        await server.start()
    assert server.process is None
