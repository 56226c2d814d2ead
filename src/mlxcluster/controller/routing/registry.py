"""The controller's view of its workers: fed by registration, heartbeat and deregister messages.

Status comes from the worker's heartbeats (online / degraded / draining) and from silence: a worker not
heard from for ``discovery.offline_timeout_ms`` is marked offline by :meth:`WorkerRegistry.sweep`, which the
controller calls at least every second (:meth:`WorkerRegistry.run_sweeper`). Non-static workers that
stay offline for ``forget_after_s`` (default ten timeouts) are forgotten, so memory stays bounded.
``[[workers.static]]`` entries are known from the start (offline until they register), keep their
configured priority and tags when a worker registers under that name, and are never forgotten.

The registry is used from one event loop and is not thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import msgspec
from msgspec import Struct

from mlxcluster.api import ELIGIBLE_STATES, EligibleWorkers, LoadBuckets, WorkerState, WorkerView
from mlxcluster.config import Config
from mlxcluster.controller.routing.worker_admin import WorkerSettings
from mlxcluster.protocol import (
    AcceleratorStats,
    CatalogueModel,
    Deregister,
    MemoryParts,
    ModelState,
    SpeculationCounts,
    WorkerHeartbeat,
    WorkerRegistration,
)

log = logging.getLogger(__name__)

FORGET_AFTER_TIMEOUTS = 10
MAX_SWEEP_INTERVAL_S = 1.0


class WorkerEvent(Struct, frozen=True, kw_only=True):
    """A worker appeared (``previous is None``), changed status, or was removed (``current is None``)."""

    worker_id: str
    previous: WorkerState | None
    current: WorkerState | None


class FleetWorker(Struct, frozen=True, kw_only=True):
    """One worker's models as the registry knows them: loaded, loadable (its catalogue), their states, its memory."""

    id: str
    status: WorkerState
    models: tuple[str, ...]
    catalogue: dict[str, CatalogueModel]
    states: dict[str, ModelState]
    memory: MemoryParts | None
    load: int
    max_concurrent: int
    hostname: str = ""


class RegistryStats(Struct, frozen=True, kw_only=True):
    """Counts over all known workers; capacity and load only over online and degraded ones."""

    total: int = 0
    online: int = 0
    degraded: int = 0
    draining: int = 0
    offline: int = 0
    capacity: int = 0
    active: int = 0
    queued: int = 0
    inflight: int = 0


Listener = Callable[[WorkerEvent], None]


@dataclass(slots=True)
class _Worker:
    """Mutable record behind a :class:`WorkerView`."""

    id: str
    status: WorkerState = "offline"
    priority: int = 0
    tags: tuple[str, ...] = ()
    static: bool = False
    registered: bool = False
    registration: WorkerRegistration | None = None
    models: tuple[str, ...] = ()
    max_concurrent: int = 1
    max_queue: int = 0
    last_seen: float | None = None
    offline_since: float | None = None
    asked_to_register_at: float | None = None
    heartbeat: WorkerHeartbeat | None = None
    inflight: int = 0
    since_heartbeat: int = 0
    static_address: str = ""
    registered_at: float | None = None
    """Wall-clock time of the latest registration."""
    view: WorkerView | None = None
    """Cached snapshot for picks; reset whenever anything above changes."""
    catalogue: dict[str, CatalogueModel] | None = None
    """Every model it may load, by name (None: a worker that predates the model fleet: ``models`` only)."""
    model_states: tuple[ModelState, ...] = ()
    memory: MemoryParts | None = None

    def load(self) -> int:
        """Best estimate of requests on the worker now (see :meth:`WorkerRegistry.begin`); a worker whose
        memory budget is full (weights and running requests' KV) counts as saturated, at least
        ``max_concurrent``: a request sent there would wait for memory."""
        hb = self.heartbeat
        reported = hb.active + hb.queued if hb is not None else 0
        load = max(self.inflight, reported + self.since_heartbeat, 0)
        memory = self.memory
        if memory is not None and memory.budget_bytes and memory.weights_bytes + memory.kv_bytes >= memory.budget_bytes:
            return max(load, self.max_concurrent)
        return load


