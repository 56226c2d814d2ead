"""Run one node role until SIGINT/SIGTERM: ``controller`` (one process, or the supervisor of a controller
tier), ``worker`` or ``dual`` (the supervisor).

Shutdown always goes signal → :class:`asyncio.Event` → the role's own drain → ``Bus.close()``. The same
event cuts every start-up stage short (:mod:`mlxcluster.startup`): a worker resolves its model (downloading
it if need be) and checks that it fits *before* it waits for NATS, so a model it cannot have fails at once
even when NATS is down; connecting to NATS and loading the model give way to the signal too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable

import msgspec

from mlxcluster.bus import Bus, BusError
from mlxcluster.config import Config, ConfigError
from mlxcluster.embedded import EmbeddedNatsServer, EmbeddedServerError, keep_server_running
from mlxcluster.errors import NODE_FAILED, NodeError, NodeFailed
from mlxcluster.secure import check_exposure
from mlxcluster.startup import StartInterrupted, leave_now, on_daemon_thread, until_stop
from mlxcluster.tracing import TracingUnavailable, check_tracing

log = logging.getLogger(__name__)


def run_node(config: Config, role: str, *, workers: int = 1) -> int:
    """Run ``role`` in a fresh event loop; return the process exit code.

    Controllers and workers run on uvloop where it is installed (a cheaper loop on the request path);
    the dual-mode supervisor, which only waits on its children, keeps asyncio's own loop.

    :param workers: worker processes that dual mode starts.
    """
    with asyncio.Runner(loop_factory=None if role == "dual" else fast_loop_factory()) as runner:
        try:
            return runner.run(_main(config, role, workers))
        except StartInterrupted as exc:
            log.info("stopped while %s", exc)
            code = exc.code
    leave_now(code)  # a download or a load left on its thread is not waited for


def fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or ``None`` (asyncio's default loop) where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _main(config: Config, role: str, workers: int) -> int:
    try:
        check_exposure(config, role)  # refuse an open API or NATS beyond loopback unless insecure is set
        check_tracing(config.tracing)  # [tracing] without the otel extra fails before anything starts
    except (ConfigError, TracingUnavailable) as exc:
        raise NodeError(str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if role in ("dual", "controller"):
            from mlxcluster.supervisor import Supervisor, controller_processes

            controllers = controller_processes(config, role)
            if role == "dual":
                return await Supervisor(config, workers=workers, controllers=controllers).run(stop)
            if controllers > 1:  # a controller tier: N processes on one port, nats-server here when embedded
                embedded = config.nats.mode == "embedded"
                tier = Supervisor(config, workers=0, controllers=controllers, embedded_nats=embedded)
                return await tier.run(stop)
        model = None
        if role == "worker":  # before NATS: a model that cannot be had or does not fit fails at once
            from mlxcluster.worker.worker_role import prepare_model

            model = await until_stop(on_daemon_thread(prepare_model, config), stop, "resolving the model")
        async with embedded_server_for(config, role) as nats_url:
            bus = await until_stop(
                connect_bus(config, name=f"mlxcluster-{role}", url=nats_url), stop, "connecting to NATS"
            )
            try:
                if role == "controller":
                    from mlxcluster.controller.controller_role import serve_controller

                    await serve_controller(config, bus, stop)
                else:
                    from mlxcluster.worker.worker_role import serve_worker

                    await serve_worker(config, bus, stop, model=model)
            finally:
                await bus.close()
        return 0
    except NodeFailed as exc:
        log.error("%s; exiting with code %d so that the node is restarted", exc, NODE_FAILED)
        return NODE_FAILED
    except (EmbeddedServerError, BusError, ConfigError) as exc:  # ConfigError: e.g. an unreadable users_file
        raise NodeError(str(exc)) from None


@contextlib.asynccontextmanager
async def embedded_server_for(config: Config, role: str) -> AsyncIterator[str | None]:
    """Start the embedded nats-server when a controller runs with ``nats.mode = "embedded"``.

    Yields the URL to connect to (``None``: use ``nats.url``). Workers never start a server.
    """
    if role != "controller" or config.nats.mode != "embedded":
        yield None
        return
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    stopping = False
    supervise = asyncio.create_task(keep_server_running(server, lambda: stopping))  # restarted if it dies
    try:
        yield server.url
    finally:
        stopping = True
        supervise.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervise
        await server.stop()


async def connect_bus(config: Config, *, name: str, url: str | None = None) -> Bus:
    """Connect to ``url`` (or ``nats.url``) with the ``[nats]`` settings."""
    nats = config.nats if url is None else msgspec.structs.replace(config.nats, url=url)
    return await Bus.connect(nats, name=name)
