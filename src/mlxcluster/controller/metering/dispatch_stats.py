"""The dispatcher's counters that cluster status, peer heartbeats and snapshots show.

They are kept from the dispatcher's own events (the one ledger of metering, which operations and the
exporters receive too): :class:`DispatchStats` is their first subscriber. Requests in flight are the
dispatcher's live meters.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sized

from mlxcluster.api import MetricsEvent, RequestFinished, RequestMigrated, RequestRetried

RECENT_WINDOW = 64  # requests kept for the rolling figures in cluster status (dashboard sparklines)
SUCCESS_WINDOW_S = 300.0
"""The window of ``requests.success_rate`` in cluster status: the last five minutes."""
SUCCESS_BUCKET_S = 5.0


class OutcomeWindow:
    """Requests that succeeded and failed over the last ``window_s`` seconds, in buckets of ``bucket_s``.

    Memory is bounded by the window (``window_s / bucket_s`` buckets), whatever the request rate; the window
    slides a bucket at a time.
    """

    def __init__(
        self,
        window_s: float = SUCCESS_WINDOW_S,
        bucket_s: float = SUCCESS_BUCKET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [bucket number, succeeded, failed], oldest first

    def record(self, succeeded: bool) -> None:
        """Count one finished request."""
        number = int(self._clock() // self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != number:
            self._buckets.append([number, 0, 0])
            self._expire(number)
        self._buckets[-1][1 if succeeded else 2] += 1

    def counts(self) -> tuple[int, int]:
        """(succeeded, failed) within the window now."""
        self._expire(int(self._clock() // self.bucket_s))
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def rate(self) -> float | None:
        """Succeeded / (succeeded + failed) within the window, rounded to 4 places; ``None`` when none finished."""
        succeeded, failed = self.counts()
        total = succeeded + failed
        return round(succeeded / total, 4) if total else None

    def _expire(self, number: int) -> None:
        oldest = number - int(self.window_s // self.bucket_s) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()


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
        self.outcomes = OutcomeWindow()
        """Dispatched requests that succeeded (``ok``) and failed (``error``) in the last five minutes; requests the
        client cancelled count as neither."""

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
        if event.status != "cancelled":
            self.outcomes.record(event.status == "ok")
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
