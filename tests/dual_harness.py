"""``mlxcluster run --mode dual`` as a user starts it, for tests: one supervisor on free ports in its own
directory, and everything it started killed at the end."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import psutil
from loopback import free_port

READY_TIMEOUT_S = 60.0  # CI has two slow cores and starts three Python processes


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


class Dual:
    """One ``run --mode dual`` supervisor on free ports, in its own directory, killed with all its children."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        nats_port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MLXCLUSTER_")}
        if "MLXCLUSTER_MODELS_DIR" in os.environ:
            environment["MLXCLUSTER_MODELS_DIR"] = os.environ["MLXCLUSTER_MODELS_DIR"]
        environment.update(
            PYTHONUNBUFFERED="1",
            MLXCLUSTER_NATS_EMBEDDED_PORT=str(nats_port),
            MLXCLUSTER_NATS_URL=f"nats://127.0.0.1:{nats_port}",
            MLXCLUSTER_NATS_EMBEDDED_HTTP_PORT="0",
            MLXCLUSTER_CONTROLLER_PORT=str(self.port),
            MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS="200",
            MLXCLUSTER_DISCOVERY_OFFLINE_TIMEOUT_MS="1500",
            **(env or {}),
        )
        self.log_path = tmp_path / "dual.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlxcluster", "run", "--mode", "dual", *args],
                cwd=tmp_path,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.seen: dict[int, psutil.Process] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        """The supervisor's descendants now (remembered, so orphans can be killed at clean-up)."""
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update((c.pid, c) for c in found)
        return found

    def role(self, name: str) -> list[psutil.Process]:
        return [c for c in self.children() if f"--mode {name}" in cmdline(c) and alive(c)]

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) waiting for {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def http(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}

    def ready(self) -> bool:
        return self.http("/ready")[0] == 200

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)

    def cleanup(self) -> None:
        self.children()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        leftovers = [c for c in self.seen.values() if alive(c)]
        for child in leftovers:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=5)


@contextlib.contextmanager
def dual_runs(tmp_path: Path) -> Iterator[Callable[..., Dual]]:
    """A starter of :class:`Dual` supervisors in ``tmp_path``; each is killed with its children on exit."""
    started: list[Dual] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Dual:
        dual = Dual(tmp_path, *args, env=env)
        started.append(dual)
        return dual

    try:
        yield start
    finally:
        for dual in started:
            dual.cleanup()
