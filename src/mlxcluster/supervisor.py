"""The supervisor of a node's processes: dual mode (nats-server, the controller processes and N workers), and
a controller tier (``controller.processes`` > 1: N controller processes sharing the HTTP port, with
nats-server when NATS is embedded).

Children are separate processes (the GIL and the MLX thread must not share a process with the API).
The supervisor resolves the workers' model once, before it starts them (a download happens here, once,
with its progress on the supervisor's terminal; the workers then find it in the cache and never download).
A child that dies is restarted with exponential backoff, except one that exits with
:data:`~mlxcluster.errors.CANNOT_START` (its settings are wrong; restarting would not help): a controller
stops the whole supervisor, a worker is left stopped while the controller keeps serving the others.
SIGINT/SIGTERM stops them in order — the controllers first, together (they drain), then the workers
together, then nats-server. On Linux each child also gets ``PR_SET_PDEATHSIG`` so that none outlives a supervisor
killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field

from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer, die_with_parent, keep_server_running
from mlxcluster.errors import CANNOT_START, NodeError
from mlxcluster.startup import StartInterrupted, on_daemon_thread, until_stop
from mlxcluster.worker.blas import preload_env

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 10.0


@dataclass
class ChildSpec:
    """How to start one supervised child."""

    name: str
    argv: list[str]
    env: dict[str, str]
    stop_timeout_s: float = 10.0
    essential: bool = False
    """Nothing works without it (the controller): if it cannot start, the supervisor stops."""


@dataclass
class Child:
    """A supervised child and its restart bookkeeping."""

    spec: ChildSpec
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    cannot_start: bool = False
    """It exited with CANNOT_START and is not restarted."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def controller_processes(config: Config, role: str) -> int:
    """The controller processes a node runs: ``controller.processes``, or by default min(cores, 4) for ``role``
    controller on Linux, and 1 in dual mode or elsewhere (macOS lets several sockets bind one port with
    ``SO_REUSEPORT`` but does not spread connections over them, as Linux does)."""
    wanted = config.controller.processes
    if wanted is None:
        return min(os.cpu_count() or 1, 4) if role == "controller" and sys.platform == "linux" else 1
    return wanted


def child_command() -> list[str]:
    """The command that runs this same mlxcluster (venv, source tree or zipapp) as a child."""
    return [sys.executable, "-m", "mlxcluster"]


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The supervisor's environment plus ``extra``, with our import path so a zipapp child finds us."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra)
    return env


