"""The models one worker holds: loads on demand, keep-alive, unloads, and room made under one memory budget.

Every model of the worker's :class:`~mlxcluster.worker.catalogue.Catalogue` may be loaded; each loaded model is
its own engine (its own generation thread). Guarantees, each tested:

* **One load per model at a time.** Requests and load commands for a model that is loading wait on that
  load; a model being unloaded is loaded again only once the unload is over.
* **Keep-alive** (Ollama's semantics): when a model's last request ends it stays loaded for that request's
  ``keep_alive`` (else the model's, else ``worker.keep_alive``); 0 unloads it at once, a negative value keeps
  it. Pinned models never expire. Expiry is checked every ``sweep_interval_s``.
* **Room by eviction.** A load that does not fit the budget's room for weights evicts idle (no request in
  flight), unpinned models, least recently used first; if that is not enough it fails with a message saying
  what holds the memory, unless ``force`` (then it loads, with a warning).

Used from the worker's event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxcluster.errors import NodeError
from mlxcluster.protocol import CatalogueModel, ModelLoadState, ModelState
from mlxcluster.worker.catalogue import Catalogue, CatalogueEntry
from mlxcluster.worker.engine_base import Engine
from mlxcluster.worker.memory_budget import MemoryBudget
from mlxcluster.worker.models import resolve_model

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0

EngineFactory = Callable[[CatalogueEntry], Engine]
"""Builds (does not start) the engine serving one catalogue entry."""


class LoadError(Exception):
    """A model could not be loaded: not in the catalogue, no room, or its files or engine failed."""


@dataclass(slots=True, eq=False)
class _Hosted:
    """One model loaded, loading or unloading."""

    entry: CatalogueEntry
    engine: Engine
    state: ModelLoadState = "loading"
    pinned: bool = False
    keep_alive_s: float | None = None
    """The model's own keep-alive (set by a load command or the last request that gave one)."""
    in_flight: int = 0
    forced: bool = False
    fixed: bool = False
    """Served by an engine started elsewhere (:meth:`ModelHost.adopt`): never unloaded."""
    last_used: float = 0.0
    expires_at: float | None = None
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    gone: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ModelHost:
    """Loads, serves and unloads the catalogue's models under one :class:`MemoryBudget`.

    :param factory: builds the engine of an entry.
    :param models_dir: where :func:`~mlxcluster.worker.models.resolve_model` looks (a repo id downloads at load).
    :param default_keep_alive_s: ``worker.keep_alive`` in seconds (negative: for ever).
    :param pinned: names never unloaded when idle.
    :param model_keep_alive_s: a model's own default keep-alive by name (``worker.model_keep_alive``).
    :param on_change: called after every change of a model's state (the worker publishes a heartbeat).
    :param clock: wall-clock seconds (``expires_at`` and ``last_used`` are Unix times).
    """

    def __init__(
        self,
        catalogue: Catalogue,
        factory: EngineFactory,
        budget: MemoryBudget,
        *,
        models_dir: Path,
        default_keep_alive_s: float = 300.0,
        pinned: set[str] | None = None,
        model_keep_alive_s: dict[str, float] | None = None,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self.catalogue = catalogue
        self.factory = factory
        self.budget = budget
        self.models_dir = models_dir
        self.default_keep_alive_s = default_keep_alive_s
        self.pinned = set(pinned or ())
        self.model_keep_alive_s = dict(model_keep_alive_s or {})
        self.on_change = on_change
        self.clock = clock
        self.sweep_interval_s = sweep_interval_s
        self.loads = 0
        """Loads started since start (a benchmark checks that concurrent first requests load once)."""
        self.unloads = 0
        self._hosted: dict[str, _Hosted] = {}
        self._promised: dict[str, int] = {}  # weights of loads waiting for evicted models to go
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[Callable[[str, Engine | None], None]] = []

    @classmethod
    def fixed(cls, engine: Engine, budget: MemoryBudget, models_dir: Path) -> ModelHost:
        """A host serving one engine started elsewhere (a worker group's face, a test's engine), pinned, and
        nothing else."""

        def refuse(entry: CatalogueEntry) -> Engine:
            raise LoadError(f"model {entry.name!r}: this worker serves only its own engine's models")

        host = cls(Catalogue(), refuse, budget, models_dir=models_dir)
        host.adopt(engine)
        return host

    # --- queries ---------------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Names of the models that serve now (state ``loaded``)."""
        return [name for name, hosted in self._hosted.items() if hosted.state == "loaded"]

    def engines(self) -> dict[str, Engine]:
        """The engines of the loaded models, by served name."""
        return {name: h.engine for name, h in self._hosted.items() if h.state == "loaded"}

    def states(self) -> list[ModelState]:
        """Every model loaded, loading or unloading (heartbeats, ``models ps``)."""
        return [self._state(hosted) for hosted in self._hosted.values()]

    def state(self, name: str) -> ModelState | None:
        """One model's state, or ``None`` when it is not loaded."""
        hosted = self._hosted.get(name)
        return self._state(hosted) if hosted is not None else None

    def in_flight(self) -> int:
        """Requests of every model running or waiting here."""
        return sum(hosted.in_flight for hosted in self._hosted.values())

    def add_engine_listener(self, listener: Callable[[str, Engine | None], None]) -> None:
        """Call ``listener(name, engine)`` when a model starts serving, ``listener(name, None)`` once it is gone."""
        self._listeners.append(listener)

    def _state(self, hosted: _Hosted) -> ModelState:
        return ModelState(
            name=hosted.entry.name,
            state=hosted.state,
            weights_bytes=hosted.entry.facts.weights_bytes,
            last_used=hosted.last_used,
            expires_at=hosted.expires_at,
            pinned=hosted.pinned,
            in_flight=hosted.in_flight,
        )

    # --- lifetime --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the keep-alive sweep."""
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def stop(self) -> None:
        """Stop the sweep and every engine (requests still running end as their engine stops them)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for name in list(self._hosted):
            hosted = self._hosted[name]
            with contextlib.suppress(Exception):
                await hosted.engine.stop()
            self._forget(name, hosted)

    def adopt(self, engine: Engine) -> None:
        """Serve an engine started elsewhere (a worker group's face, a test's engine) under every name it
        serves: pinned, never unloaded."""
        info = engine.info()
        for name in info.models:
            entry = self.catalogue.get(name) or CatalogueEntry(
                name, name, None, CatalogueModel(name=name, source="engine", vision=info.vision)
            )
            self.catalogue.add(entry)
            hosted = _Hosted(entry=entry, engine=engine, state="loaded", pinned=True, fixed=True)
            hosted.last_used = self.clock()
            hosted.ready.set_result(None)
            self._hosted[name] = hosted
            self._budget(hosted)
            for listener in list(self._listeners):
                listener(name, engine)

    # --- requests --------------------------------------------------------------------------------

    async def acquire(self, name: str, keep_alive_s: float | None = None) -> Lease:
        """Hold model ``name`` for one request, loading it first if needed (one load, however many wait).

        While held the model is in flight: never evicted nor expired. When the lease is released its
        keep-alive starts (``keep_alive_s``: the request's own; None: the model's default).

        :raises LoadError: the model cannot be loaded (not in the catalogue, no room, a failed load).
        """
        hosted = await self._ready(name)
        hosted.in_flight += 1
        hosted.expires_at = None
        if keep_alive_s is not None:
            hosted.keep_alive_s = keep_alive_s
        return Lease(self, hosted)

    def _release(self, hosted: _Hosted) -> None:
        hosted.in_flight -= 1
        hosted.last_used = self.clock()
        if hosted.in_flight == 0:
            self._idle(hosted)

    async def _ready(self, name: str) -> _Hosted:
        """The model's record once it serves (loading it, or waiting for its load or unload)."""
        while True:
            hosted = self._hosted.get(name)
            if hosted is None:
                hosted, _ = self._begin_load(name, force=False)
            if hosted.state == "unloading":
                await asyncio.shield(hosted.gone)
                continue
            await asyncio.shield(hosted.ready)  # raises the load's LoadError
            return hosted

    # --- commands --------------------------------------------------------------------------------

    async def load(
        self, name: str, *, keep_alive_s: float | None = None, pin: bool | None = None, force: bool = False
    ) -> tuple[ModelState, str]:
        """Load ``name`` (or find it loaded) and set its keep-alive and pin; its state and a warning (``force``).

        :raises LoadError: as :meth:`use`.
        """
        warning = ""
        hosted = self._hosted.get(name)
        if hosted is not None and hosted.state == "unloading":
            await asyncio.shield(hosted.gone)
            hosted = None
        if hosted is None:
            hosted, warning = self._begin_load(name, force=force)
        await asyncio.shield(hosted.ready)
        if pin is not None:
            hosted.pinned = pin
            if pin:
                self.pinned.add(name)
            else:
                self.pinned.discard(name)
        if keep_alive_s is not None:
            hosted.keep_alive_s = keep_alive_s
        if hosted.in_flight == 0:
            self._idle(hosted)
        self._changed()
        return self._state(hosted), warning

    async def unload(self, name: str) -> ModelState | None:
        """Unload ``name`` once its requests end (new ones wait and load it again); its last state, or ``None``
        when it was not loaded."""
        hosted = self._hosted.get(name)
        if hosted is None:
            return None
        if hosted.fixed:
            raise LoadError(f"model {name!r} is served by this worker's own engine (given at start); it stays loaded")
        if hosted.state == "loading":
            with contextlib.suppress(LoadError):
                await asyncio.shield(hosted.ready)
            if self._hosted.get(name) is not hosted:
                return None
        if hosted.state != "unloading":
            self._begin_unload(hosted)
        await asyncio.shield(hosted.gone)
        return self._state(hosted)

    # --- loading ---------------------------------------------------------------------------------

    def _begin_load(self, name: str, *, force: bool) -> tuple[_Hosted, str]:
        entry = self.catalogue.get(name)
        if entry is None:
            raise LoadError(f"model {name!r} is not in this worker's catalogue")
        warning, victims = self._make_room(entry, force=force)
        try:
            engine = self.factory(entry)
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(f"model {name!r}: cannot make its engine: {type(exc).__name__}: {exc}") from exc
        hosted = _Hosted(entry=entry, engine=engine, pinned=name in self.pinned, forced=force)
        hosted.ready.add_done_callback(_consume)
        self._hosted[name] = hosted
        self._promised[name] = entry.facts.weights_bytes
        self.loads += 1
        self._spawn(self._load(hosted, victims))
        self._changed()
        return hosted, warning

    def _budget(self, hosted: _Hosted) -> None:
        """Count the model's weights (and its prompt cache, through its current engine) in the budget."""
        self._promised.pop(hosted.entry.name, None)
        self.budget.add_model(
            hosted.entry.name,
            hosted.entry.facts.weights_bytes,
            cache_bytes=lambda: hosted.engine.prompt_cache_nbytes,
            shrink_cache=lambda target: hosted.engine.shrink_prompt_cache(target),
        )

    async def _load(self, hosted: _Hosted, victims: list[_Hosted]) -> None:
        """Wait for the models unloaded to make room, then load: the weights in memory never exceed the budget
        (unless forced)."""
        name = hosted.entry.name
        started = time.monotonic()
        log.info("loading model %s (%s)", name, _size(hosted.entry.facts.weights_bytes))
        try:
            if hosted.entry.path is None and hosted.entry.facts.source == "hub":
                resolved = await asyncio.to_thread(resolve_model, hosted.entry.spec, self.models_dir)
                hosted.entry = self.catalogue.resolved(name, resolved)  # its size is known now
                self._promised.pop(name, None)
                _, more = self._make_room(hosted.entry, force=hosted.forced)
                victims += more
                self._promised[name] = hosted.entry.facts.weights_bytes
                hosted.engine = self.factory(hosted.entry)
            for victim in victims:
                await asyncio.shield(victim.gone)
            self._budget(hosted)
            await hosted.engine.start()
        except (Exception, asyncio.CancelledError) as exc:
            reason = str(exc) if isinstance(exc, NodeError | LoadError) else f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", name, reason)
            with contextlib.suppress(Exception):
                await hosted.engine.stop()
            self._forget(name, hosted)
            hosted.ready.set_exception(LoadError(f"model {name!r} failed to load: {reason}"))
            self._changed()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        hosted.state = "loaded"
        hosted.last_used = self.clock()
        log.info("model %s loaded in %.1f s", name, time.monotonic() - started)
        hosted.ready.set_result(None)
        for listener in list(self._listeners):
            listener(name, hosted.engine)
        if hosted.in_flight == 0:
            self._idle(hosted)
        self._changed()

    def _make_room(self, entry: CatalogueEntry, *, force: bool) -> tuple[str, list[_Hosted]]:
        """Start unloading idle unpinned models (least recently used first) until ``entry``'s weights fit; the
        warning of a forced load that still does not fit, and the models being unloaded (the load waits for
        them). :raises LoadError: it does not fit and ``force`` is off."""
        need = entry.facts.weights_bytes
        idle = sorted(
            (h for h in self._hosted.values() if h.state == "loaded" and not h.pinned and h.in_flight == 0),
            key=lambda h: h.last_used,
        )
        evict: list[_Hosted] = []
        room = self.room_for_weights()
        while room < need and idle:
            victim = idle.pop(0)
            evict.append(victim)
            room += victim.entry.facts.weights_bytes
        warning = ""
        if room < need:
            message = self._no_room(entry, room)
            if not force:
                raise LoadError(message)
            log.warning("loading %s anyway (force): %s", entry.name, message)
            warning = f"forced past the memory budget: {message}"
        for victim in evict:
            log.info("unloading %s (idle) to make room for %s", victim.entry.name, entry.name)
            self._begin_unload(victim)
        self.budget.make_room(max(0, need - sum(v.entry.facts.weights_bytes for v in evict)))
        return warning, evict

    def room_for_weights(self) -> int:
        """Budget left for weights: the budget's room less the weights promised to loads under way."""
        return self.budget.room_for_weights() - sum(self._promised.values())

    def _no_room(self, entry: CatalogueEntry, room: int) -> str:
        held = [
            f"{h.entry.name} {_size(h.entry.facts.weights_bytes)}"
            + (" pinned" if h.pinned else "")
            + (f" {h.in_flight} in flight" if h.in_flight else "")
            for h in self._hosted.values()
        ]
        return (
            f"model {entry.name!r} needs {_size(entry.facts.weights_bytes)} of weights and this worker's memory "
            f"budget ({_size(self.budget.limit_bytes)}) has {_size(max(0, room))} free after evicting every idle "
            f"unpinned model"
            + (f" (held: {', '.join(held)})" if held else "")
            + "; unload a model, raise worker.memory_budget_bytes, or load with force"
        )

    # --- unloading -------------------------------------------------------------------------------

    def _idle(self, hosted: _Hosted) -> None:
        """The model's last request ended (or it loaded): start its keep-alive."""
        if hosted.state != "loaded":
            return
        keep = hosted.keep_alive_s
        if keep is None:
            keep = self.model_keep_alive_s.get(hosted.entry.name, self.default_keep_alive_s)
        if hosted.pinned or keep < 0:
            hosted.expires_at = None
        elif keep == 0:
            self._begin_unload(hosted)
        else:
            hosted.expires_at = self.clock() + keep

    def _begin_unload(self, hosted: _Hosted) -> None:
        hosted.state = "unloading"
        hosted.expires_at = None
        self._changed()
        self._spawn(self._unload(hosted))

    async def _unload(self, hosted: _Hosted) -> None:
        name = hosted.entry.name
        while hosted.in_flight:
            await asyncio.sleep(0.05)
        for listener in list(self._listeners):
            listener(name, None)
        try:
            await hosted.engine.stop()
        finally:
            self._forget(name, hosted)
            self.unloads += 1
            log.info("model %s unloaded", name)
            self._changed()

    def _forget(self, name: str, hosted: _Hosted) -> None:
        if self._hosted.get(name) is hosted:
            del self._hosted[name]
            self._promised.pop(name, None)
            self.budget.remove_model(name)
        if not hosted.gone.done():
            hosted.gone.set_result(None)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.sweep()

    def sweep(self) -> None:
        """Unload every idle model whose keep-alive has passed; while requests wait for memory, also the least
        recently used idle unpinned model (one per sweep: its weights go back to the budget, which lets them in)."""
        now = self.clock()
        for hosted in list(self._hosted.values()):
            expires = hosted.expires_at
            if hosted.state == "loaded" and hosted.in_flight == 0 and expires is not None and expires <= now:
                log.info("model %s: keep-alive over; unloading", hosted.entry.name)
                self._begin_unload(hosted)
        if self.budget.waiting_bytes() > 0:
            idle = [h for h in self._hosted.values() if h.state == "loaded" and not h.pinned and h.in_flight == 0]
            if idle:
                victim = min(idle, key=lambda h: h.last_used)
                log.info("requests wait for memory: unloading idle model %s", victim.entry.name)
                self._begin_unload(victim)

    # --- plumbing --------------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("the model host's change listener failed")


class Lease:
    """One request's hold on a loaded model (:meth:`ModelHost.acquire`); release it once, when the request ends."""

    __slots__ = ("_host", "_hosted", "released")

    def __init__(self, host: ModelHost, hosted: _Hosted) -> None:
        self._host = host
        self._hosted = hosted
        self.released = False

    @property
    def engine(self) -> Engine:
        """The engine serving the model."""
        return self._hosted.engine

    def release(self) -> None:
        """The request ended: the model's keep-alive starts once nothing else holds it (idempotent)."""
        if not self.released:
            self.released = True
            self._host._release(self._hosted)


def _consume(future: asyncio.Future[None]) -> None:
    """Mark a failed load's exception as seen (its waiters, if any, get it too)."""
    if not future.cancelled():
        future.exception()


def _size(count: int) -> str:
    if count >= 1024**3:
        return f"{count / 1024**3:.2f} GiB"
    return f"{count / 1024**2:.1f} MiB"
