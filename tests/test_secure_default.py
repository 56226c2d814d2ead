"""Secure by default beyond loopback, NATS identities per role, and the embedded server supervised in
controller mode.

- ``run`` refuses a non-loopback controller bind without API keys, and a non-loopback embedded NATS without
  auth, naming the setting (a real process, exit code 2), unless the insecure setting says so (a warning).
- ``config init --secure`` writes users per role; the real nats-server enforces them: a wrong password is
  refused, and a ``client`` credential can neither register as a worker nor read the inference subjects,
  while the controller and worker credentials serve a request end to end.
- ``run --mode controller``: the embedded nats-server killed with SIGKILL is started again and the
  controller comes back to ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import psutil
import pytest
from cluster_harness import Cluster, wait_until
from fault_harness import base_env, controller_mode_process
from typer.testing import CliRunner

from mlxcluster.bus import Bus, BusError, backoff_delay
from mlxcluster.cli import app as cli_app
from mlxcluster.config import Config, ConfigError, from_dict, load
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import Capabilities, WorkerRegistration, encode
from mlxcluster.secure import check_exposure, is_loopback

READY_S = 60.0


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxcluster", "run", *args],
        cwd=tmp_path,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_open_controller_bind_without_keys_refuses_to_start(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--mode", "controller", MLXCLUSTER_CONTROLLER_BIND="0.0.0.0")
    assert done.returncode == 2
    assert 'controller.bind = "0.0.0.0"' in done.stderr and "controller.insecure" in done.stderr


def test_open_embedded_nats_without_auth_refuses_to_start(tmp_path: Path) -> None:
    done = run_cli(
        tmp_path, "--mode", "controller", MLXCLUSTER_NATS_EMBEDDED_HOST="0.0.0.0", MLXCLUSTER_CONTROLLER_API_KEYS="k"
    )
    assert done.returncode == 2
    assert 'nats.embedded.host = "0.0.0.0"' in done.stderr and "nats.embedded.insecure" in done.stderr


def test_insecure_setting_allows_it_with_a_warning_at_every_start(caplog: pytest.LogCaptureFixture) -> None:
    config = from_dict({"controller": {"bind": "0.0.0.0"}, "nats": {"embedded": {"host": "0.0.0.0"}}})
    with pytest.raises(ConfigError, match="controller.bind"):
        check_exposure(config, "dual")
    insecure = from_dict(
        {"controller": {"bind": "0.0.0.0", "insecure": True}, "nats": {"embedded": {"host": "::", "insecure": True}}}
    )
    caplog.set_level(logging.WARNING, logger="mlxcluster.secure")
    for _ in range(2):
        check_exposure(insecure, "controller")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4 and all(w.startswith("INSECURE") for w in warnings)
    check_exposure(config, "worker")  # a worker listens on nothing
    keyed = from_dict({"controller": {"bind": "10.0.0.5", "api_keys": ["k"]}})
    check_exposure(keyed, "controller")
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    monitoring = from_dict({"nats": {"embedded": {"http_host": "0.0.0.0"}}})
    with pytest.raises(ConfigError, match="nats.embedded.http_host"):
        check_exposure(monitoring, "dual")
    check_exposure(from_dict({"nats": {"embedded": {"http_host": "0.0.0.0", "http_port": 0}}}), "dual")  # off
    assert not is_loopback("0.0.0.0") and not is_loopback("my-host.lan")


def test_run_insecure_flag_is_an_environment_override(tmp_path: Path) -> None:
    """``--insecure`` reaches dual mode's children through the environment; the default stays secure."""
    env = {"MLXCLUSTER_CONTROLLER_INSECURE": "true", "MLXCLUSTER_NATS_EMBEDDED_INSECURE": "true"}
    assert load(None, env).controller.insecure and load(None, env).nats.embedded.insecure
    assert not load(None, {}).controller.insecure


def test_reconnect_backoff_is_exponential_capped_and_jittered() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff_delay(n, 0.1, 2.0, rng) for n in range(10)]
    assert all(0.05 <= d <= 0.1 for d in delays[:1])
    assert all(d <= 2.0 for d in delays) and delays[-1] >= 1.0
    assert len({round(backoff_delay(3, 0.1, 2.0, rng), 6) for _ in range(20)}) > 10  # jitter


# --- NATS identities per role ---------------------------------------------------------------------


