"""A controller tier: ``run --mode controller --processes 2`` as a user starts it (a supervisor, nats-server, two
controller processes on one port), an echo worker beside it; requests spread over both processes, the status
lists the whole tier whichever process answers, and a killed process is restarted while requests go on."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from dual_harness import READY_TIMEOUT_S, Dual, alive, cmdline, dual_runs

from mlxcluster.config import from_dict
from mlxcluster.controller.peers import CONTROLLER_HEADER
from mlxcluster.supervisor import Supervisor, controller_processes


def test_processes_default_to_the_cores_for_a_controller_and_one_in_dual_mode(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("sys.platform", "darwin")  # no balancing of SO_REUSEPORT listeners there: one process
    assert controller_processes(from_dict({}), "controller") == 1
    assert controller_processes(from_dict({"controller": {"processes": 3}}), "controller") == 3
    monkeypatch.setattr("sys.platform", "linux")
    assert controller_processes(from_dict({}), "controller") == 4  # min(cores, 4)
    assert controller_processes(from_dict({}), "dual") == 1
    assert controller_processes(from_dict({"controller": {"processes": 3}}), "dual") == 3
    assert controller_processes(from_dict({"controller": {"processes": 1}}), "controller") == 1
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert controller_processes(from_dict({}), "controller") == 2


def test_each_process_of_a_tier_is_one_process_sharing_the_port() -> None:
    specs = Supervisor(from_dict({}), workers=1, controllers=2).specs("nats://127.0.0.1:4222")
    controllers, workers = specs[:2], specs[2:]
    assert [spec.name for spec in controllers] == ["controller 1", "controller 2"]
    for spec in controllers:
        assert spec.essential and spec.argv[-2:] == ["--mode", "controller"]
        assert spec.env["MLXCLUSTER_CONTROLLER_PROCESSES"] == "1"  # a child never starts a tier of its own
        assert spec.env["MLXCLUSTER_CONTROLLER_REUSE_PORT"] == "true"
    assert len(workers) == 1 and "MLXCLUSTER_CONTROLLER_REUSE_PORT" not in workers[0].env
    single = Supervisor(from_dict({}), workers=0, controllers=1).specs(None)
    assert [spec.name for spec in single] == ["controller"]
    assert "MLXCLUSTER_CONTROLLER_REUSE_PORT" not in single[0].env and "MLXCLUSTER_NATS_URL" not in single[0].env


@pytest.fixture
def start_tier(tmp_path: Path) -> Iterator[Callable[..., Dual]]:
    with dual_runs(tmp_path) as start:
        yield start


def chat(url: str, text: str) -> tuple[str, str]:
    """One chat completion on a new connection: (the answer, the controller process that gave it)."""
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["choices"][0]["message"]["content"], response.headers[CONTROLLER_HEADER]


@pytest.mark.timeout(180)
def test_two_processes_share_the_port_and_a_killed_one_is_restarted(start_tier: Callable[..., Dual]) -> None:
    metrics = {"MLXCLUSTER_METRICS_EXPORTERS": "prometheus", "MLXCLUSTER_METRICS_SNAPSHOT_INTERVAL_S": "0.5"}
    tier = start_tier("--processes", "2", mode="controller", env=metrics)
    worker = subprocess.Popen(
        [sys.executable, "-m", "mlxcluster", "run", "--mode", "worker"],
        env={**tier.env, "MLXCLUSTER_WORKER_ENGINE": "echo", "MLXCLUSTER_WORKER_ID": "tier-w1"},
        cwd=tier.tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def tier_of_two() -> bool:
            status, body = tier.http("/api/cluster/status")
            return status == 200 and (body.get("tier") or {}).get("controllers_online") == 2

        def both_see_the_worker() -> bool:  # a new connection per probe: either process may answer
            answered = {tier.http("/ready")[0] for _ in range(6)}
            return answered == {200}

        tier.wait_for(tier_of_two, READY_TIMEOUT_S, "two controller processes")
        tier.wait_for(both_see_the_worker, READY_TIMEOUT_S, "the worker online in both processes")
        assert len(tier.role("controller")) == 2

        served = Counter(chat(tier.url, f"hello {n}")[1] for n in range(40))
        assert len(served) == 2, served  # the kernel spreads connections over both processes
        answers: list[dict[str, Any]] = []

        def both_listed_online() -> bool:  # a heartbeat may come late on a loaded machine: wait, do not sample once
            body = tier.http("/api/cluster/status")[1]
            answers.append(body)
            return set(served) == {row["id"] for row in body["controllers"] if row["status"] == "online"}

        tier.wait_for(both_listed_online, READY_TIMEOUT_S, "both processes listed online")
        body = answers[-1]
        listed = {row["id"]: row for row in body["controllers"]}
        assert body["controller_id"] in served and listed[body["controller_id"]]["self"]  # says who answered
        assert sum(row["self"] for row in body["controllers"]) == 1
        assert body["mode"] == "controller"  # the tier's processes, not dual mode's

        def tier_counted() -> bool:  # both processes' counters, from their heartbeats, in either's answer
            tier_figures = tier.http("/api/cluster/status")[1].get("tier") or {}
            return tier_figures.get("completed", 0) >= 40 and tier_figures.get("requests_total", 0) >= 40

        tier.wait_for(tier_counted, READY_TIMEOUT_S, "the tier's request counts summed in the status")

        def scraped_tier() -> bool:  # /metrics of whichever process answers: the tier's gauge counts both
            try:
                with urllib.request.urlopen(f"{tier.url}/metrics", timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                return False
            counted = re.search(r"^mlxcluster_tier_request_duration_seconds_count (\S+)$", text, re.M)
            return 'mlxcluster_tier{figure="controllers_online"} 2.0' in text and (
                counted is not None and float(counted.group(1)) >= 40  # both processes' requests
            )

        tier.wait_for(lambda: all(scraped_tier() for _ in range(4)), READY_TIMEOUT_S, "mlxcluster_tier in /metrics")

        # Kill one process: the other keeps serving at once; the supervisor starts a new one.
        victim = tier.role("controller")[0]
        victim.kill()
        victim.wait(timeout=10)
        answers = [chat(tier.url, f"after the kill {n}") for n in range(20)]
        assert [text for text, _ in answers] == [f"after the kill {n}" for n in range(20)]
        survivor = {answered_by for _, answered_by in answers}
        assert len(survivor) == 1 and survivor <= set(served)
        tier.wait_for(
            lambda: [p for p in tier.role("controller") if p.pid != victim.pid and p.is_running()][1:],
            READY_TIMEOUT_S,
            "the killed controller process restarted",
        )
        assert "restarting" in tier.output()

        def restarted_serves() -> bool:
            try:  # the new process may answer before it has heard of the worker (a 503)
                ids = {chat(tier.url, "again")[1] for _ in range(12)}
            except OSError:
                return False
            return len(ids) == 2 and bool(ids - set(served))

        tier.wait_for(restarted_serves, READY_TIMEOUT_S, "the new process serving beside the survivor")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
    assert tier.proc.poll() is None  # the supervisor rode it out

    # SIGTERM: both processes drain and stop, then nats-server; exit 0, nothing left behind.
    children = tier.children()
    assert len([c for c in children if "--mode controller" in cmdline(c)]) == 2
    tier.proc.send_signal(signal.SIGTERM)
    assert tier.proc.wait(timeout=30) == 0, tier.output()[-4000:]
    _, still_alive = psutil.wait_procs(children, timeout=5)
    assert not [cmdline(c) for c in still_alive if alive(c)], "children outlived the supervisor"
    assert "Traceback" not in tier.output()
