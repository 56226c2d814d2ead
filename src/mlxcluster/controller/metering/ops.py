"""The operator's parts of a controller: API keys, rate limits, request monitoring, their event feed.

:class:`Operations` is built once by ``create_app`` and stored on the :class:`ControllerContext`. Its
:meth:`Operations.on_event` receives every metrics event the dispatcher emits (before the exporters do),
turning :class:`RequestFinished` into key usage, tokens against the key's TPM window, a finished-request
record and an access-log line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mlxcluster.api import MetricsEvent, RequestFinished
from mlxcluster.config import ControllerSection
from mlxcluster.controller.metering.keys import KeyRing
from mlxcluster.controller.metering.latency_tally import LatencyTally
from mlxcluster.controller.metering.ratelimit import RateLimiter
from mlxcluster.controller.metering.requests_log import RequestLog


@dataclass
class Operations:
    """Keys, limiter and request log of one controller."""

    keys: KeyRing = field(default_factory=KeyRing)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    requests: RequestLog = field(default_factory=RequestLog)
    latency: LatencyTally = field(default_factory=LatencyTally)
    """Latency histograms and tokens for the controller heartbeat (the tier's ``/metrics``)."""
    usage: Callable[[RequestFinished], None] | None = None
    """Where each finished request of a key goes besides this controller's counters (the shared usage
    ledger, while shared state is on)."""

    @classmethod
    def from_config(cls, config: ControllerSection, controller_id: str | None = None) -> Operations:
        return cls(keys=KeyRing.from_config(config), requests=RequestLog(config.recent_requests, controller_id))

    def on_event(self, event: MetricsEvent) -> None:
        """Account for one dispatcher event (cheap; runs on the event loop)."""
        if isinstance(event, RequestFinished):
            tokens = event.prompt_tokens + event.completion_tokens
            if event.key is not None:
                self.keys.record(
                    event.key,
                    status=event.status,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                )
                self.limiter.record_tokens(event.key, tokens)
                if self.usage is not None:
                    self.usage(event)
            self.requests.on_finished(event)
            self.latency.on_finished(event)

    def sink(self, exporters: Callable[[MetricsEvent], None] | None) -> Callable[[MetricsEvent], None]:
        """The dispatcher's event sink: this object first, then the exporters' feed (if any)."""
        if exporters is None:
            return self.on_event

        def both(event: MetricsEvent) -> None:
            self.on_event(event)
            exporters(event)

        return both

    def key_usage(self) -> list[dict[str, object]]:
        """Every key's configuration (never its value), limits, window and usage, for ``/api/cluster/keys``."""
        rows: list[dict[str, object]] = []
        for key in self.keys.keys():
            usage = self.keys.usage[key.name]
            rows.append(
                {
                    "name": key.name,
                    "admin": key.admin,
                    "models": sorted(key.models),
                    "source": key.source,
                    "created_at": key.created_at,
                    "expires_at": key.expires_at,
                    "revoked": key.revoked,
                    "limits": {"rpm": key.rpm, "tpm": key.tpm, "max_concurrent": key.max_concurrent},
                    "window": self.limiter.snapshot(key),
                    "usage": {
                        "requests": usage.requests,
                        "errors": usage.errors,
                        "cancelled": usage.cancelled,
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                        "rate_limited": usage.rate_limited,
                        "last_used": usage.last_used,
                    },
                }
            )
        return rows
