"""From the configured strategy name to a worker: priority tiers, sticky sessions, plugin isolation.

The pipeline for one pick, built by :func:`build_balancer`::

    registry.eligible(model, exclude)      online/degraded workers serving the model
      → StickySessions (if enabled)        same session id → same worker while it is eligible
      → PreferredTier                      online before degraded, then the highest priority tier
                                           that has a free slot (else the highest tier)
      → the strategy plugin                cache_aware, least_loaded, ... or a third-party one
                                           (a factory with a ``context`` parameter gets the
                                           BalancerContext: settings and the cache index)

A strategy that raises or returns something that is not one of its workers is logged and replaced, for
that pick, by ``least_loaded``, so a broken plugin never fails a request.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Mapping, Sequence

import pluggy

from mlxcluster.api import (
    DEFAULT_MAX_ENTRIES,
    Balancer,
    BalancerContext,
    Cursor,
    InferenceRequest,
    LruMap,
    WorkerView,
    least_utilized,
)
from mlxcluster.config import LoadBalancingSection
from mlxcluster.plugins import BalancerEntry, collect_balancers

log = logging.getLogger(__name__)


class UnknownBalancerError(LookupError):
    """``load_balancing.strategy`` names no registered balancer."""


class PreferredTier:
    """Narrow the eligible workers to the preferred tier, then let ``strategy`` pick.

    Degraded workers are used only when no online worker serves the model. Among the rest, the highest
    ``priority`` wins while any worker of that priority has a free slot; when the whole tier is busy the
    next priority with a free slot is used (spill-over), and when no worker has a free slot the highest
    priority tier queues the request.
    """

    def __init__(self, strategy: Balancer, name: str = "strategy") -> None:
        self.strategy = strategy
        self.name = name
        self._fallback = Cursor()  # least_loaded's round-robin among equally loaded workers
        self.errors = 0

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """Pick within the preferred tier."""
        # the registry's list says when there is no tier to narrow to (all online, one priority)
        candidates = workers if getattr(workers, "uniform", False) else preferred_tier(workers)
        if not candidates:
            return None
        try:
            chosen = self.strategy.pick(candidates, request)
            if chosen is None or (isinstance(chosen, WorkerView) and is_candidate(chosen, candidates)):
                return chosen
            raise TypeError(f"returned {chosen!r}, which is not one of the workers it was given")
        except Exception:
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                log.exception("balancer %s failed (%d times); using least_loaded", self.name, self.errors)
            return least_utilized(candidates, self._fallback)


def is_candidate(chosen: WorkerView, candidates: Sequence[WorkerView]) -> bool:
    """Whether ``chosen`` is one of ``candidates`` (by id): one lookup on the registry's list (its
    ``positions``), a pass over the list otherwise."""
    positions: dict[str, int] | None = getattr(candidates, "positions", None)
    if positions is not None:
        return chosen.id in positions
    return any(chosen.id == w.id for w in candidates)


def preferred_tier(workers: Sequence[WorkerView]) -> Sequence[WorkerView]:
    """The workers a strategy should choose among (see :class:`PreferredTier`)."""
    if getattr(workers, "uniform", False):  # the registry says: all online, one priority: nothing to narrow
        return workers
    online = [w for w in workers if w.status == "online"]
    pool = online or [w for w in workers if w.status == "degraded"]
    if not pool:
        return []
    priorities = sorted({w.priority for w in pool}, reverse=True)
    for priority in priorities:
        tier = [w for w in pool if w.priority == priority]
        if any(w.free_slots for w in tier):
            return tier
    return [w for w in pool if w.priority == priorities[0]]


class StickySessions:
    """Requests with the same ``session_id`` go to the same worker while it stays eligible.

    Remembers at most ``max_sessions`` sessions (least recently used forgotten first), keyed by a digest
    of the session id so memory per entry is bounded. Requests without a session id pass straight through.
    """

    def __init__(self, inner: Balancer, max_sessions: int = DEFAULT_MAX_ENTRIES) -> None:
        self.inner = inner
        self.sessions = LruMap(max_sessions)

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        """The session's worker if still eligible, else the inner balancer's pick (then remembered)."""
        if not request.session_id:
            return self.inner.pick(workers, request)
        key = hashlib.blake2b(request.session_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        remembered = self.sessions.get(key)
        if remembered is not None:
            for worker in workers:
                if worker.id == remembered:
                    return worker
        chosen = self.inner.pick(workers, request)
        if chosen is not None:
            self.sessions.set(key, chosen.id)
        return chosen


def build_balancer(
    pm: pluggy.PluginManager, section: LoadBalancingSection, context: BalancerContext | None = None
) -> Balancer:
    """The balancer for ``[load_balancing]``, from the strategies the plugins in ``pm`` register.

    :param context: given to factories that take a ``context`` parameter (default: one with ``section``
        and no cache index).
    :raises UnknownBalancerError: the strategy is not registered (the message lists the ones that are).
    """
    return balancer_from_entries(collect_balancers(pm), section, context)


def wants_context(factory: object) -> bool:
    """Whether a balancer factory takes a ``context`` parameter (see :class:`BalancerContext`)."""
    try:
        parameters = inspect.signature(factory).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a builtin or C callable without a signature: call it bare
        return False
    parameter = parameters.get("context")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def balancer_from_entries(
    entries: Mapping[str, BalancerEntry], section: LoadBalancingSection, context: BalancerContext | None = None
) -> Balancer:
    """Like :func:`build_balancer`, from entries already collected with :func:`collect_balancers`."""
    entry = entries.get(section.strategy)
    if entry is None:
        known = ", ".join(sorted(entries)) or "none"
        raise UnknownBalancerError(
            f"load_balancing.strategy: unknown balancer {section.strategy!r} (registered: {known})"
        )
    if wants_context(entry.factory):
        strategy = entry.factory(context=context or BalancerContext(section))
    else:
        strategy = entry.factory()
    if not callable(getattr(strategy, "pick", None)):
        raise UnknownBalancerError(
            f"load_balancing.strategy: {section.strategy!r} from plugin {entry.plugin} has no pick() method"
        )
    balancer: Balancer = PreferredTier(strategy, name=section.strategy)
    if section.sticky_sessions:
        balancer = StickySessions(balancer)
    return balancer
