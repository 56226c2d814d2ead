"""Security: API keys on every route that needs one (driven by the app's own route table), CORS preflights
without a key, no way around the key through odd paths, 127.0.0.1 as the default bind of every listening
socket, NATS user/password and token auth end to end with the embedded server, and secrets that appear
neither in ``config show`` nor in the logs of a dual-mode run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import openai
import psutil
import pytest
from cluster_harness import Cluster, RunningController, with_sections
from dual_harness import READY_TIMEOUT_S, Dual, dual_runs
from fault_harness import controller_mode_process
from loopback import free_port
from typer.testing import CliRunner

from mlxcluster.bus import Bus, BusError
from mlxcluster.cli import app as cli_app
from mlxcluster.config import Config, from_dict
from mlxcluster.config_template import DEFAULT_CONFIG_TOML
from mlxcluster.embedded import EmbeddedNatsServer

API_KEY = "sk-test-6b1e0c57d2"
PROTECTED_PREFIXES = ("/v1/", "/api/")
PUBLIC_PATHS = {"/", "/dashboard", "/health", "/ready", "/openapi.json", "/metrics"}
"""Every route outside /v1 and /api, each one reviewed: none serves cluster data beyond liveness and counters."""
PATH_VALUES = {"model": "echo", "worker_id": "w1", "name": "some-key"}
WEBSOCKET = "/v1/ws"


@pytest.fixture
async def keyed(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[RunningController]:
    """Keys on, CORS for any origin, the Prometheus exporter's /metrics, one echo worker online."""
    config = with_sections(
        cluster_config,
        controller={"api_keys": [API_KEY, "sk-second-key"], "cors": ["*"]},
        metrics={"exporters": ["prometheus"]},
    )
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller()
        await wait_online(controller)
        yield controller


async def wait_online(controller: RunningController) -> None:
    deadline = time.monotonic() + 10
    while controller.ctx.registry.stats().online < 1:
        assert time.monotonic() < deadline, "worker w1 never came online"
        await asyncio.sleep(0.02)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def route_table(controller: RunningController) -> list[tuple[str, str, str]]:
    """(method, canonical path, concrete path) for every route the app serves."""
    table = []
    for route in controller.app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        concrete = canonical
        for name, value in PATH_VALUES.items():
            concrete = concrete.replace("{" + name + "}", value)
        assert "{" not in concrete, f"no sample value for a parameter of {canonical}"
        table.append((route.method, canonical, concrete))
    return sorted(set(table))


async def call(
    controller: RunningController, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]} if method == "POST" else None
    async with controller.session().request(method, controller.url + path, json=body, headers=headers) as resp:
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, None


def assert_unauthorized(status: int, body: Any, method: str, path: str) -> None:
    assert status == 401, (method, path, status, body)
    if method == "HEAD":
        return
    assert body["error"]["code"] == "invalid_api_key", body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"


async def test_every_route_is_keyed_or_on_the_public_list(keyed: RunningController) -> None:
    table = route_table(keyed)
    paths = {canonical for _, canonical, _ in table}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/api/cluster/status", "/metrics"} <= paths
    public = {p for p in paths if not p.startswith(PROTECTED_PREFIXES)}
    assert public == PUBLIC_PATHS, "a route outside /v1 and /api was added or removed: review it, then this list"

    for method, canonical, path in table:
        if canonical.startswith(PROTECTED_PREFIXES):
            for headers in ({}, bearer("wrong"), bearer(""), {"Authorization": API_KEY}, {"Authorization": "Basic x"}):
                status, body = await call(keyed, method, path, headers)
                if canonical == WEBSOCKET and not headers:
                    # No key at all may still upgrade (the first message must authenticate); a plain GET is refused.
                    assert status == 400, (method, body)
                    assert method == "HEAD" or body["error"]["code"] == "not_websocket", body
                    continue
                assert_unauthorized(status, body, method, path)
            status, body = await call(keyed, method, path, bearer(API_KEY))
            assert status != 401, (method, path, body)
            status, _ = await call(keyed, method, path, {"Authorization": f"bearer  {API_KEY} "})
            assert status != 401, (method, path, "scheme is case-insensitive, the key is trimmed")
        else:
            status, body = await call(keyed, method, path)
            assert status in (200, 204), (method, path, status, body)


