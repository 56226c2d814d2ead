"""The controller's lifecycle: idle → connecting → starting → ready → draining → stopped (or error).

``ready`` ⇄ ``degraded`` while the NATS connection is down (nothing can be dispatched then).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

log = logging.getLogger(__name__)

State = Literal["idle", "connecting", "starting", "ready", "degraded", "draining", "stopped", "error"]

_ALLOWED: dict[State, set[State]] = {
    "idle": {"connecting", "error", "stopped"},
    "connecting": {"starting", "error", "stopped"},
    "starting": {"ready", "error", "draining", "stopped"},
    "ready": {"degraded", "draining", "error", "stopped"},
    "degraded": {"ready", "draining", "error", "stopped"},
    "draining": {"stopped", "error"},
    "stopped": set(),
    "error": {"stopped"},
}


class Lifecycle:
    """Current state plus when it was entered; illegal transitions raise ``ValueError``."""

    def __init__(self) -> None:
        self.state: State = "idle"
        self.since = time.time()
        self.error: str | None = None

    def to(self, state: State, *, error: str | None = None) -> None:
        if state not in _ALLOWED[self.state]:
            raise ValueError(f"controller cannot go from {self.state} to {state}")
        log.info("controller state: %s → %s", self.state, state)
        self.state, self.since, self.error = state, time.time(), error

    @property
    def accepting(self) -> bool:
        """New inference requests are taken only when ready."""
        return self.state == "ready"