@pytest.fixture
def secure_dir(tmp_path: Path) -> dict[str, Any]:
    result = CliRunner().invoke(
        cli_app,
        [
            "config",
            "init",
            "--secure",
            str(tmp_path / "secure"),
            "--controller-host",
            "10.1.2.3",
            "--workers",
            "pinned-1",
        ],
    )
    assert result.exit_code == 0, result.output
    directory = tmp_path / "secure"
    users = json.loads((directory / "nats-users.json").read_text())["users"]
    by_role = {u["role"]: u for u in users if not u.get("worker_id")}
    return {"dir": directory, "users": by_role, "users_by_name": {u["user"]: u for u in users}}


def test_config_init_secure_writes_a_two_machine_set_up(secure_dir: dict[str, Any]) -> None:
    directory: Path = secure_dir["dir"]
    for name in ("controller.toml", "worker.toml", "worker-pinned-1.toml", "nats-users.json", "admin-api-key.txt"):
        mode = stat.S_IMODE((directory / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    controller = load(directory / "controller.toml", {})
    worker = load(directory / "worker.toml", {})
    assert controller.cluster.mode == "controller" and controller.controller.bind == "0.0.0.0"
    assert controller.nats.embedded.host == "0.0.0.0" and controller.nats.embedded.users_file
    check_exposure(controller, "controller")  # secure: starts without --insecure
    assert worker.cluster.mode == "worker" and worker.nats.url == "nats://10.1.2.3:4222"
    assert (worker.nats.user, worker.nats.password) == ("worker", secure_dir["users"]["worker"]["password"])
    pinned = load(directory / "worker-pinned-1.toml", {})
    assert (pinned.worker.id, pinned.nats.user) == ("pinned-1", "worker-pinned-1")
    assert pinned.nats.password == secure_dir["users_by_name"]["worker-pinned-1"]["password"]
    key = (directory / "admin-api-key.txt").read_text().strip()
    assert key not in (directory / "controller.toml").read_text()  # only its SHA-256 is
    [entry] = controller.controller.keys
    assert entry.admin and entry.key_sha256
    again = CliRunner().invoke(cli_app, ["config", "init", "--secure", str(directory)])
    assert again.exit_code == 2 and "exists" in again.output


def role_config(base: Config, users_file: Path, user: dict[str, str]) -> Config:
    nats = msgspec.structs.replace(
        base.nats,
        user=user["user"],
        password=user["password"],
        embedded=msgspec.structs.replace(base.nats.embedded, users_file=str(users_file)),
    )
    return msgspec.structs.replace(base, nats=nats)


async def test_roles_are_enforced_by_nats_server(cluster_config: Config, secure_dir: dict[str, Any]) -> None:
    users_file = secure_dir["dir"] / "nats-users.json"
    users = secure_dir["users"]
    controller_config = role_config(cluster_config, users_file, users["controller"])
    worker_config = role_config(cluster_config, users_file, users["worker"])
    server = EmbeddedNatsServer(controller_config.nats)
    await server.start()
    try:
        # the wrong password gets no connection at all
        wrong = msgspec.structs.replace(controller_config.nats, user="worker", password="not-the-password")
        with pytest.raises(BusError):
            await Bus.connect(wrong, name="intruder", attempts=1)

        async with Cluster(controller_config) as cluster:
            await cluster.start_worker("w1", config=worker_config)
            controller = await cluster.start_controller()
            await wait_until(lambda: controller.ctx.registry.stats().online == 1, what="w1 online")

            # a client credential: try to read every worker's prompts and to register as a worker
            errors: list[str] = []

            async def on_error(exc: Exception) -> None:
                errors.append(str(exc))

            client = await nats.connect(
                server.url, user="client", password=users["client"]["password"], error_cb=on_error
            )
            stolen: list[bytes] = []

            async def steal(msg: Any) -> None:
                stolen.append(msg.data)

            prefix = cluster_config.nats.subject_prefix
            await client.subscribe(f"{prefix}.worker.*.inference", cb=steal)
            await client.subscribe(f"{prefix}.>", cb=steal)
            evil = WorkerRegistration(
                worker_id="evil", capabilities=Capabilities(models=["echo"], max_concurrent=64, engine="evil")
            )
            for _ in range(3):
                await client.publish(f"{prefix}.worker.register", encode(evil))
            await client.subscribe(f"{prefix}.worker.evil.inference", cb=steal)
            await client.flush()
            await wait_until(lambda: len(errors) >= 2, what="permission violations reported by the server")
            assert all("permissions violation" in e.lower() for e in errors), errors

            answers = controller.client()
            for i in range(4):
                done = await answers.chat.completions.create(
                    model="echo", messages=[{"role": "user", "content": f"secret prompt {i}"}]
                )
                assert done.choices[0].message.content == f"secret prompt {i}"
            await client.flush()
            await asyncio.sleep(0.2)  # any stolen message would have arrived with the answers
            assert stolen == [] and "evil" not in controller.ctx.registry
            assert [w["id"] for w in await controller.workers()] == ["w1"]
            await client.close()
    finally:
        await server.stop()


# --- the embedded server supervised in controller mode --------------------------------------------


@pytest.fixture
def controller_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    """``run --mode controller`` with the default config, only the ports moved to free ones."""
    with controller_mode_process(
        tmp_path, MLXCLUSTER_NATS_RECONNECT_TIME_WAIT_MS="100"
    ) as running:  # no cluster.toml in tmp_path: the defaults
        yield running


def health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return json.load(resp)
    except OSError:
        return None


def nats_children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "nats-server" in c.name()]


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_controller_mode_restarts_a_killed_nats_server(
    controller_process: tuple[subprocess.Popen[bytes], dict[str, int]],
) -> None:
    proc, ports = controller_process
    wait(lambda: (health(ports["http"]) or {}).get("state") == "ready", READY_S, "the controller ready")
    [first] = wait(lambda: nats_children(proc), 10, "the nats-server child")
    first.kill()
    wait(lambda: [c for c in nats_children(proc) if c.pid != first.pid], 30, "a new nats-server")
    body = wait(
        lambda: (lambda h: h if h and h["state"] == "ready" and h["status"] == "ok" else None)(health(ports["http"])),
        30,
        "ready again",
    )
    assert body["time"] > 0
    assert proc.poll() is None


def test_config_validate_checks_keys_and_the_users_file(secure_dir: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(cli_app, ["config", "validate", str(secure_dir["dir"] / "controller.toml")], env={})
    assert good.exit_code == 0 and good.output.strip().endswith(": ok"), good.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[[controller.keys]]\nname = "a"\nkey_env = "OPS_TEST_NOT_SET"\n')
    result = runner.invoke(cli_app, ["config", "validate", str(bad)], env={})
    assert result.exit_code == 2 and "controller.keys[0].key_env" in result.output
    missing = tmp_path / "missing.toml"
    missing.write_text('[nats.embedded]\nusers_file = "/nonexistent/users.json"\n')
    result = runner.invoke(cli_app, ["config", "validate", str(missing)], env={})
    assert result.exit_code == 2 and "nats.embedded.users_file" in result.output


async def test_a_worker_pinned_to_its_id_reads_only_its_own_requests(
    cluster_config: Config, secure_dir: dict[str, Any]
) -> None:
    """A per-worker NATS user serves its own id; it may claim another id, but never receives its prompts."""
    users_file = secure_dir["dir"] / "nats-users.json"
    pinned = secure_dir["users_by_name"]["worker-pinned-1"]
    controller_config = role_config(cluster_config, users_file, secure_dir["users"]["controller"])
    pinned_config = role_config(cluster_config, users_file, pinned)
    server = EmbeddedNatsServer(controller_config.nats)
    await server.start()
    try:
        async with Cluster(controller_config) as cluster:
            await cluster.start_worker("pinned-1", config=pinned_config)
            controller = await cluster.start_controller()
            await wait_until(lambda: controller.ctx.registry.stats().online == 1, what="pinned-1 online")
            done = await controller.client().chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "for pinned-1 only"}]
            )
            assert done.choices[0].message.content == "for pinned-1 only"
            errors: list[str] = []

            async def on_error(exc: Exception) -> None:
                errors.append(str(exc))

            thief = await nats.connect(server.url, user=pinned["user"], password=pinned["password"], error_cb=on_error)
            await thief.subscribe(f"{cluster_config.nats.subject_prefix}.worker.other.inference")
            await thief.flush()
            await wait_until(lambda: errors, what="a permissions violation")
            assert "permissions violation" in errors[0].lower()
            await thief.close()
    finally:
        await server.stop()