async def test_cors_preflight_needs_no_key_on_any_route(keyed: RunningController) -> None:
    origin = "https://ui.example"
    for method, _, path in route_table(keyed):
        if method == "HEAD":
            continue
        headers = {
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization",
        }
        async with keyed.session().options(keyed.url + path, headers=headers) as resp:
            assert resp.status == 204, (method, path, resp.status)
            assert resp.headers["Access-Control-Allow-Origin"] == origin
            assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
            assert await resp.read() == b""  # a preflight answers headers only, never data
    # An OPTIONS that is not a preflight is not a way around the key.
    async with keyed.session().options(keyed.url + "/api/cluster/status") as resp:
        assert resp.status in (401, 405) and b"controller_id" not in await resp.read()


BYPASS_ATTEMPTS = [
    "/v1//models",
    "//v1/models",
    "/V1/models",
    "/v1/./models",
    "/v1/../v1/models",
    "/%76%31/models",
    "/v1%2Fmodels",
    "/./api/cluster/status",
    "/API/cluster/status",
    "/api/cluster//status",
    "/api%2Fcluster%2Fstatus",
    "/api/cluster/workers;x",
    "/health/../api/cluster/status",
    "/health/..%2F..%2Fapi/cluster/status",
    "/dashboard/../api/cluster/workers",
    "/openapi.json/../../v1/models",
    "/v1\\models",
    "http://localhost/api/cluster/status",
    "/api/cluster/status?next=/health",
    "/api/cluster/status#/health",
]


