"""The commands that ask a running controller (status, workers, requests, keys), in plain text and --json, and
the CLI's answers to bad arguments: one ``error:`` line and the exit code, never a traceback.

A real controller app (its factory) with two echo workers over the real nats-server; the CLI runs in typer's
CliRunner, so its stdout is no terminal and tables come out as plain text.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cluster_harness import Cluster, wait_until
from loopback import free_port
from typer.testing import CliRunner, Result

from mlxcluster.cli import app
from mlxcluster.config import ApiKeyEntry, Config
from mlxcluster.embedded import EmbeddedNatsServer

ADMIN, USER = "admin-key-for-the-cli", "user-key-of-app"
HELLO = [{"role": "user", "content": "one two three"}]


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test in an empty directory, without MLXCLUSTER_* variables from outside."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("MLXCLUSTER_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def keyed_config(cluster_config: Config) -> Config:
    """``cluster_config`` with a named user key (limits) and a named admin key."""
    keys = [
        ApiKeyEntry(name="app", key=USER, rpm=600, tpm=100_000),
        ApiKeyEntry(name="ops", key=ADMIN, admin=True),
    ]
    return msgspec.structs.replace(
        cluster_config, controller=msgspec.structs.replace(cluster_config.controller, keys=keys)
    )


@pytest.fixture
async def running(keyed_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    async with Cluster(keyed_config) as cluster:
        await cluster.start_worker("w1")
        await cluster.start_worker("w2")
        controller = await cluster.start_controller()
        await wait_until(lambda: controller.ctx.registry.stats().online == 2, what="two workers online")
        yield cluster


@pytest.fixture
def cli_config(tmp_path: Path) -> Path:
    """The CLI's config file: the user key listed before the admin key (the CLI must pick the admin one)."""
    path = tmp_path / "cli.toml"
    path.write_text(
        f'[[controller.keys]]\nname = "app"\nkey = "{USER}"\n\n'
        f'[[controller.keys]]\nname = "ops"\nkey = "{ADMIN}"\nadmin = true\n'
    )
    return path


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


async def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """The command in a thread (the controller serves on this loop meanwhile)."""
    return await asyncio.to_thread(invoke, *args, env=env)


async def test_status_plain_and_json(running: Cluster, cli_config: Path) -> None:
    assert running.controller is not None
    url = running.controller.url
    result = await cli("status", "--url", url, "-c", str(cli_config))
    assert result.exit_code == 0, result.output
    shown = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in result.stdout.splitlines()}
    assert list(shown) == ["controller", "balancer", "workers", "capacity", "models", "requests", "nats", "cache index"]
    assert shown["balancer"] == Config().load_balancing.strategy
    assert shown["cache index"].startswith("0 of 200,000 entries")
    assert shown["workers"].startswith("2 online, 0 degraded")
    assert shown["models"] == "echo"
    assert shown["nats"].startswith("connected to ")
    assert shown["controller"].endswith(", dual mode)")  # the default [cluster] mode of the test config
    data = json.loads((await cli("status", "--json", "--url", url, "-c", str(cli_config))).stdout)
    assert {"controller_id", "state", "uptime_s", "balancer", "workers", "requests", "nats", "models"} <= set(data)
    assert data["workers"]["online"] == 2 and data["models"] == ["echo"]


