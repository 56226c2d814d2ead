"""The controller's lifecycle: starting → ready → draining → stopped.

``ready`` ⇄ ``degraded`` while the NATS connection is down (nothing can be dispatched then). These are the
states anyone can see (``/health``, ``/ready``, cluster status, peer heartbeats): the app joins the
cluster in ``starting``, before it serves HTTP.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

log = logging.getLogger(__name__)

State = Literal["starting", "ready", "degraded", "draining", "stopped"]

_ALLOWED: dict[State, set[State]] = {
    "starting": {"ready", "draining", "stopped"},
    "ready": {"degraded", "draining", "stopped"},
    "degraded": {"ready", "draining", "stopped"},
    "draining": {"stopped"},
    "stopped": set(),
}


class Lifecycle:
    """Current state plus when it was entered; illegal transitions raise ``ValueError``."""

    def __init__(self) -> None:
        self.state: State = "starting"
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