async def test_no_path_trick_reaches_a_keyed_route_without_the_key(keyed: RunningController) -> None:
    """Raw request lines (no client-side normalisation): each is refused (401) or unknown (404/400)."""
    for path in BYPASS_ATTEMPTS:
        reader, writer = await asyncio.open_connection("127.0.0.1", keyed.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        assert status in (400, 401, 404), (path, head, body[:200])
        assert b"controller_id" not in body and b'"w1"' not in body and b'"echo"' not in body, (path, body[:200])


# --- listening sockets ---------------------------------------------------------------------------


def test_default_binds_are_loopback() -> None:
    config = from_dict({})
    assert config.controller.bind == "127.0.0.1"
    assert config.nats.embedded.host == "127.0.0.1"
    assert config.nats.url == "nats://127.0.0.1:4222"
    assert config.controller.api_keys == []  # so the loopback default is what keeps the API private
    template = from_dict(tomllib.loads(DEFAULT_CONFIG_TOML))
    assert template.controller.bind == "127.0.0.1" and template.nats.embedded.host == "127.0.0.1"


def non_loopback_ipv4() -> list[str]:
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                found.append(address.address)
    return found


def listening(process: psutil.Process) -> list[tuple[str, int]]:
    sockets = []
    for proc in [process, *process.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        sockets += [(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    return sockets


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return
        except OSError:
            pass
        assert proc.poll() is None, "the controller exited"
        assert time.monotonic() < deadline, f"nothing answered on port {port}"
        time.sleep(0.1)


@pytest.fixture
def controller_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    """``run --mode controller`` with the default config, only the ports moved to free ones."""
    with controller_mode_process(tmp_path, monitor=True) as running:  # no cluster.toml in tmp_path: the defaults
        yield running


@pytest.mark.timeout(120)
def test_run_controller_listens_on_loopback_only(
    controller_process: tuple[subprocess.Popen[bytes], dict[str, int]],
) -> None:
    proc, ports = controller_process
    wait_http(ports["http"], "/health", READY_TIMEOUT_S, proc)
    sockets = listening(psutil.Process(proc.pid))
    assert {port for _, port in sockets} >= {ports["http"], ports["nats"], ports["monitor"]}, sockets
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in sockets), sockets
    for address in non_loopback_ipv4():
        for port in ports.values():
            with socket.socket() as probe, pytest.raises(OSError):
                probe.settimeout(2)
                probe.connect((address, port))


# --- NATS auth with the embedded server, and secrets kept out of output ----------------------------

NATS_AUTH = {
    "user-password": {"MLXCLUSTER_NATS_USER": "mlx-user", "MLXCLUSTER_NATS_PASSWORD": "pw-Zq81!xV3d"},
    "token": {"MLXCLUSTER_NATS_TOKEN": "tok-Hh2Lp0o9Wk"},
}


async def nats_refuses(url: str, **credentials: str) -> None:
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **credentials)
        await nc.close()


async def nats_accepts(url: str, **credentials: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **credentials)
    await nc.publish("probe", b"x")
    await nc.flush()
    await nc.close()


@pytest.fixture
def start_dual(tmp_path: Path) -> Iterator[Callable[..., Dual]]:
    with dual_runs(tmp_path) as start:
        yield start


@pytest.mark.timeout(180)
@pytest.mark.parametrize("auth", list(NATS_AUTH))
def test_dual_mode_with_nats_auth_serves_refuses_strangers_and_prints_no_secret(
    start_dual: Callable[..., Dual], auth: str
) -> None:
    secrets_env = {**NATS_AUTH[auth], "MLXCLUSTER_CONTROLLER_API_KEYS": API_KEY}
    verbose = {"MLXCLUSTER_LOGGING_LEVEL": "debug", "MLXCLUSTER_NATS_EMBEDDED_LOG_LEVEL": "debug"}
    dual = start_dual("--engine", "echo", env={**secrets_env, **verbose})
    dual.wait_for(dual.ready, READY_TIMEOUT_S, "/ready")
    nats_url = psutil.Process(dual.proc.pid).environ()["MLXCLUSTER_NATS_URL"]
    client = openai.OpenAI(base_url=f"{dual.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
    completion = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "auth works"}])
    assert completion.choices[0].message.content == "auth works"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{dual.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert dual.http("/api/cluster/status")[0] == 401

    if auth == "user-password":
        good = {"user": "mlx-user", "password": NATS_AUTH[auth]["MLXCLUSTER_NATS_PASSWORD"]}
        bad: list[dict[str, str]] = [{}, {"user": "mlx-user", "password": "wrong"}, {"token": "mlx-user"}]
    else:
        good = {"token": NATS_AUTH[auth]["MLXCLUSTER_NATS_TOKEN"]}
        bad = [{}, {"token": "wrong"}, {"user": "x", "password": NATS_AUTH[auth]["MLXCLUSTER_NATS_TOKEN"]}]

    async def probe() -> None:
        for credentials in bad:
            await nats_refuses(nats_url, **credentials)
        await nats_accepts(nats_url, **good)

    asyncio.run(probe())

    dual.proc.send_signal(signal.SIGTERM)
    assert dual.proc.wait(timeout=30) == 0, dual.output()[-3000:]
    output = dual.output()
    assert "connected to NATS" in output and "mlxcluster.nats-server" in output, output[-2000:]  # logs were captured
    secrets = {name: value for name, value in secrets_env.items() if name != "MLXCLUSTER_NATS_USER"}  # a name
    for name, secret in secrets.items():
        assert secret not in output, f"{name} appears in the dual-mode output"

    for args in (["config", "show", "--json"], ["config", "show"]):
        shown = CliRunner().invoke(cli_app, args, env=secrets_env)
        assert shown.exit_code == 0, shown.output
        for name, secret in secrets.items():
            assert secret not in shown.output, f"config show prints {name}"
    assert json.loads(CliRunner().invoke(cli_app, ["config", "show", "--json"], env=secrets_env).output)["controller"][
        "api_keys"
    ] == ["***"]


async def test_credentials_in_the_nats_url_are_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    """``nats://user:password@host`` works, but neither the logs, a connect error, ``/api/cluster/status`` nor
    ``config show`` repeats the credentials."""
    caplog.set_level(logging.DEBUG)
    password, port = "pw-in-url-4Kd9", free_port()
    server = from_dict({"nats": {"user": "u", "password": password, "embedded": {"port": port, "http_port": 0}}})
    nats_url = f"nats://u:{password}@127.0.0.1:{port}"
    config = from_dict({"nats": {"url": nats_url}, "controller": {"api_keys": [API_KEY]}})
    async with EmbeddedNatsServer(server.nats), Cluster(config) as cluster:
        controller = await cluster.start_controller()
        async with controller.session().get(controller.url + "/api/cluster/status", headers=bearer(API_KEY)) as resp:
            status = await resp.json()
        assert status["nats"]["server"] == f"127.0.0.1:{port}"
    unreachable = from_dict({"nats": {"url": f"nats://u:{password}@127.0.0.1:{free_port()}"}})
    with pytest.raises(BusError) as caught:
        await Bus.connect(unreachable.nats, name="test-unreachable", attempts=2)
    assert password not in str(caught.value) and "***@" in str(caught.value)
    assert password not in caplog.text
    assert "connected to NATS 127.0.0.1:" in caplog.text
    shown = CliRunner().invoke(cli_app, ["config", "show", "--json"], env={"MLXCLUSTER_NATS_URL": nats_url})
    assert password not in shown.output
    assert json.loads(shown.output)["nats"]["url"] == f"nats://***@127.0.0.1:{port}"
