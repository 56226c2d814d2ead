"""Per-worker circuit breakers: open after consecutive failures, half-open after a cool-down."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass
class Breaker:
    """One worker's breaker."""

    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False


class Breakers:
    """Tracks every worker's breaker. ``allows`` is asked before a pick, ``record_*`` after a try."""

    def __init__(self, *, threshold: int = 3, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}

    def state(self, worker_id: str) -> BreakerState:
        breaker = self._breakers.get(worker_id)
        if breaker is None or breaker.opened_at is None:
            return "closed"
        if self.clock() - breaker.opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allows(self, worker_id: str) -> bool:
        """Closed: yes. Open: no. Half-open: one trial request at a time."""
        state = self.state(worker_id)
        if state == "closed":
            return True
        if state == "open":
            return False
        return not self._breakers[worker_id].trial_in_flight

    def begin(self, worker_id: str) -> None:
        """A request is sent to the worker (marks the half-open trial)."""
        if self.state(worker_id) == "half_open":
            self._breakers[worker_id].trial_in_flight = True

    def record_success(self, worker_id: str) -> None:
        self._breakers.pop(worker_id, None)

    def record_failure(self, worker_id: str) -> None:
        breaker = self._breakers.setdefault(worker_id, Breaker())
        breaker.failures += 1
        breaker.trial_in_flight = False
        if breaker.failures >= self.threshold or breaker.opened_at is not None:
            breaker.opened_at = self.clock()

    def blame(self, worker_id: str, *, epoch: int, now: int) -> None:
        """Count a failure against the worker's breaker, unless our own NATS connection dropped meanwhile (the
        bus epoch when the try began, ``epoch``, differs from ``now``): frames lost in a bus outage say nothing
        about the worker (and would open every breaker at once); the half-open trial just ends then."""
        if epoch == now:
            self.record_failure(worker_id)
        else:
            self.forgive(worker_id)

    def forgive(self, worker_id: str) -> None:
        """A try failed for a reason that is not the worker's (the bus dropped): end a half-open trial
        without counting a failure."""
        breaker = self._breakers.get(worker_id)
        if breaker is not None:
            breaker.trial_in_flight = False

    def open_ids(self) -> set[str]:
        """Workers a pick must skip right now."""
        if not self._breakers:  # the usual case, on every pick
            return set()
        return {worker_id for worker_id in self._breakers if not self.allows(worker_id)}
