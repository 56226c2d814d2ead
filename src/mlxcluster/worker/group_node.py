"""A worker-group member's lifetime: placement checks, rendezvous, shard, serve (rank 0) or follow, re-form.

Rank 0 serves the group as one worker named after the group; the other ranks replay its batch
(:mod:`~mlxcluster.worker.group_engine`). When the group breaks (a collective failed or stalled, or a
member's hellos stopped or came from a new instance) rank 0 ends its in-flight requests with
``group_member_lost`` errors, deregisters with a reason naming the member, and every survivor
re-executes itself: the same process (same pid and member id) starts over at the rendezvous and waits,
without a time limit, until the group is whole again. Re-executing is the one sure way out of a
collective that never returns and of a distributed backend that cannot be initialised twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time

import msgspec

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.errors import NodeError
from mlxcluster.startup import until_stop
from mlxcluster.tracing import stop_tracer
from mlxcluster.worker.group_channel import GroupBroken
from mlxcluster.worker.group_engine import GroupEngine, GroupFollower
from mlxcluster.worker.group_ops import Formation
from mlxcluster.worker.group_wake import WakeSender, WakeSignal
from mlxcluster.worker.models import ResolvedModel, resolve_model
from mlxcluster.worker.placement import (
    PlacementError,
    available_memory_bytes,
    check_group_fits,
    check_memory_fits,
    check_sharding_supported,
    model_shape,
)
from mlxcluster.worker.rendezvous import HELLO_INTERVAL_S, Rendezvous, RendezvousError
from mlxcluster.worker.serve_trace import worker_tracer

log = logging.getLogger(__name__)

REFORM_ENV = "MLXCLUSTER_GROUP_REFORM"
"""Set in a member that re-executed itself to re-form its group: its rendezvous then waits without a limit."""
SILENT_MEMBER_S = 4 * HELLO_INTERVAL_S
"""How long a member's hellos may pause before a broken group blames that member."""


DEFAULT_STALL_TIMEOUT_S = 30.0


def stall_timeout(config: Config) -> float:
    """``worker.group.stall_timeout_s``, else the larger of 30 s and the offline timeout.

    It bounds one collective or model step while every member still says hello (a member that dies or
    freezes is caught sooner, by its silence: :func:`member_silence`), so it must exceed the longest
    prefill step of a large model."""
    configured = config.worker.group.stall_timeout_s
    if configured is not None:
        return configured
    return max(DEFAULT_STALL_TIMEOUT_S, config.discovery.offline_timeout_ms / 1000)


def member_silence(config: Config) -> float:
    """How long a member's hellos may stop before the others call it gone: half the offline timeout (so the
    group is out of service within it), at most the stall timeout, at least a second."""
    return max(1.0, min(stall_timeout(config), config.discovery.offline_timeout_ms / 2000))


def check_placement(config: Config, model_path: str) -> None:
    """Refuse, before loading, a group that cannot split the model or a shard that does not fit memory."""
    group = config.worker.group
    shape = model_shape(model_path)
    if shape is None:
        return
    size = group.size if group.name else 1
    try:
        check_group_fits(shape, size, group.parallel)
        if size > 1:
            check_sharding_supported(model_path, group.parallel)
        check_memory_fits(
            shape,
            available_memory_bytes(config.worker.memory_budget_gb, config.worker.memory_budget_bytes),
            size=size,
        )
    except PlacementError as exc:
        raise NodeError(str(exc)) from None


async def serve_group_member(
    config: Config, bus: Bus, stop: asyncio.Event, *, member_id: str, model: ResolvedModel | None = None
) -> None:
    """Run this process as one member of ``worker.group`` until ``stop``; re-execute when the group breaks.

    :param model: ``worker.model`` already resolved and placed (default: resolve and place it here).
    """
    settings = config.worker.group
    if model is None:
        model = resolve_model(config.worker.model, config.models_dir)
        check_placement(config, model.path)
    path, served_name = model.path, model.served_name
    rendezvous = Rendezvous(bus, settings, member_id, served_name)
    await rendezvous.start()
    formed = False
    try:
        reforming = os.environ.get(REFORM_ENV) == "1"
        members = await _until_stop(rendezvous.form(None if reforming else settings.rendezvous_timeout_s), stop)
        if members is None:
            return
        formed = True
        rank = next(i for i, m in enumerate(members) if m.member_id == member_id)
        formation = Formation(
            rank=rank,
            size=settings.size,
            parallel=settings.parallel,
            backend=settings.backend,
            hostfile=rendezvous.write_hostfile(),
            info=rendezvous.group_info(settings.backend),
            stall_timeout_s=stall_timeout(config),
        )
        log.info(
            "group %s formed: rank %d of %d (%s)",
            settings.name,
            rank,
            settings.size,
            ", ".join(f"{m.member_id}@{m.address}" for m in members),
        )
        member = _Member(config, bus, rendezvous, formation, path, served_name, member_silence(config))
        reason = await (member.serve_face(stop) if rank == 0 else member.follow(stop))
    except RendezvousError as exc:
        raise NodeError(str(exc)) from None
    finally:
        await rendezvous.close()
    if reason is not None and not stop.is_set():  # asked to stop meanwhile: stop, do not start over
        reexec(reason)
    if formed:  # the distributed backend's threads abort a normal interpreter exit: leave at once
        with contextlib.suppress(Exception):
            await bus.close()
        _flush_logs()
        os._exit(0)


