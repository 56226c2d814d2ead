"""The dispatcher's counters that cluster status, peer heartbeats and snapshots show.

They are kept from the dispatcher's own events (the one ledger of metering, which operations and the
exporters receive too): :class:`DispatchStats` is their first subscriber. Requests in flight are the
dispatcher's live meters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sized

from mlxcluster.api import MetricsEvent, RequestFinished, RequestMigrated, RequestRetried

RECENT_WINDOW = 64  # requests kept for the rolling figures in cluster status (dashboard sparklines)


class DispatchStats:
    """Counters of dispatched requests, from the dispatcher's events.

    :param live: the dispatcher's requests in flight (its live meters).
    """

    def __init__(self, live: Sized) -> None:
        self._live = live
        self.finished = 0
        """Dispatched requests that ended (whatever the outcome)."""
        self.retries = 0
        """Tries on another worker before the first token."""
        self.failed = 0
        """Requests no worker could take (503)."""
        self.completed = 0
        """Streams that ended with ``Done``."""
        self.errors = 0
        """Streams that ended with an ``Error`` frame."""
        self.migrations = 0
        """Started streams moved to another worker after their worker was lost."""
        self.migrations_failed = 0
        """Started streams whose worker was lost and that could not move (limit reached, no worker, client gone)."""
        self.recent_ttft_ms: deque[float] = deque(maxlen=RECENT_WINDOW)
        """Time to first token of the latest requests, as the controller saw it (retries included)."""
        self.recent_tokens_per_second: deque[float] = deque(maxlen=RECENT_WINDOW)
        """Generation speed of the latest completed requests, as their workers measured it."""

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def requests(self) -> int:
        """Requests dispatched so far: finished ones and those in flight (refused ones are not counted)."""
        return self.finished + self.in_flight

    def on_event(self, event: MetricsEvent) -> None:
        """Count one dispatcher event."""
        if isinstance(event, RequestFinished):
            if event.dispatched:
                self._finished(event)
        elif isinstance(event, RequestRetried):
            self.retries += 1
        elif isinstance(event, RequestMigrated):
            self.migrations += 1

    def _finished(self, event: RequestFinished) -> None:
        self.finished += 1
        if event.ttft_s is not None:
            self.recent_ttft_ms.append(event.ttft_s * 1000)
        if event.status == "ok":
            self.completed += 1
            if event.tokens_per_second > 0:
                self.recent_tokens_per_second.append(event.tokens_per_second)
        elif event.error_frame:
            self.errors += 1
            self.migrations_failed += event.unmoved
        elif event.error == "no_capacity":
            self.failed += 1
