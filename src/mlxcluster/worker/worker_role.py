"""The worker role's lifetime: model resolved and placed (before the bus), engine up, service on the bus,
drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.durations import parse_duration
from mlxcluster.errors import NodeError, NodeFailed
from mlxcluster.heap import freeze_startup_heap
from mlxcluster.protocol import CatalogueModel
from mlxcluster.startup import StartInterrupted, until_stop
from mlxcluster.tracing import Tracer, stop_tracer
from mlxcluster.worker.catalogue import Catalogue, CatalogueEntry, build_catalogue
from mlxcluster.worker.echo import ECHO_MODEL
from mlxcluster.worker.engine_base import Engine
from mlxcluster.worker.memory_budget import MemoryBudget
from mlxcluster.worker.model_host import EngineFactory, LoadError, ModelHost
from mlxcluster.worker.models import ResolvedModel, resolve_model
from mlxcluster.worker.placement import memory_budget_bytes
from mlxcluster.worker.serve_trace import worker_tracer
from mlxcluster.worker.service import WorkerService
from mlxcluster.worker.system import detect_hardware, hostname

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    """``<short hostname>-<pid>``: unique per process, readable in tables."""
    return f"{hostname().split('.')[0]}-{os.getpid()}"


def prepare_model(config: Config) -> ResolvedModel | None:
    """Resolve ``worker.model`` (the model loaded at start) to a local dir, downloading a repo id missing from the
    Hugging Face cache, and check that it fits this worker or group; ``None`` for the echo engine (it loads
    nothing) and for a worker that loads nothing at start (no ``model``, a catalogue in ``models``).

    Blocking (a download can take minutes): the role runs it on a thread, before it connects to NATS.
    """
    worker = config.worker
    if worker.engine == "echo":
        return None
    if worker.model is None and (worker.models or worker.scan_models_dir):
        return None
    from mlxcluster.worker.group_node import check_placement

    model = resolve_model(worker.model, config.models_dir)
    check_placement(config, model.path)  # a model too big for this worker is refused before loading
    if worker.draft_model and not (worker.group.name and worker.group.size > 1):
        draft_model_path(config, download=True)  # fetched now: the engine finds it in the cache at load
    return model


def draft_model_path(config: Config, *, download: bool = False) -> str:
    """``worker.draft_model``'s local dir; :class:`NodeError` naming the key when it cannot be had."""
    try:
        return resolve_model(config.worker.draft_model, config.models_dir, download=download).path
    except NodeError as exc:
        raise NodeError(f"worker.draft_model: {exc}") from None


def engine_factory(config: Config, budget: MemoryBudget) -> EngineFactory:
    """How this worker builds the engine of a catalogue entry (``worker.engine``; mlx-lm imported only for mlx;
    an embedding model gets an :class:`~mlxcluster.worker.embedding_engine.EmbeddingEngine`, a vision model the
    mlx-vlm engine)."""
    worker = config.worker
    if worker.engine == "echo":
        from mlxcluster.worker.echo import EchoEngine

        def echo(entry: CatalogueEntry) -> Engine:
            return EchoEngine(
                models=[entry.name],
                token_delay_ms=worker.echo_token_delay_ms,
                prompt_cache_entries=worker.echo_prompt_cache_entries,
            )

        return echo
    from mlxcluster.worker.engine import MlxEngine

    def mlx(entry: CatalogueEntry) -> Engine:
        assert entry.path is not None, "a model is resolved before its engine is built"
        if entry.facts.kind == "embedding":
            from mlxcluster.worker.embedding_engine import EmbeddingEngine

            return EmbeddingEngine(
                entry.path,
                served_name=entry.name,
                batch_tokens=worker.embedding_batch_tokens,
                batch_wait_ms=worker.embedding_batch_wait_ms,
            )
        if entry.facts.vision:
            from mlxcluster.worker.vision_engine import VisionEngine

            return VisionEngine(
                entry.path,
                served_name=entry.name,
                prompt_cache=worker.prompt_cache_bytes != 0,
                image_max_pixels=worker.image_max_pixels,
            )
        drafts = bool(worker.draft_model) and worker.speculative_tokens > 0 and entry.spec == worker.model
        return MlxEngine(
            entry.path,
            served_name=entry.name,
            max_concurrent=worker.max_concurrent,
            prefill_step_size=worker.prefill_step_size,
            step_budget_ms=worker.step_budget_ms,
            speculative_tokens=worker.speculative_tokens,
            draft_model=draft_model_path(config) if drafts else None,  # the model loaded at start only
            prompt_cache_bytes=worker.prompt_cache_bytes,
            thinking_budgets=msgspec.structs.asdict(worker.thinking_budgets),
            memory_budget=budget,
        )

    return mlx