class WorkerRegistry:
    """Every worker this controller knows, with status, capacity, load and queries.

    :param config: ``discovery.offline_timeout_ms`` and ``workers.static`` are read from it.
    :param clock: monotonic seconds; tests pass a fake one.
    :param forget_after_s: how long a non-static worker stays listed while offline.
    """

    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        forget_after_s: float | None = None,
    ) -> None:
        self.offline_timeout_s = config.discovery.offline_timeout_ms / 1000
        self.forget_after_s = (
            forget_after_s if forget_after_s is not None else FORGET_AFTER_TIMEOUTS * self.offline_timeout_s
        )
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._departed: dict[str, float] = {}
        self._listeners: list[Listener] = []
        self._candidates: dict[str, EligibleWorkers] = {}  # model → eligible workers' views, in priority order
        self._settings: dict[str, WorkerSettings] = {}  # run-time settings by worker id (worker_admin)
        for entry in config.workers.static:
            self._workers[entry.name] = _Worker(
                id=entry.name,
                priority=entry.priority,
                tags=tuple(entry.tags),
                static=True,
                static_address=f"{entry.host}:{entry.port}" if entry.port else entry.host,
            )

    # --- listeners ------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` on every add, status change and removal (exceptions are logged)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _emit(self, worker_id: str, previous: WorkerState | None, current: WorkerState | None) -> None:
        if previous == current:
            return
        event = WorkerEvent(worker_id=worker_id, previous=previous, current=current)
        log.info("worker %s: %s → %s", worker_id, previous or "new", current or "removed")
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("registry listener %r failed", listener)

    def _set_status(self, worker: _Worker, status: WorkerState, now: float) -> None:
        previous = worker.status
        worker.status = status
        worker.view = None
        if previous != status:
            worker.offline_since = now if status == "offline" else None
            self._candidates.clear()
        self._emit(worker.id, previous, status)

    # --- messages -------------------------------------------------------------------------------

    def on_registration(self, message: WorkerRegistration) -> WorkerView:
        """A worker (re)registered: it is online with the models and capacity it announced."""
        now = self._clock()
        self._departed.pop(message.worker_id, None)
        worker, created = self._entry(message.worker_id)
        caps = message.capabilities
        worker.registration = message
        worker.registered = True
        worker.models = tuple(caps.models)
        if caps.catalogue is not None:
            worker.catalogue = {entry.name: entry for entry in caps.catalogue}
        worker.max_concurrent = max(1, caps.max_concurrent)
        worker.max_queue = max(0, caps.max_queue)
        worker.last_seen = now
        worker.asked_to_register_at = None
        worker.view = None
        self._candidates.clear()  # models or capacity may have changed
        worker.registered_at = time.time()
        status = self._admin_status(worker, "online")
        if created:
            worker.status = status
            self._emit(worker.id, None, status)
        else:
            self._set_status(worker, status, now)
        return self._view(worker, now)

    def on_heartbeat(self, message: WorkerHeartbeat) -> bool:
        """Record a heartbeat. Return True when the controller should ask the worker to register.

        A heartbeat from an unknown worker (for instance after a controller restart) creates a minimal
        entry that serves the heartbeat's ``models_loaded`` with capacity 1 until the worker registers.
        True is returned at most once per offline timeout per worker, so a lost announce is retried
        without flooding. Heartbeats from a worker that deregistered less than a timeout ago are ignored.
        """
        now = self._clock()
        departed = self._departed.get(message.worker_id)
        if departed is not None and now - departed < self.offline_timeout_s:
            return False
        worker, created = self._entry(message.worker_id)
        worker.heartbeat = message
        worker.since_heartbeat = 0
        worker.last_seen = now
        worker.view = None
        # a worker of the model fleet says what it holds even when that is nothing (all unloaded)
        if (message.models_loaded or message.models is not None) and tuple(message.models_loaded) != worker.models:
            worker.models = tuple(message.models_loaded)
            self._candidates.clear()
        if message.models is not None:
            worker.model_states = tuple(message.models)
        if message.catalogue is not None:
            worker.catalogue = {entry.name: entry for entry in message.catalogue}
        worker.memory = message.memory
        status = self._admin_status(worker, message.status)
        if created:
            worker.status = status
            self._emit(worker.id, None, status)
        else:
            self._set_status(worker, status, now)
        self._refresh(worker, now)
        if worker.registered:
            return False
        asked = worker.asked_to_register_at
        if asked is not None and now - asked < self.offline_timeout_s:
            return False
        worker.asked_to_register_at = now
        return True

    def on_deregister(self, message: Deregister) -> bool:
        """A worker left on purpose: static ones go offline, others are removed. False if unknown."""
        now = self._clock()
        worker = self._workers.get(message.worker_id)
        if worker is None:
            return False
        self._departed[message.worker_id] = now
        if worker.static:
            worker.registered = False
            worker.heartbeat = None
            self._set_status(worker, "offline", now)
        else:
            del self._workers[worker.id]
            self._candidates.clear()
            self._emit(worker.id, worker.status, None)
        return True

    def _entry(self, worker_id: str) -> tuple[_Worker, bool]:
        worker = self._workers.get(worker_id)
        if worker is not None:
            return worker, False
        worker = self._workers[worker_id] = _Worker(id=worker_id)
        settings = self._settings.get(worker_id)
        if settings is not None:
            settings.apply(worker)
        self._candidates.clear()
        return worker, True

    # --- timeouts -------------------------------------------------------------------------------

    def sweep(self) -> list[WorkerEvent]:
        """Mark silent workers offline and forget long-offline non-static ones; return what changed."""
        now = self._clock()
        events: list[WorkerEvent] = []
        for worker in list(self._workers.values()):
            if worker.status != "offline":
                if worker.last_seen is None or now - worker.last_seen > self.offline_timeout_s:
                    events.append(WorkerEvent(worker_id=worker.id, previous=worker.status, current="offline"))
                    self._set_status(worker, "offline", now)
            elif not worker.static and worker.offline_since is not None:
                if now - worker.offline_since > self.forget_after_s:
                    del self._workers[worker.id]
                    self._candidates.clear()
                    events.append(WorkerEvent(worker_id=worker.id, previous="offline", current=None))
                    self._emit(worker.id, "offline", None)
        for worker_id, departed in list(self._departed.items()):
            if now - departed >= self.offline_timeout_s:
                del self._departed[worker_id]
        return events

    async def run_sweeper(self, stop: asyncio.Event, interval_s: float | None = None) -> None:
        """Call :meth:`sweep` every ``interval_s`` (default: a quarter timeout, at most 1 s) until ``stop``."""
        interval = interval_s if interval_s is not None else min(MAX_SWEEP_INTERVAL_S, self.offline_timeout_s / 4)
        while not stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("registry sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    # --- local load -----------------------------------------------------------------------------

    def begin(self, worker_id: str) -> None:
        """The dispatcher sent a request to ``worker_id``.

        Load between heartbeats is ``max(inflight, reported + since_heartbeat)``: ``inflight`` counts this
        controller's unfinished requests (exact for a single controller, and covers requests still on the
        wire when a heartbeat was sent), ``reported`` is the heartbeat's active + queued (which includes other
        controllers' requests) and ``since_heartbeat`` is begins minus ends since that heartbeat.
        """
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.inflight += 1
            worker.since_heartbeat += 1
            self._refresh_load(worker, self._clock())

    def end(self, worker_id: str) -> None:
        """A request sent to ``worker_id`` finished, failed or was cancelled (call once per :meth:`begin`)."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.inflight = max(0, worker.inflight - 1)
            worker.since_heartbeat -= 1
            self._refresh_load(worker, self._clock())

    # --- queries --------------------------------------------------------------------------------

    def get(self, worker_id: str) -> WorkerView | None:
        """One worker's view, or ``None`` when unknown."""
        worker = self._workers.get(worker_id)
        return self._view(worker, self._clock()) if worker is not None else None

    def query(
        self,
        *,
        status: WorkerState | Collection[WorkerState] | None = None,
        tag: str | None = None,
        model: str | None = None,
    ) -> list[WorkerView]:
        """Views of matching workers, highest priority first, then by id."""
        statuses = {status} if isinstance(status, str) else set(status) if status is not None else None
        now = self._clock()
        return [
            self._view(w, now)
            for w in self._sorted(self._workers.values())
            if (statuses is None or w.status in statuses)
            and (tag is None or tag in w.tags)
            and (model is None or model in w.models)
        ]

    def eligible(self, model: str, exclude: Collection[str] = frozenset()) -> EligibleWorkers:
        """Online or degraded workers serving ``model``, minus ``exclude`` (workers already tried).

        This runs on every pick, so the list of views per model is cached: rebuilt when the set of
        candidates changes (status, models, capacity, a worker added or removed), and patched in place when
        one worker's view is refreshed (a heartbeat, a request begun or ended; a view's ``seen_ago_s`` is as
        of that change), its ``loads`` and ``by_load`` hints with it. With nothing to exclude a pick gets that
        list itself, lent (read-only, see :class:`~mlxcluster.api.EligibleWorkers`): no copy.
        """
        cached = self._candidates.get(model)
        if cached is None:
            now = self._clock()
            members = [
                w for w in self._sorted(self._workers.values()) if w.status in ELIGIBLE_STATES and model in w.models
            ]
            for worker in members:
                if worker.view is None:
                    worker.view = self._view(worker, now)
            cached = self._candidates[model] = EligibleWorkers(w.view for w in members)
            cached.positions = {w.id: i for i, w in enumerate(members)}
            cached.loads = [v.load for v in cached]
            cached.by_load = LoadBuckets()
            for view in cached:
                cached.by_load.add(view.id, view.load)
            cached.uniform = len({w.priority for w in members}) <= 1 and all(w.status == "online" for w in members)
            capacities = {w.max_concurrent for w in members}
            cached.capacity = capacities.pop() if len(capacities) == 1 else 0
        if exclude:
            result = EligibleWorkers(v for v in cached if v.id not in exclude)
            result.uniform, result.capacity = cached.uniform, cached.capacity
            return result
        return cached  # lent: read-only (see EligibleWorkers), and no refresh runs during a pick

    def _refresh_load(self, worker: _Worker, now: float) -> None:
        """:meth:`_refresh` after a begin/end, which change only the load: a valid cached view is copied with
        the new load (in C) rather than rebuilt field by field (twice per request on the hot path)."""
        view = worker.view
        if view is None:
            self._refresh(worker, now)
            return
        seen = None if worker.last_seen is None else max(0.0, now - worker.last_seen)
        self._refresh(
            worker, now, msgspec.structs.replace(view, inflight=worker.inflight, load=worker.load(), seen_ago_s=seen)
        )

    def _refresh(self, worker: _Worker, now: float, view: WorkerView | None = None) -> None:
        """Rebuild one worker's view now (or take ``view``) and put it in the cached candidate lists that hold it."""
        view = worker.view = view if view is not None else self._view(worker, now)
        for model in worker.models:
            cached = self._candidates.get(model)
            if cached is not None and cached.positions is not None:
                position = cached.positions.get(worker.id)
                if position is not None:
                    list.__setitem__(cached, position, view)  # the registry's own list: read-only to balancers
                    loads = cached.loads
                    if loads is not None and loads[position] != view.load:
                        if cached.by_load is not None:
                            cached.by_load.move(worker.id, loads[position], view.load)
                        loads[position] = view.load

    def has_model(self, model: str) -> bool:
        """Whether any known worker, whatever its status, serves ``model`` or may load it (its catalogue).

        False means "unknown model" (404); True with no eligible worker means "no capacity" (503) or, where
        a catalogue has it, "load it first".
        """
        return any(
            model in w.models or (w.catalogue is not None and model in w.catalogue) for w in self._workers.values()
        )

    def catalogue_entry(self, model: str) -> CatalogueModel | None:
        """What a worker's catalogue says of ``model`` (its kind, dimensions, context), from the first worker that
        lists it; ``None`` when no catalogue does (a worker predating catalogues: a chat model)."""
        for worker in self._workers.values():
            if worker.catalogue is not None and (entry := worker.catalogue.get(model)) is not None:
                return entry
        return None

    def is_vision(self, model: str) -> bool:
        """Whether some known worker reports ``model`` as a vision model (its catalogue entry)."""
        return any(
            w.catalogue is not None and (entry := w.catalogue.get(model)) is not None and entry.vision
            for w in self._workers.values()
        )

    def loaded_somewhere(self, model: str) -> bool:
        """Whether an online or degraded worker serves ``model`` now (loaded)."""
        return any(w.status in ELIGIBLE_STATES and model in w.models for w in self._workers.values())

    def loadable_somewhere(self, model: str) -> bool:
        """Whether an online or degraded worker has ``model`` in its catalogue without serving it now."""
        return any(
            w.status in ELIGIBLE_STATES and w.catalogue is not None and model in w.catalogue and model not in w.models
            for w in self._workers.values()
        )

    def fleet(self) -> list[FleetWorker]:
        """What each known worker holds and may load (``/v1/models``, placement, ``/api/cluster/models``)."""
        return [
            FleetWorker(
                id=w.id,
                status=w.status,
                models=w.models,
                catalogue=w.catalogue if w.catalogue is not None else {m: CatalogueModel(name=m) for m in w.models},
                states={state.name: state for state in w.model_states},
                memory=w.memory,
                load=w.load(),
                max_concurrent=w.max_concurrent,
                hostname=w.registration.hostname if w.registration is not None else "",
            )
            for w in self._sorted(self._workers.values())
        ]

    def model_loaded(self, worker_id: str, state: ModelState) -> None:
        """A load command this controller sent succeeded: the worker serves ``state.name`` now (its heartbeat,
        published at the same time, may still be on the way)."""
        worker = self._workers.get(worker_id)
        if worker is None or state.name in worker.models:
            return
        worker.models = (*worker.models, state.name)
        worker.model_states = (*(s for s in worker.model_states if s.name != state.name), state)
        worker.view = None
        self._candidates.clear()

    def is_offline(self, worker_id: str) -> bool:
        """True when the worker is offline or no longer known (a dispatcher stops waiting on it)."""
        worker = self._workers.get(worker_id)
        return worker is None or worker.status == "offline"

    def models(self) -> list[str]:
        """Sorted union of the models served by online and degraded workers."""
        return sorted({m for w in self._workers.values() if w.status in ELIGIBLE_STATES for m in w.models})

    def stats(self) -> RegistryStats:
        """Counts by status, plus capacity and load of the online and degraded workers."""
        counts = dict.fromkeys(("online", "degraded", "draining", "offline"), 0)
        capacity = active = queued = inflight = 0
        for w in self._workers.values():
            counts[w.status] += 1
            if w.status in ELIGIBLE_STATES:
                capacity += w.max_concurrent
                active += w.heartbeat.active if w.heartbeat else 0
                queued += w.heartbeat.queued if w.heartbeat else 0
                inflight += w.inflight
        return RegistryStats(
            total=len(self._workers), capacity=capacity, active=active, queued=queued, inflight=inflight, **counts
        )

    # --- run-time settings (drain, priority, tags, forget: see worker_admin) ----------------------

    def _admin_status(self, worker: _Worker, reported: WorkerState) -> WorkerState:
        settings = self._settings.get(worker.id)
        return settings.status(reported) if settings is not None else reported

    def configure(self, worker_id: str, change: WorkerSettings, *, remember: bool = False) -> WorkerView | None:
        """Apply run-time settings to a known worker (``None`` fields keep their value); ``None`` if unknown
        (with ``remember``, they are kept for when it appears: settings another controller sent).

        They survive heartbeats and are applied again when the worker re-registers after leaving.
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            if remember:
                self._settings.setdefault(worker_id, WorkerSettings(drained=False)).update(change)
            return None
        settings = self._settings.setdefault(worker_id, WorkerSettings.defaults_of(worker))
        settings.update(change)
        settings.apply(worker)
        now = self._clock()
        if worker.status != "offline":
            reported = worker.heartbeat.status if worker.heartbeat is not None else "online"
            self._set_status(worker, settings.status(reported), now)
        worker.view = None
        self._candidates.clear()
        return self._view(worker, now)

    def all_settings(self) -> dict[str, WorkerSettings]:
        """Every worker's run-time settings, by id."""
        return dict(self._settings)

    def drop_settings(self, worker_id: str) -> None:
        """Forget ``worker_id``'s run-time settings (the worker keeps its current priority and tags)."""
        self._settings.pop(worker_id, None)

    def settings_of(self, worker_id: str) -> WorkerSettings | None:
        """The run-time settings of ``worker_id`` (``None``: never configured)."""
        return self._settings.get(worker_id)

    def forget(self, worker_id: str) -> bool:
        """Remove an offline worker and its settings; False if unknown. Raises ``ValueError`` if not offline."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        if worker.status != "offline":
            raise ValueError(f"worker {worker_id} is {worker.status}; only an offline worker can be forgotten")
        del self._workers[worker_id]
        self._settings.pop(worker_id, None)
        self._candidates.clear()
        self._emit(worker_id, "offline", None)
        return True

    def telemetry(self, worker_id: str) -> dict[str, object] | None:
        """What the worker reported beyond its view: hardware, capabilities, CPU, RSS, registration."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return None
        reg, hb = worker.registration, worker.heartbeat
        return {
            "hardware": msgspec.to_builtins(reg.hardware) if reg is not None else None,
            "capabilities": msgspec.to_builtins(reg.capabilities) if reg is not None else None,
            "started_at": reg.started_at if reg is not None and reg.started_at else None,
            "registered_at": worker.registered_at,
            "cpu_percent": hb.cpu_percent if hb is not None else None,
            "rss_bytes": hb.rss_bytes if hb is not None else None,
            "tokens_total": hb.tokens_total if hb is not None else None,
            "drained": bool(self._settings.get(worker_id) and self._settings[worker_id].drained),
        }

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    @staticmethod
    def _sorted(workers: Iterable[_Worker]) -> list[_Worker]:
        return sorted(workers, key=lambda w: (-w.priority, w.id))

    def _view(self, w: _Worker, now: float) -> WorkerView:
        reg, hb = w.registration, w.heartbeat
        caps = reg.capabilities if reg is not None else None
        memory = hb.available_memory_gb if hb is not None and hb.available_memory_gb > 0 else 0.0
        return WorkerView(
            id=w.id,
            status=w.status,
            priority=w.priority,
            tags=w.tags,
            models=w.models,
            active=hb.active if hb else 0,
            queued=hb.queued if hb else 0,
            inflight=w.inflight,
            load=w.load(),
            max_concurrent=w.max_concurrent,
            max_queue=w.max_queue,
            tokens_per_second=hb.tokens_per_second if hb else 0.0,
            available_memory_gb=memory or (caps.available_memory_gb if caps else 0.0),
            memory_gb=reg.hardware.memory_gb if reg else 0.0,
            hostname=reg.hostname if reg else "",
            address=(reg.address if reg and reg.address else w.static_address),
            engine=caps.engine if caps else "",
            version=caps.version if caps else "",
            static=w.static,
            registered=w.registered,
            seen_ago_s=None if w.last_seen is None else max(0.0, now - w.last_seen),
            requests_total=hb.requests_total if hb else 0,
            errors_total=hb.errors_total if hb else 0,
            prompt_cache=hb.prompt_cache if hb else None,
            speculation=hb.speculation if hb else None,
            group=reg.group if reg else None,
            memory=w.memory,
            accelerator=hb.accelerator if hb else None,
        )


def accelerator_fields(stats: AcceleratorStats) -> dict[str, float]:
    """The numeric figures of a worker's :class:`~mlxcluster.protocol.AcceleratorStats` that it knows (for
    metrics: unknown ones are left out, not zero)."""
    fields = msgspec.structs.asdict(stats)
    return {name: value for name, value in fields.items() if isinstance(value, int | float) and value is not None}


def speculation_fields(counts: SpeculationCounts) -> dict[str, float]:
    """A worker's :class:`~mlxcluster.protocol.SpeculationCounts` as shown to operators (the API, the metrics):
    every count (zeros included) plus ``acceptance_rate``, the share of drafted tokens accepted, and
    ``model_acceptance_rate``, the same for the draft model's drafts alone (each 0.0 before any was drafted)."""
    fields: dict[str, float] = msgspec.structs.asdict(counts)
    fields["acceptance_rate"] = round(counts.accepted / counts.drafted, 4) if counts.drafted else 0.0
    fields["model_acceptance_rate"] = (
        round(counts.model_accepted / counts.model_drafted, 4) if counts.model_drafted else 0.0
    )
    return fields
