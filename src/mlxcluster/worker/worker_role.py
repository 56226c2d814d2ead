"""The worker role's lifetime: model resolved and placed (before the bus), engine up, service on the bus,
drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import msgspec

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.errors import NodeFailed
from mlxcluster.heap import freeze_startup_heap
from mlxcluster.startup import StartInterrupted, until_stop
from mlxcluster.worker.engine_base import Engine
from mlxcluster.worker.models import ResolvedModel, resolve_model
from mlxcluster.worker.service import WorkerService
from mlxcluster.worker.system import detect_hardware, hostname

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    """``<short hostname>-<pid>``: unique per process, readable in tables."""
    return f"{hostname().split('.')[0]}-{os.getpid()}"


def prepare_model(config: Config) -> ResolvedModel | None:
    """Resolve ``worker.model`` to a local dir (downloading a repo id missing from the Hugging Face cache) and
    check that it fits this worker or group; ``None`` for the echo engine, which loads nothing.

    Blocking (a download can take minutes): the role runs it on a thread, before it connects to NATS.
    """
    if config.worker.engine == "echo":
        return None
    from mlxcluster.worker.group_node import check_placement

    model = resolve_model(config.worker.model, config.models_dir)
    check_placement(config, model.path)  # a model too big for this worker is refused before loading
    return model


def build_engine(config: Config, model: ResolvedModel | None = None) -> Engine:
    """The engine named by ``worker.engine`` (mlx-lm is imported only for ``mlx``), serving ``model``
    (default: :func:`prepare_model`'s)."""
    if config.worker.engine == "echo":
        from mlxcluster.worker.echo import EchoEngine

        models = [config.worker.model] if config.worker.model else None
        return EchoEngine(
            models=models,
            token_delay_ms=config.worker.echo_token_delay_ms,
            prompt_cache_entries=config.worker.echo_prompt_cache_entries,
        )
    from mlxcluster.worker.engine import MlxEngine

    model = model or prepare_model(config)
    assert model is not None
    return MlxEngine(
        model.path,
        served_name=model.served_name,
        max_concurrent=config.worker.max_concurrent,
        prefill_step_size=config.worker.prefill_step_size,
        prompt_cache_bytes=config.worker.prompt_cache_bytes,
        thinking_budgets=msgspec.structs.asdict(config.worker.thinking_budgets),
    )


async def serve_worker(
    config: Config,
    bus: Bus,
    stop: asyncio.Event,
    *,
    engine: Engine | None = None,
    model: ResolvedModel | None = None,
) -> None:
    """Start the engine and the service, serve until ``stop``, then drain.

    :param model: the model :func:`prepare_model` resolved (default: resolve it here).
    :raises StartInterrupted: ``stop`` was set while the engine loaded its model (the load is not waited for).
    """
    if config.worker.group.name and config.worker.group.size == 1:
        log.warning("worker.group.name is set but the group size is 1: serving as a stand-alone worker")
    if config.worker.group.name and config.worker.group.size > 1 and engine is None:
        from mlxcluster.worker.group_node import serve_group_member

        await serve_group_member(config, bus, stop, member_id=config.worker.id or default_worker_id(), model=model)
        return
    engine = engine or build_engine(config, model)
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[str] = loop.create_future()

    def settle(reason: str) -> None:
        if not failed.done():
            failed.set_result(reason)

    def engine_failed(reason: str) -> None:  # called from the engine's thread
        loop.call_soon_threadsafe(settle, reason)

    engine.set_failure_listener(engine_failed)
    try:
        await until_stop(engine.start(), stop, "loading the model")
    except StartInterrupted:
        await engine.stop()
        raise
    info = engine.info()
    log.info("engine %s ready: models %s %s", info.name, info.models, info.details)
    service = WorkerService(
        config=config,
        bus=bus,
        engine=engine,
        worker_id=config.worker.id or default_worker_id(),
        hardware=detect_hardware(probe_accelerator=info.name != "echo"),
    )
    try:
        await service.start()
        freeze_startup_heap()
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopping, failed], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if failed.done():
            reason = f"engine failed: {failed.result()}"
            log.error("worker %s: %s; deregistering", service.worker_id, reason)
            await service.drain(0.0, reason=reason)
            raise NodeFailed(reason)
        await service.drain(config.worker.drain_timeout_s)
    finally:
        await engine.stop()