class _Member:
    """One formed member: waits for ``stop`` or for the group to break."""

    def __init__(
        self,
        config: Config,
        bus: Bus,
        rendezvous: Rendezvous,
        formation: Formation,
        path: str,
        served: str,
        silence_s: float,
    ) -> None:
        self.config = config
        self.bus = bus
        self.rendezvous = rendezvous
        self.formation = formation
        self.path = path
        self.served = served
        self.silence_s = silence_s
        self.broken = asyncio.Event()
        self.reason = ""
        self._loop = asyncio.get_running_loop()

    def on_broken(self, reason: str) -> None:
        """Thread-safe: the group is broken."""
        self._loop.call_soon_threadsafe(self._set_broken, reason)

    def _set_broken(self, reason: str) -> None:
        if not self.broken.is_set():
            self.reason = reason
            self.broken.set()

    async def serve_face(self, stop: asyncio.Event) -> str | None:
        """Rank 0: serve the group as one worker; on a break, fail in-flight work and deregister."""
        from mlxcluster.worker.service import WorkerService
        from mlxcluster.worker.system import detect_hardware

        info = self.formation.info
        worker = self.config.worker
        engine = GroupEngine(
            self.path,
            waker=WakeSender(self.bus, info.name, asyncio.get_running_loop()),
            served_name=self.served,
            max_concurrent=worker.max_concurrent,
            prefill_step_size=worker.prefill_step_size,
            step_budget_ms=worker.step_budget_ms,
            thinking_budgets=msgspec.structs.asdict(worker.thinking_budgets),
            formation=self.formation,
            on_broken=self.on_broken,
        )
        try:
            await until_stop(engine.start(), stop, "loading the model")  # a signal does not wait for the load
        except PlacementError as exc:
            raise NodeError(str(exc)) from None
        except GroupBroken as exc:
            return f"while loading: {exc}"
        tracer = worker_tracer(self.config, info.name)
        service = WorkerService(
            config=self.config,
            bus=self.bus,
            engine=engine,
            worker_id=info.name,
            hardware=detect_hardware(probe_accelerator=True),
            group=info,
            tracer=tracer,
        )
        watch = asyncio.create_task(self.rendezvous.watch(self.silence_s, self.on_broken))
        try:
            await service.start()
            if await self._stop_or_break(stop) is None:
                await service.drain(worker.drain_timeout_s)
                return None
            service.status = "draining"  # from now on new requests are refused (retryable), not queued
            failed = engine.fail_in_flight(f"worker group {info.name} lost a member: {self.reason}")
            reason = await self._blame()
            log.error("group %s broken: %s; %d request(s) ended with an error", info.name, reason, failed)
            await service.drain(1.0, reason=f"worker group {info.name} broken: {reason}")
            return reason
        finally:
            watch.cancel()
            await stop_tracer(tracer)
            if not self.broken.is_set():
                await engine.stop()

    async def follow(self, stop: asyncio.Event) -> str | None:
        """A non-zero rank: replay rank 0's batch until ``stop`` or a break."""
        wake = WakeSignal()
        hearing = asyncio.create_task(wake.listen(self.bus, self.formation.info.name))  # before any doze
        try:
            follower = GroupFollower(self.path, formation=self.formation, on_broken=self.on_broken, wake=wake)
            follower.start()
            while not follower.loaded.is_set():
                if stop.is_set():
                    return None
                await asyncio.sleep(0.1)
            error = follower.load_error
            if isinstance(error, PlacementError):
                raise NodeError(str(error))
            if error is not None:
                return f"while loading: {error}"
            log.info("following rank 0 of group %s as rank %d", self.formation.info.name, self.formation.rank)
            watch = asyncio.create_task(self.rendezvous.watch(self.silence_s, self.on_broken))
            try:
                if await self._stop_or_break(stop) is None:
                    return None
                return await self._blame()
            finally:
                watch.cancel()
        finally:
            hearing.cancel()

    async def _stop_or_break(self, stop: asyncio.Event) -> str | None:
        """``None`` when asked to stop, else the reason the group broke."""
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self.broken.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return self.reason if self.broken.is_set() else None

    async def _blame(self) -> str:
        """The break's reason, naming the member that left when the hellos tell (waits briefly for them)."""
        deadline = time.monotonic() + SILENT_MEMBER_S + HELLO_INTERVAL_S
        while True:
            member = self.rendezvous.lost_member(SILENT_MEMBER_S)
            if member is not None:
                return member if member in self.reason else f"{member} ({self.reason})"
            if time.monotonic() > deadline:
                return self.reason
            await asyncio.sleep(HELLO_INTERVAL_S / 2)


async def _until_stop(work, stop: asyncio.Event):  # type: ignore[no-untyped-def]
    """The result of ``work``, or ``None`` if ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def reexec(reason: str) -> None:
    """Start this process over (same pid, same arguments) to re-form the group; never returns."""
    log.warning("re-forming the worker group: %s", reason)
    _flush_logs()
    os.environ[REFORM_ENV] = "1"
    # Every descriptor (the ring's sockets too, so peers see them close) is closed by exec itself, once the
    # other threads are gone. Closing them here instead races the ring's receive thread, which fails on
    # the closed sockets and aborts the process before exec replaces it (seen with a SIGSTOPped peer).
    for fd in range(3, 4096):
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
