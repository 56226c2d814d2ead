"""Worker management at run time: drain, resume, priority and tags, kept by the registry per worker id.

A drained worker shows as ``draining`` whatever its heartbeats say, so balancers never see it: it gets no
new work while the streams it is serving run to the end. The settings outlive heartbeats and
re-registrations (a worker that restarts under the same id is drained again), until they are changed or
the worker is forgotten. They belong to this controller: with several controllers, apply them to each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from mlxcluster.api import ELIGIBLE_STATES, WorkerState

MAX_TAGS = 32
MAX_TAG_LENGTH = 64


class _WorkerRecord(Protocol):
    priority: int
    tags: tuple[str, ...]
    view: Any


@dataclass(slots=True)
class WorkerSettings:
    """Run-time settings of one worker; ``None`` means "not set" (keep the current value)."""

    drained: bool | None = None
    priority: int | None = None
    tags: tuple[str, ...] | None = None

    @classmethod
    def defaults_of(cls, worker: _WorkerRecord) -> WorkerSettings:
        """Settings that keep what the worker has now (its configured priority and tags)."""
        return cls(drained=False, priority=worker.priority, tags=worker.tags)

    def update(self, change: WorkerSettings) -> None:
        """Take every field ``change`` sets."""
        if change.drained is not None:
            self.drained = change.drained
        if change.priority is not None:
            self.priority = change.priority
        if change.tags is not None:
            self.tags = change.tags

    def apply(self, worker: _WorkerRecord) -> None:
        """Write priority and tags onto the registry's record."""
        if self.priority is not None:
            worker.priority = self.priority
        if self.tags is not None:
            worker.tags = self.tags
        worker.view = None

    def status(self, reported: WorkerState) -> WorkerState:
        """The status the cluster sees: ``draining`` while drained, else what the worker reported."""
        return "draining" if self.drained and reported in ELIGIBLE_STATES else reported

    def to_json(self) -> dict[str, Any]:
        return {"drained": bool(self.drained), "priority": self.priority, "tags": list(self.tags or ())}


def parse_settings(body: Any) -> WorkerSettings:
    """A settings body ``{"priority": int, "tags": [str], "drained": bool}``; ValueError names the field."""
    if not isinstance(body, dict):
        raise ValueError("body: expected a JSON object with priority, tags and/or drained")
    unknown = set(body) - {"priority", "tags", "drained"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown field (expected priority, tags, drained)")
    change = WorkerSettings()
    if "priority" in body:
        priority = body["priority"]
        if not isinstance(priority, int) or isinstance(priority, bool) or not -1_000_000 <= priority <= 1_000_000:
            raise ValueError("priority: expected an integer in -1000000..1000000")
        change.priority = priority
    if "tags" in body:
        tags = body["tags"]
        if (
            not isinstance(tags, list)
            or len(tags) > MAX_TAGS
            or not all(isinstance(t, str) and 0 < len(t) <= MAX_TAG_LENGTH and t.isprintable() for t in tags)
        ):
            raise ValueError(f"tags: expected a list of at most {MAX_TAGS} non-empty strings")
        change.tags = tuple(dict.fromkeys(tags))
    if "drained" in body:
        if not isinstance(body["drained"], bool):
            raise ValueError("drained: expected true or false")
        change.drained = body["drained"]
    if change.drained is None and change.priority is None and change.tags is None:
        raise ValueError("body: give at least one of priority, tags, drained")
    return change
