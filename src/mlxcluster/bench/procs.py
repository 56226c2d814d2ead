"""Processes for benchmarks: a controller and workers as real subprocesses on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from mlxcluster.bench.nats import free_port
from mlxcluster.supervisor import child_env

_PROFILED = """
import cProfile, runpy, sys, time
out, sys.argv = sys.argv[1], ["mlxcluster", *sys.argv[2:]]
profile = cProfile.Profile(time.process_time)
try:
    profile.runcall(runpy.run_module, "mlxcluster", run_name="__main__")
except SystemExit:
    pass
finally:
    profile.dump_stats(out)
"""
"""``python -c`` code running ``mlxcluster ARGS`` under cProfile in CPU time (``time.process_time``): on a
machine whose cores are shared, wall-clock profiles would charge the time a process waited for a core to
whatever call it was in."""


@dataclass
class BenchCluster:
    """nats-server URL plus the controller and worker processes started for one benchmark."""

    nats_url: str
    http_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mlxcluster-bench-")))
    names: list[str] = field(default_factory=list)
    nats_pid: int | None = None
    """The nats-server the children use, when the benchmark started it (for its CPU time)."""
    profile_dir: Path | None = None
    """When set, every child runs under cProfile (CPU time) and writes ``<name>.prof`` there when it stops."""
    api_key: str | None = None
    """The key :meth:`wait_for_workers` sends, for controllers that require one."""

    def pids(self) -> tuple[int, ...]:
        """Every process of this cluster: the children it started and the nats-server, when it started one."""
        own = tuple(process.pid for process in self.processes)
        return (*own, self.nats_pid) if self.nats_pid is not None else own

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _spawn(self, name: str, role: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
        env = child_env(
            {
                "MLXCLUSTER_NATS_MODE": "external",
                "MLXCLUSTER_NATS_URL": self.nats_url,
                "MLXCLUSTER_CONTROLLER_PORT": str(self.http_port),
                "MLXCLUSTER_LOGGING_LEVEL": "warning",
                **self.env,
                **extra,
            }
        )
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115  (the child keeps it)
        command = ["-m", "mlxcluster", "run", "--mode", role]
        if self.profile_dir is not None:
            command = ["-c", _PROFILED, str(self.profile_dir / f"{name}.prof"), *command[2:]]
        process = subprocess.Popen(
            [sys.executable, *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        self.names.append(name)
        return process

    def start_controller(self, processes: int = 1, port: int | None = None) -> str:
        """A controller of ``processes`` processes (one port, a supervisor above them when more than one) on
        ``port`` (default: ``http_port``); returns its base URL."""
        port = self.http_port if port is None else port
        name = "controller" if port == self.http_port else f"controller-{port}"
        extra = {"MLXCLUSTER_CONTROLLER_PROCESSES": str(processes), "MLXCLUSTER_CONTROLLER_PORT": str(port)}
        self._spawn(name, "controller", extra)
        return f"http://127.0.0.1:{port}"

    def start_worker(self, worker_id: str, extra: dict[str, str] | None = None) -> None:
        self._spawn(worker_id, "worker", {"MLXCLUSTER_WORKER_ID": worker_id, **(extra or {})})

    async def wait_for_workers(self, count: int, timeout: float = 120.0, base_url: str | None = None) -> None:
        """Until the controller (at ``base_url``, default :attr:`base_url`) lists ``count`` online workers."""
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        async with aiohttp.ClientSession(headers=headers) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(
                        f"{base_url or self.base_url}/api/cluster/workers?status=online"
                    ) as response:
                        if response.status == 200 and len((await response.json())["workers"]) >= count:
                            return
                for name, process in zip(self.names, self.processes, strict=True):
                    if process.poll() is not None:
                        tail = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                        raise RuntimeError(f"{name} exited with code {process.returncode}: " + " | ".join(tail))
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{count} worker(s) did not come online within {timeout:.0f}s")

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            reap(process, timeout=15)
        self.processes.clear()


def reap(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``process`` to exit, killing it after ``timeout`` seconds."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM ``process``, then :func:`reap` it."""
    process.terminate()
    reap(process, timeout)


async def wait_http(
    url: str, process: subprocess.Popen[bytes], timeout: float = 180.0, *, post: dict[str, object] | None = None
) -> None:
    """Until ``url`` answers 200 (a GET, or a POST of ``post``); fails at once if ``process`` exits."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                request = session.get(url) if post is None else session.post(url, json=post)
                async with request as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@contextlib.contextmanager
def bench_cluster(nats_url: str, **env: str) -> Iterator[BenchCluster]:
    """A :class:`BenchCluster` that is always stopped."""
    cluster = BenchCluster(nats_url=nats_url, env=dict(env))
    try:
        yield cluster
    finally:
        cluster.stop()