class Supervisor:
    """Starts and watches a node's processes: ``controllers`` controller processes, then ``workers`` workers.

    :param embedded_nats: start nats-server for them (dual mode always; a controller tier when
        ``nats.mode = "embedded"``); otherwise the children connect to ``nats.url`` themselves.
    """

    def __init__(self, config: Config, *, workers: int = 1, controllers: int = 1, embedded_nats: bool = True) -> None:
        self.config = config
        self.workers = workers
        self.controllers = controllers
        self.embedded_nats = embedded_nats
        self.children: list[Child] = []
        self.stopping = False
        self.exit_code = 0
        self._stop = asyncio.Event()

    def specs(self, nats_url: str | None) -> list[ChildSpec]:
        """The controllers then the workers, each pointed at the embedded server (``nats_url``; ``None``: the
        children's own ``nats.url``)."""
        common = {} if nats_url is None else {"MLXCLUSTER_NATS_MODE": "external", "MLXCLUSTER_NATS_URL": nats_url}
        base_id = self.config.worker.id or socket.gethostname().split(".")[0]
        tier = {"MLXCLUSTER_CONTROLLER_PROCESSES": "1"}  # each child is one process of the tier
        if self.controllers > 1:
            tier["MLXCLUSTER_CONTROLLER_REUSE_PORT"] = "true"
        specs = [
            ChildSpec(
                "controller" if self.controllers == 1 else f"controller {index + 1}",
                [*child_command(), "run", "--mode", "controller"],
                child_env({**common, **tier}),
                stop_timeout_s=self.config.controller.drain_timeout_s + 5,
                essential=True,
            )
            for index in range(self.controllers)
        ]
        worker_common = {**common, **self.blas_env()}
        group_size = self.config.worker.group.size
        for index in range(self.workers):
            worker_id = base_id if self.workers == 1 and self.config.worker.id else f"{base_id}-w{index + 1}"
            env = {**worker_common, "MLXCLUSTER_WORKER_ID": worker_id}
            if group_size > 1:  # local worker groups: members g1-r0 .. g1-r(N-1), g2-r0 ...
                group, rank = divmod(index, group_size)
                name = self.config.worker.group.name or f"{base_id}-g{group + 1}"
                if self.workers > group_size:
                    name = f"{name}-{group + 1}" if self.config.worker.group.name else name
                worker_id = f"{name}-r{rank}"
                env.update(
                    MLXCLUSTER_WORKER_ID=worker_id,
                    MLXCLUSTER_WORKER_GROUP_NAME=name,
                    MLXCLUSTER_WORKER_GROUP_RANK=str(rank),
                )
            specs.append(
                ChildSpec(
                    f"worker {worker_id}",
                    [*child_command(), "run", "--mode", "worker"],
                    child_env(env),
                    stop_timeout_s=self.config.worker.drain_timeout_s + 5,
                )
            )
        return specs

    def check_groups(self) -> str | None:
        """A problem with dual mode's local groups, or None."""
        size = self.config.worker.group.size
        if size > 1 and self.workers % size:
            return f"--workers {self.workers} is not a multiple of --group-size {size}"
        return None

    def blas_env(self) -> dict[str, str]:
        """CPU fast path for mlx workers: preload the system OpenBLAS, its threads shared among the workers."""
        if self.config.worker.engine != "mlx" or self.workers == 0:  # a controller tier starts no worker
            return {}
        preload = preload_env(os.environ).get("LD_PRELOAD")
        if not preload or preload == os.environ.get("LD_PRELOAD"):
            return {}
        env = {"LD_PRELOAD": preload}
        if "OPENBLAS_NUM_THREADS" not in os.environ:
            env["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.workers))
        return env

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set (or the controller cannot start), then stop children in order; return the
        exit code.

        :raises StartInterrupted: ``stop`` was set while the model was being resolved (children stopped; its
            ``code`` is :data:`CANNOT_START` when the controller could not start meanwhile).
        """
        problem = self.check_groups()
        if problem is not None:
            raise NodeError(problem)
        self._stop = stop
        server = EmbeddedNatsServer(self.config.nats) if self.embedded_nats else None
        watch_server = None
        if server is not None:
            await server.start()
            watch_server = asyncio.create_task(self._watch_server(server, stop))
        try:
            self.children = [Child(spec) for spec in self.specs(server.url if server is not None else None)]
            controllers, workers = self.children[: self.controllers], self.children[self.controllers :]
            for controller in controllers:
                self._start(controller)
            try:
                resolved = await self._resolve_model(workers, stop)
            except StartInterrupted as exc:  # a signal, or the controller could not start (exit_code says which)
                raise StartInterrupted(str(exc), self.exit_code) from None
            if resolved:
                for child in workers:
                    self._start(child)
                log.info(
                    "%s%d children running; Ctrl-C stops them",
                    "nats-server + " if server is not None else "",
                    len(self.children),
                )
            await stop.wait()
        finally:
            self.stopping = True
            if watch_server is not None:
                watch_server.cancel()
            if self.children:  # controllers first: they drain in-flight requests; then the workers, together
                await asyncio.gather(*(self._stop_child(child) for child in self.children[: self.controllers]))
                await asyncio.gather(*(self._stop_child(child) for child in self.children[self.controllers :]))
            if server is not None:
                await server.stop()
        return self.exit_code

    def _start(self, child: Child) -> None:
        child.task = asyncio.create_task(self._keep_running(child))

    async def _resolve_model(self, workers: list[Child], stop: asyncio.Event) -> bool:
        """Resolve ``worker.model`` once for every local worker (downloading it into the Hugging Face cache if
        need be); ``False`` when it cannot be had: the workers are then not started, and the log says why."""
        if self.config.worker.engine != "mlx" or not workers:
            return True
        from mlxcluster.worker.models import resolve_model

        try:
            model = await until_stop(
                on_daemon_thread(resolve_model, self.config.worker.model, self.config.models_dir),
                stop,
                "resolving the model",
            )
        except NodeError as exc:
            log.error("%s", exc)
            log.error(
                "not starting the %d worker(s): they cannot start without their model; the controller keeps "
                "serving (workers elsewhere may join; Ctrl-C stops it)",
                len(workers),
            )
            for child in workers:
                child.cannot_start = True
            return False
        if model.source == "hf-cache":  # the workers find it in the cache; none of them downloads
            for child in workers:
                child.spec.env["HF_HUB_OFFLINE"] = "1"
        return True

    async def _keep_running(self, child: Child) -> None:
        """Start the child; whenever it exits unexpectedly, restart it with backoff (never one that cannot start)."""
        delay = 0.5
        while not self.stopping:
            child.started_at = time.monotonic()
            child.process = await asyncio.create_subprocess_exec(
                *child.spec.argv,
                env=child.spec.env,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop children in order
                preexec_fn=die_with_parent,
            )
            log.info("started %s (pid %d)", child.spec.name, child.process.pid)
            code = await child.process.wait()
            if self.stopping:
                return
            if code == CANNOT_START:
                child.cannot_start = True
                if child.spec.essential:
                    log.error("%s cannot start with these settings (see its error above); stopping", child.spec.name)
                    self.exit_code = CANNOT_START
                    self._stop.set()
                else:
                    log.error(
                        "%s cannot start with these settings (see its error above); not restarting it "
                        "(the controller keeps serving the other workers)",
                        child.spec.name,
                    )
                return
            if time.monotonic() - child.started_at > STABLE_AFTER_S:
                delay = 0.5
            child.restarts += 1
            log.warning("%s exited with code %s; restarting in %.1fs", child.spec.name, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    async def _stop_child(self, child: Child) -> None:
        """SIGTERM, wait for the child's own drain, then SIGKILL."""
        process = child.process
        if child.task is not None:
            child.task.cancel()
        if process is None or process.returncode is not None:
            return
        await terminate(process, child.spec.stop_timeout_s, child.spec.name)

    async def _watch_server(self, server: EmbeddedNatsServer, stop: asyncio.Event) -> None:
        """Restart nats-server if it dies (clients reconnect by themselves)."""
        await keep_server_running(server, lambda: stop.is_set() or self.stopping)


async def terminate(
    process: asyncio.subprocess.Process,
    timeout: float,
    name: str,
) -> None:
    """Send SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout)
        log.info("%s stopped (code %s)", name, process.returncode)
    except TimeoutError:
        log.warning("%s did not stop within %.0fs; killing it", name, timeout)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