def build_host(config: Config, model: ResolvedModel | None = None) -> ModelHost:
    """The worker's model host: its catalogue (``model`` first: loaded at start), budget and engine factory."""
    worker = config.worker
    catalogue = build_catalogue(config, model)
    if worker.engine == "echo" and not len(catalogue):
        catalogue.add(CatalogueEntry(ECHO_MODEL, ECHO_MODEL, None, CatalogueModel(name=ECHO_MODEL, source="echo")))
    budget = MemoryBudget(memory_budget_bytes(worker.memory_budget_bytes, worker.memory_budget_gb))
    pinned = set(worker.pinned)
    start = start_model_name(config, model, catalogue)
    if start is not None and worker.pin_start_model:
        pinned.add(start)
    return ModelHost(
        catalogue,
        engine_factory(config, budget),
        budget,
        models_dir=config.models_dir,
        default_keep_alive_s=worker.keep_alive_s,
        model_keep_alive_s={name: parse_duration(value) for name, value in worker.model_keep_alive.items()},
        pinned=pinned,
    )


def start_model_name(config: Config, model: ResolvedModel | None, catalogue: Catalogue) -> str | None:
    """The served name of the model loaded at start (None: none is)."""
    if model is not None:
        return model.served_name
    if config.worker.engine == "echo":
        names = catalogue.names()
        if config.worker.model is not None or not config.worker.models:
            return names[0] if names else None
    return None


def fixed_host(config: Config, engine: Engine) -> ModelHost:
    """A model host serving one engine started elsewhere (a worker group's face, a test's engine), pinned."""
    budget = MemoryBudget(memory_budget_bytes(config.worker.memory_budget_bytes, config.worker.memory_budget_gb))
    return ModelHost.fixed(engine, budget, config.models_dir)


async def serve_worker(
    config: Config,
    bus: Bus,
    stop: asyncio.Event,
    *,
    engine: Engine | None = None,
    model: ResolvedModel | None = None,
    on_host: Callable[[ModelHost], None] | None = None,
    tracer: Tracer | None = None,
) -> None:
    """Start the engine and the service, serve until ``stop``, then drain.

    :param model: the model :func:`prepare_model` resolved (default: resolve it here).
    :param on_host: called with the worker's model host once it is built (a benchmark reads its counters and
        budget in-process).
    :param tracer: the worker's tracer (default: built from ``[tracing]``).
    :raises StartInterrupted: ``stop`` was set while the engine loaded its model (the load is not waited for).
    """
    if config.worker.group.name and config.worker.group.size == 1:
        log.warning("worker.group.name is set but the group size is 1: serving as a stand-alone worker")
    if config.worker.group.name and config.worker.group.size > 1 and engine is None:
        from mlxcluster.worker.group_node import serve_group_member

        await serve_group_member(config, bus, stop, member_id=config.worker.id or default_worker_id(), model=model)
        return
    worker_id = config.worker.id or default_worker_id()
    tracer = tracer or worker_tracer(config, worker_id)  # before the model loads: a missing extra fails at once
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[str] = loop.create_future()

    def settle(reason: str) -> None:
        if not failed.done():
            failed.set_result(reason)

    def engine_failed(reason: str) -> None:  # called from an engine's thread
        loop.call_soon_threadsafe(settle, reason)

    if engine is not None:
        engine.set_failure_listener(engine_failed)
        try:
            await until_stop(engine.start(), stop, "loading the model")
        except StartInterrupted:
            await engine.stop()
            raise
        host = fixed_host(config, engine)
    else:
        host = build_host(config, model)
    if on_host is not None:
        on_host(host)

    def watch_engine(_name: str, started: Engine | None) -> None:
        if started is not None:
            started.set_failure_listener(engine_failed)

    host.add_engine_listener(watch_engine)
    start = start_model_name(config, model, host.catalogue) if engine is None else None
    if start is not None:
        try:
            await until_stop(host.load(start), stop, "loading the model")
        except StartInterrupted:
            await host.stop()
            raise
        except LoadError as exc:
            await host.stop()
            raise NodeError(str(exc)) from None
    log.info("worker models: loaded %s, catalogue %s", host.loaded(), host.catalogue.names())
    service = WorkerService(
        config=config,
        bus=bus,
        host=host,
        worker_id=worker_id,
        hardware=detect_hardware(probe_accelerator=config.worker.engine != "echo"),
        tracer=tracer,
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
        await host.stop()
        await stop_tracer(tracer)
