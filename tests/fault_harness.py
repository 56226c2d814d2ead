"""Real processes for the fault tests: nats-server nodes, controller and worker subprocesses, a load generator.

Every process is started in its own session (so a signal reaches it and anything it spawned) with
``PR_SET_PDEATHSIG`` (so none outlives a killed pytest), logs to a file under the test's tmp dir, and is
killed by :meth:`Processes.close` in the test's ``finally``. Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
from cluster_harness import wait_until
from loopback import free_port

from mlxcluster.embedded import die_with_parent, nats_server_binary

START_TIMEOUT_S = 30.0  # two slow, busy cores start several Python processes at once
HEARTBEAT_MS = 200
OFFLINE_TIMEOUT_MS = 1500


def base_env(**extra: str) -> dict[str, str]:
    """Our environment without any ``MLXCLUSTER_*`` of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXCLUSTER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextlib.contextmanager
def controller_mode_process(
    cwd: Path, *, monitor: bool = False, **extra_env: str
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    """``run --mode controller`` in ``cwd`` with the default config, only its ports moved to free ones.

    Yields the process and its ports (``http``, ``nats`` and, with ``monitor``, the NATS ``monitor`` port;
    without it the monitoring port is off). On exit it is stopped with SIGTERM (killed after 20 s) and
    the children it started (the embedded nats-server) are waited for.
    """
    ports = {"http": free_port(), "nats": free_port()}
    if monitor:
        ports["monitor"] = free_port()
    env = base_env(
        MLXCLUSTER_CONTROLLER_PORT=str(ports["http"]),
        MLXCLUSTER_NATS_EMBEDDED_PORT=str(ports["nats"]),
        MLXCLUSTER_NATS_URL=f"nats://127.0.0.1:{ports['nats']}",
        MLXCLUSTER_NATS_EMBEDDED_HTTP_PORT=str(ports.get("monitor", 0)),
        **extra_env,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxcluster", "run", "--mode", "controller"],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc, ports
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        psutil.wait_procs(children, timeout=5)


class Proc:
    """One child process in its own session, logging to ``log_path``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the group (a stopped process dies too) and reap the child."""
        if self.popen is None:
            return
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code once the child exits, or ``None`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.returncode is not None:
                return self.returncode
            await asyncio.sleep(0.05)
        return self.returncode

    def output(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


@dataclass
class NatsNode:
    """One ``nats-server`` process on ``host:port``, optionally a member of a cluster (``routes``: the other
    members' ``host:port`` route addresses)."""

    name: str
    port: int
    host: str = "127.0.0.1"
    cluster_port: int | None = None
    routes: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # e.g. ``ip netns exec NS``: the "machine" it runs on
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def config_text(self) -> str:
        lines = [f"server_name: {self.name}", f"host: {self.host}", f"port: {self.port}", "http_port: 0"]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://{route}" for route in self.routes)
            lines += [
                "cluster {",
                '  name: "mlxc"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"


class Processes:
    """Starts nats-server nodes, controllers and workers for one test; :meth:`close` kills them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []
        self._counts: Counter[str] = Counter()

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Start ``argv`` as a process this test owns (logging to ``<name>.<n>.log``)."""
        self._counts[name] += 1
        log_path = self.tmp_path / f"{name}.{self._counts[name]}.log"
        proc = Proc(name, argv, env, self.tmp_path, log_path).start()
        self.procs.append(proc)
        return proc

    # --- nats-server ------------------------------------------------------------------------------

    async def nats(self, node: NatsNode) -> NatsNode:
        """Start ``node`` (again, after a kill: same ports) and wait until it is ready for clients."""
        conf = self.tmp_path / f"{node.name}.conf"
        conf.write_text(node.config_text(), encoding="utf-8")
        node.proc = self.spawn(node.name, [*node.prefix, str(nats_server_binary()), "-c", str(conf)], base_env())
        proc = node.proc

        def ready() -> bool:  # its log says so (the port may be in another network namespace)
            if not proc.alive:
                raise AssertionError(f"{node.name} exited ({proc.returncode}):\n{proc.output()}")
            return "Server is ready" in proc.output(10**6)

        await wait_until(ready, START_TIMEOUT_S, f"{node.name} ready on {node.url}", interval=0.05)
        return node

    async def nats_cluster(self, machines: Machines, size: int = 3) -> list[NatsNode]:
        """``size`` nats-server processes, one per machine, joined by cluster routes (each lists the others)."""
        hosts = [machines.host(i) for i in range(size)]
        ports = [free_port() for _ in range(size)]
        cluster_ports = [free_port() for _ in range(size)]
        routes = [f"{hosts[i]}:{cluster_ports[i]}" for i in range(size)]
        nodes = [
            NatsNode(
                f"n{i + 1}",
                ports[i],
                hosts[i],
                cluster_ports[i],
                [r for j, r in enumerate(routes) if j != i],
                prefix=machines.prefix(i),
            )
            for i in range(size)
        ]
        for node in nodes:
            await self.nats(node)
        return nodes

    # --- mlxcluster nodes -------------------------------------------------------------------------

    def node_env(self, nats_urls: Iterable[str], defaults: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
        """Fast discovery, ``defaults``, then ``extra`` (which wins)."""
        settings = {
            "MLXCLUSTER_NATS_MODE": "external",
            "MLXCLUSTER_NATS_URL": ",".join(nats_urls),
            "MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_MS),
            "MLXCLUSTER_DISCOVERY_OFFLINE_TIMEOUT_MS": str(OFFLINE_TIMEOUT_MS),
            **defaults,
            **extra,
        }
        return base_env(**settings)

    def worker(
        self,
        worker_id: str,
        nats_urls: Iterable[str],
        *,
        token_delay_ms: int = 20,
        prefix: Iterable[str] = (),
        **extra: str,
    ) -> Proc:
        """An echo worker process (``prefix``: e.g. ``ip netns exec NS``; ``extra``: ``MLXCLUSTER_*`` settings)."""
        defaults = {
            "MLXCLUSTER_WORKER_ENGINE": "echo",
            "MLXCLUSTER_WORKER_ID": worker_id,
            "MLXCLUSTER_WORKER_ECHO_TOKEN_DELAY_MS": str(token_delay_ms),
            "MLXCLUSTER_WORKER_DRAIN_TIMEOUT_S": "5",
        }
        env = self.node_env(nats_urls, defaults, extra)
        return self.spawn(worker_id, [*prefix, sys.executable, "-m", "mlxcluster", "run", "--mode", "worker"], env)

    def controller(
        self,
        nats_urls: Iterable[str],
        *,
        port: int | None = None,
        machines: Machines | None = None,
        machine: int = 0,
        **extra: str,
    ) -> Controller:
        """A controller process on ``port`` (default: a free one), on ``machines``' ``machine`` (default: here)."""
        port = port or free_port()
        defaults = {
            "MLXCLUSTER_CONTROLLER_PORT": str(port),
            "MLXCLUSTER_CONTROLLER_FIRST_TOKEN_TIMEOUT_S": "3",
            "MLXCLUSTER_CONTROLLER_DRAIN_TIMEOUT_S": "10",
            "MLXCLUSTER_CONTROLLER_PROCESSES": "1",  # one process, the pid these tests kill (not a tier's supervisor)
            "MLXCLUSTER_CONTROLLER_SHARED_STATE": "false",  # the nodes run no JetStream (config_text)
        }
        env = self.node_env(nats_urls, defaults, extra)
        prefix = machines.prefix(machine) if machines else []
        argv = [*prefix, sys.executable, "-m", "mlxcluster", "run", "--mode", "controller"]
        proc = self.spawn("controller", argv, env)
        return Controller(proc, port, prefix, machines.runner(machine) if machines else None)

    def close(self) -> None:
        """SIGKILL every process still running (each one's whole group), newest first."""
        for proc in reversed(self.procs):
            proc.kill()

    def logs(self) -> str:
        """The tail of every process's log, for a failure message."""
        return "\n".join(f"--- {p.name} (pid {p.popen.pid if p.popen else '-'}):\n{p.output(2000)}" for p in self.procs)


# --- machines: loopback ports, or network namespaces -------------------------------------------------


class Machines:
    """Where a multi-node test's nodes run: here, every "machine" one loopback host told apart by ports."""

    kind = "loopback"

    def host(self, index: int) -> str:
        """The address machine ``index`` listens on."""
        return "127.0.0.1"

    def prefix(self, index: int) -> list[str]:
        """What runs a command on machine ``index``."""
        return []

    def runner(self, index: int) -> Runner | None:
        """What awaits a coroutine on machine ``index`` (``None``: here)."""
        return None

    def close(self) -> None:
        """Undo whatever was set up."""


class NetnsMachines(Machines):
    """``count`` network namespaces, each a machine with its own address on one bridge. The bridge lives in a
    namespace of its own, so the root namespace is never changed; the test reaches machine ``i`` from a thread
    that joined its namespace. Names carry our pid, so namespaces left by a killed run are found and removed.
    """

    kind = "netns"
    SUBNET = "10.213.7"

    def __init__(self, count: int) -> None:
        self.tag = f"mlxc{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self.names = [f"{self.tag}-m{i + 1}" for i in range(count)]
        self._threads: dict[int, NamespaceThread] = {}
        _remove_stale_namespaces()
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for index, name in enumerate(self.names):
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
                peer = f"p{index}"
                _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", peer, "netns", self.hub)
                _ip("-n", name, "addr", "add", f"{self.host(index)}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", self.hub, "link", "set", peer, "master", "br0")
                _ip("-n", self.hub, "link", "set", peer, "up")
        except BaseException:
            self.close()
            raise

    def host(self, index: int) -> str:
        return f"{self.SUBNET}.{index + 1}"

    def prefix(self, index: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[index]]

    def runner(self, index: int) -> Runner:
        if index not in self._threads:
            self._threads[index] = NamespaceThread(self.names[index])
        return self._threads[index].run

    def close(self) -> None:
        for thread in self._threads.values():
            thread.close()
        for name in [*self.names, self.hub]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _remove_stale_namespaces() -> None:
    """Delete ``mlxc<pid>-*`` namespaces whose creating process is gone."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name[4:].split("-")[0] if name.startswith("mlxc") and "-" in name else ""
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


class NamespaceThread:
    """An event loop on a thread that joined a network namespace: its sockets live in that namespace."""

    CLONE_NEWNET = 0x40000000

    def __init__(self, netns: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(netns,), name=f"netns-{netns}", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self, netns: str) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, self.CLONE_NEWNET) != 0:  # this thread only
                    raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
            finally:
                os.close(fd)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        self.loop.run_forever()

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


def make_machines(count: int) -> Machines:
    """Network namespaces when we may make them (root, ``ip``, and not ``MLXCLUSTER_TEST_NETNS=0``), else
    loopback."""
    if os.environ.get("MLXCLUSTER_TEST_NETNS") == "0" or os.geteuid() != 0 or shutil.which("ip") is None:
        return Machines()
    try:
        return NetnsMachines(count)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"network namespaces unavailable ({exc}); using loopback ports")
        return Machines()


def remote_endpoints(pid: int) -> set[tuple[str, int]]:
    """``(ip, port)`` of every established IPv4 TCP connection of process ``pid`` (in its own namespace)."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split()
        if len(fields) > 9 and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            address, port = fields[2].split(":")
            found.add((socket.inet_ntoa(struct.pack("=I", int(address, 16))), int(port, 16)))  # host byte order
    return found


# --- the controller's HTTP API ----------------------------------------------------------------------


Runner = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


@dataclass
class Controller:
    """A controller process and its HTTP API (reached from the machine it runs on: see :class:`Machines`)."""

    proc: Proc
    port: int
    prefix: list[str] = field(default_factory=list)
    runner: Runner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await ``coro`` where it can reach the controller (a thread in its network namespace, or here)."""
        return await (self.runner(coro) if self.runner else coro)

    def client(self, timeout: float = 30.0) -> openai.AsyncOpenAI:
        """The official client, no retries: a failure is a failure."""
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=timeout)

    async def batch(self, count: int, words: int, deadline_s: float) -> list[Outcome]:
        """``count`` concurrent streamed requests of ``words`` words each (from the controller's machine)."""

        async def send() -> list[Outcome]:
            async with self.client() as client:
                return await stream_many(client, count, prompt_words(words), deadline_s)

        return await self.run(send())

    async def get(self, path: str) -> tuple[int, Any]:
        """``(status, json)``; ``(0, None)`` when the controller does not answer within 2 s."""
        return await self.run(self._get(path))

    async def _get(self, path: str) -> tuple[int, Any]:
        try:
            timeout = aiohttp.ClientTimeout(total=2)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url + path) as resp:
                return resp.status, await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, None

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Known workers by id (empty when the controller does not answer)."""
        status, body = await self.get("/api/cluster/workers")
        return {w["id"]: w for w in body["workers"]} if status == 200 else {}

    async def worker(self, worker_id: str) -> dict[str, Any] | None:
        status, body = await self.get(f"/api/cluster/workers/{worker_id}")
        return body if status == 200 else None

    async def wait_status(
        self, worker_ids: Iterable[str], status: str, timeout: float = START_TIMEOUT_S, watch: Iterable[Proc] = ()
    ) -> float:
        """Wait until every named worker has ``status``; return the seconds it took. A process of ``watch``
        (the workers being waited for) that exits fails the wait at once, with its log, not at the timeout."""
        wanted, started, watched = set(worker_ids), time.monotonic(), list(watch)

        async def reached() -> bool:
            if not self.proc.alive:
                raise AssertionError(f"controller exited ({self.proc.returncode}):\n{self.proc.output()}")
            for proc in watched:
                if not proc.alive:
                    raise AssertionError(f"{proc.name} exited ({proc.returncode}):\n{proc.output()}")
            workers = await self.workers()
            return all(workers.get(w, {}).get("status") == status for w in wanted)

        await wait_until(reached, timeout, f"workers {sorted(wanted)} {status}", interval=0.05)
        return time.monotonic() - started


# --- load -----------------------------------------------------------------------------------------


def prompt_words(count: int, stem: str = "w") -> str:
    """An echo prompt of ``count`` words (the echo engine streams one word per token)."""
    return " ".join(f"{stem}{i}" for i in range(count))


@dataclass
class Outcome:
    """How one streamed request ended.

    ``kind``: ``ok`` (finish_reason and the echoed text intact), ``sse_error`` (an ``error`` event in the
    stream), ``http_error`` (an error status before the stream), ``connection`` (the connection dropped),
    ``truncated`` (the stream ended without a finish reason or an error: a silent loss), ``hang`` (no end
    within the deadline), ``corrupt`` (finished, but the text is not the echo of the prompt).
    """

    kind: str
    tokens: int = 0
    detail: str = ""
    started: float = 0.0
    ended: float = 0.0


async def stream_once(client: openai.AsyncOpenAI, prompt: str, deadline_s: float) -> Outcome:
    """One streamed chat completion, classified; never takes longer than ``deadline_s``."""
    started = time.monotonic()
    text, tokens, finish = [], 0, None
    try:
        async with asyncio.timeout(deadline_s):
            stream = await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": prompt}], stream=True
            )
            async with stream:
                async for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            text.append(choice.delta.content)
                            tokens += 1
                        finish = choice.finish_reason or finish
    except TimeoutError:
        return Outcome("hang", tokens, f"no end within {deadline_s}s", started, time.monotonic())
    except openai.APIConnectionError as exc:
        return Outcome("connection", tokens, repr(exc), started, time.monotonic())
    except openai.APIStatusError as exc:
        return Outcome("http_error", tokens, f"{exc.status_code} {exc.message}", started, time.monotonic())
    except openai.APIError as exc:
        return Outcome("sse_error", tokens, f"{exc.body!r}", started, time.monotonic())
    ended = time.monotonic()
    if finish is None:
        return Outcome("truncated", tokens, "no finish_reason and no error", started, ended)
    if "".join(text) != prompt:
        return Outcome("corrupt", tokens, f"got {''.join(text)!r}", started, ended)
    return Outcome("ok", tokens, finish, started, ended)


async def stream_many(client: openai.AsyncOpenAI, count: int, prompt: str, deadline_s: float) -> list[Outcome]:
    """``count`` concurrent streams, each bounded by ``deadline_s``."""
    return list(await asyncio.gather(*(stream_once(client, prompt, deadline_s) for _ in range(count))))


async def run_clients(
    client: openai.AsyncOpenAI,
    clients: int,
    per_client: int,
    prompt: str,
    deadline_s: float,
    *,
    duration_s: float | None = None,
) -> list[Outcome]:
    """``clients`` concurrent clients, each sending up to ``per_client`` streamed requests one after another
    (none after ``duration_s``, when given, nor after its connection to the controller failed)."""
    stop_at = None if duration_s is None else time.monotonic() + duration_s

    async def one_client() -> list[Outcome]:
        outcomes = []
        for _ in range(per_client):
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            outcomes.append(await stream_once(client, prompt, deadline_s))
            if outcomes[-1].kind == "connection":
                break  # the controller is gone: one refused connection per client is enough
        return outcomes

    results = await asyncio.gather(*(one_client() for _ in range(clients)))
    return [outcome for outcomes in results for outcome in outcomes]


class LoadRun:
    """A load generator in its own process (so the test's own event loop stays responsive for timing)."""

    def __init__(self, proc: Proc, out: Path, bound_s: float) -> None:
        self.proc = proc
        self.out = out
        self.bound_s = bound_s

    @property
    def done(self) -> bool:
        return not self.proc.alive

    async def outcomes(self) -> list[Outcome]:
        """Wait for the load to end (bounded by its requests' deadlines) and return every outcome."""
        code = await self.proc.wait_exit(self.bound_s)
        if code != 0:
            raise AssertionError(f"load generator ended with {code}:\n{self.proc.output()}")
        return [Outcome(**item) for item in json.loads(self.out.read_text())]


def start_load(
    procs: Processes,
    controller: Controller,
    *,
    clients: int,
    per_client: int,
    words: int,
    deadline_s: float,
    duration_s: float | None = None,
) -> LoadRun:
    """Start ``clients`` concurrent streaming clients against ``controller`` in a separate process."""
    out = procs.tmp_path / f"load-{len(procs.procs)}.json"
    argv = [*controller.prefix, sys.executable, __file__, controller.url, str(clients), str(per_client), str(words)]
    argv += [str(deadline_s), str(out), str(duration_s or 0)]
    proc = procs.spawn("load", argv, base_env())
    busy_s = per_client * deadline_s if duration_s is None else min(per_client * deadline_s, duration_s + deadline_s)
    return LoadRun(proc, out, bound_s=START_TIMEOUT_S + busy_s)


async def _load_main(argv: list[str]) -> None:
    url, clients, per_client, words, deadline_s, out, duration_s = argv
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=float(deadline_s))
    async with client:
        outcomes = await run_clients(
            client,
            int(clients),
            int(per_client),
            prompt_words(int(words)),
            float(deadline_s),
            duration_s=float(duration_s) or None,
        )
    Path(out).write_text(json.dumps([dataclasses.asdict(o) for o in outcomes]))


def tally(outcomes: Iterable[Outcome]) -> Counter[str]:
    return Counter(o.kind for o in outcomes)


def failure_kinds(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """How the failed requests failed: ``kind: detail`` (the first 90 characters) → count."""
    return dict(Counter(f"{o.kind}: {o.detail[:90]}" for o in outcomes if o.kind != "ok"))


async def first_success(client: openai.AsyncOpenAI, prompt: str, timeout: float, *, attempt_s: float = 5.0) -> float:
    """Send requests one after another until one succeeds; return the seconds it took (fail after ``timeout``)."""
    started = time.monotonic()
    last: Outcome | None = None
    while time.monotonic() - started < timeout:
        last = await stream_once(client, prompt, min(attempt_s, max(0.5, timeout - (time.monotonic() - started))))
        if last.kind == "ok":
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"no request succeeded within {timeout}s; last: {last}")


def log_times(proc: Proc, text: str, near: float) -> list[float]:
    """Wall-clock times (epoch seconds) of ``proc``'s log lines containing ``text``.

    Lines start with a local ``HH:MM:SS.mmm`` stamp; the date is taken as the one that puts the stamp
    nearest to ``near`` (an epoch time), so a run across midnight reads right.
    """
    times = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if text not in line:
            continue
        try:
            stamp = time.strptime(line[:8], "%H:%M:%S")
            millis = int(line[9:12])
        except ValueError:
            continue
        candidates = []
        for day_offset in (-1, 0, 1):
            day = time.localtime(near + day_offset * 86400)
            moment = time.mktime(
                (day.tm_year, day.tm_mon, day.tm_mday, stamp.tm_hour, stamp.tm_min, stamp.tm_sec, 0, 0, -1)
            )
            candidates.append(moment + millis / 1000)
        times.append(min(candidates, key=lambda t: abs(t - near)))
    return times


if __name__ == "__main__":  # the load generator process: see start_load
    asyncio.run(_load_main(sys.argv[1:]))