async def test_workers_requests_and_keys_tables_and_json(running: Cluster, cli_config: Path) -> None:
    controller = running.controller
    assert controller is not None
    await controller.client(api_key=USER).chat.completions.create(model="echo", messages=HELLO, max_tokens=3)
    await controller.client(api_key=ADMIN).chat.completions.create(model="echo", messages=HELLO, max_tokens=2)
    common = ["--url", controller.url, "-c", str(cli_config)]

    workers = await cli("workers", *common)
    assert workers.exit_code == 0, workers.output
    header, *rows = workers.stdout.splitlines()
    assert header.split() == "worker status models active queued tok/s free GB last seen breaker engine".split()
    assert sorted(row.split()[:3] for row in rows) == [["w1", "online", "echo"], ["w2", "online", "echo"]]
    listed = json.loads((await cli("workers", "--json", *common)).stdout)
    assert sorted(w["id"] for w in listed["workers"]) == ["w1", "w2"]
    shown_one = json.loads((await cli("workers", "show", "w1", *common)).stdout)
    assert shown_one["id"] == "w1" and shown_one["status"] == "online"
    resumed = json.loads((await cli("workers", "resume", "w2", "--json", *common)).stdout)
    assert (resumed["id"], resumed["status"]) == ("w2", "online")
    none_offline = await cli("workers", "--status", "offline", *common)
    assert none_offline.stdout.strip() == "no workers known"

    requests = await cli("requests", *common)
    assert requests.exit_code == 0, requests.output
    header, *rows = requests.stdout.splitlines()
    assert header.split()[:5] == ["request", "key", "model", "worker", "state"]
    assert sorted(row.split()[1] for row in rows) == ["app", "ops"]
    assert all(row.split()[2:5:2] == ["echo", "ok"] for row in rows)
    latest = json.loads((await cli("requests", "--json", "--limit", "1", *common)).stdout)
    assert set(latest) >= {"in_flight", "recent"} and len(latest["recent"]) == 1

    keys = await cli("keys", *common)
    assert keys.exit_code == 0, keys.output
    header, *rows = keys.stdout.splitlines()
    assert header.split()[:4] == ["key", "role", "rpm", "tpm"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["app"][1:4] == ["-", "600", "100000"]
    assert by_name["ops"][1:4] == ["admin", "-", "-"]
    assert by_name["app"][5] == "1"  # requests
    shown = json.loads((await cli("keys", "--json", *common)).stdout)
    assert {k["name"] for k in shown["keys"]} == {"app", "ops"}
    assert ADMIN not in keys.stdout + json.dumps(shown) and USER not in keys.stdout  # never a key's value


async def test_a_user_key_is_refused_the_admin_commands(running: Cluster) -> None:
    assert running.controller is not None
    url = running.controller.url
    result = await cli("keys", "--url", url, env={"MLXCLUSTER_API_KEY": USER})
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {url}/api/cluster/keys: HTTP 403: ") and result.stderr.count("\n") == 1
    drained = await cli("workers", "drain", "w1", "--url", url, env={"MLXCLUSTER_API_KEY": USER})
    assert drained.exit_code == 1 and "HTTP 403" in drained.stderr
    mine = json.loads((await cli("requests", "--json", "--url", url, env={"MLXCLUSTER_API_KEY": USER})).stdout)
    assert mine["recent"] == []  # a user key sees only its own requests: none yet


@pytest.mark.parametrize("command", [["status"], ["workers"], ["requests"], ["keys"], ["workers", "show", "w1"]])
def test_no_controller_is_one_line_and_exit_1(command: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke(*command, "--url", url)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: cannot reach the controller at {url}: ")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_the_url_comes_from_the_config_when_not_given(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "cluster.toml"
    config.write_text(f'[controller]\nbind = "0.0.0.0"\nport = {port}\n')
    result = invoke("status", "-c", str(config))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach the controller at http://127.0.0.1:{port}: ")


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["run", "--mode", "bogus"], 2, "error: --mode: expected controller, worker or dual, got 'bogus'"),
        (["workers", "set", "w1", "--url", "http://127.0.0.1:9"], 2, "error: give --priority and/or --tags"),
        (["models", "import", "x.gguf", "--name", "../up"], 2, "error: invalid model name '../up'"),
        (["models", "import", "absent.gguf"], 2, "error: no such file: absent.gguf"),
        (["config", "init", "--secure", "--workers", "a b"], 2, "error: --workers: 'a b' is not a worker id"),
    ],
)
def test_bad_arguments_are_one_error_line(
    args: list[str], code: int, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLXCLUSTER_MODELS_DIR", str(tmp_path / "models"))
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["frobnicate"], "No such command 'frobnicate'"),
        (["run", "--workers", "0"], "Invalid value for '--workers'"),
        (["requests", "--limit", "many"], "Invalid value for '--limit'"),
        (["models", "import", "x.gguf", "--dequantize", "q2"], "Invalid value for '--dequantize'"),
    ],
)
def test_usage_errors_exit_2_with_typers_message(args: list[str], expected: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert expected in result.stderr and "Traceback" not in result.output


def test_every_group_without_a_command_shows_its_help() -> None:
    for group in ["config", "bench", "models", "balancers", "exporters"]:
        result = invoke(group)
        assert "Usage: " in result.output and "Commands" in result.output, group


def test_json_of_models_list_and_balancers_list_shapes(tmp_path: Path) -> None:
    models: Any = json.loads(invoke("models", "list", "--json", "--models-dir", str(tmp_path)).stdout)
    assert models == []
    empty = invoke("models", "list", "--models-dir", str(tmp_path))
    assert empty.exit_code == 0 and empty.stdout == "" and f"no models in {tmp_path}" in empty.stderr
    missing = invoke("balancers", "list", "--json", "-c", str(tmp_path / "none.toml"))
    assert missing.exit_code == 2 and missing.stdout == "" and "none.toml: cannot read" in missing.stderr
    listed = json.loads(invoke("balancers", "list", "--json").stdout)
    assert all(set(r) == {"name", "plugin", "package", "version", "description", "selected"} for r in listed)
    assert [r["name"] for r in listed if r["selected"]] == [Config().load_balancing.strategy]


def test_doctor_plain_says_each_check_on_one_line() -> None:
    checks = json.loads(invoke("doctor", "--json").stdout)
    result = invoke("doctor")
    assert result.exit_code == (1 if any(c["status"] == "fail" for c in checks) else 0)
    lines = result.stdout.splitlines()
    marks = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
    assert [line.split()[:2] for line in lines] == [[marks[c["status"]], c["name"].split()[0]] for c in checks]


def test_bench_nats_prints_its_table_in_plain_text() -> None:
    result = invoke("bench", "nats", "--requests", "20", "--messages", "200")
    assert result.exit_code == 0, result.output
    title, header, *rows = result.stdout.splitlines()
    assert title.startswith("bench nats — ") and header.split() == ["measure", "result", "target"]
    assert len(rows) >= 3 and not any(set(row) <= {"-", " "} for row in rows)  # no rule line
