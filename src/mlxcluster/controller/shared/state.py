"""The shared state of a controller (:class:`SharedState`) and opening it (:func:`open_shared_state`).

Keys (a bucket), usage (a stream and a bucket), leased rate-limit budgets (a bucket whose entries expire,
``limits.py``) and workers' run-time settings (a bucket, followed by
``routing/settings_sync.py``). Its lifetime in the app is ``controller/shared/lifetime.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mlxcluster.bus import Bus
from mlxcluster.bus.jetstream import Bucket, open_jetstream
from mlxcluster.controller.metering.keys import KeyRing
from mlxcluster.controller.shared.keystore import KeyStore
from mlxcluster.controller.shared.limits import BUCKET_TTL_S, ClusterLimits
from mlxcluster.controller.shared.records import bucket_prefix
from mlxcluster.controller.shared.usage import UsageLedger

log = logging.getLogger(__name__)


@dataclass
class SharedState:
    """The keys bucket, the usage ledger and the cluster-wide limits of a controller whose state is shared."""

    keys: KeyStore
    usage: UsageLedger
    limits: ClusterLimits
    settings: Bucket
    """Workers' run-time settings (drain, priority, tags), one entry per worker (``routing/settings_sync.py``)."""
    replicas: int
    names: dict[str, str] = field(default_factory=dict)
    """Bucket and stream names, for the status route and the logs."""
    settings_invalid: int = 0
    """Malformed worker-settings entries dropped."""

    @property
    def invalid_records(self) -> int:
        """Malformed entries dropped (keys, usage, limits and settings)."""
        return (
            self.keys.invalid_records + self.usage.invalid_records + self.limits.invalid_records + self.settings_invalid
        )

    def status(self) -> dict[str, object]:
        return {
            "replicas": self.replicas,
            **self.names,
            "invalid_records": self.invalid_records,
            "usage_unsent": self.usage.unsent,
            "limit_conflicts": self.limits.conflicts,
        }


async def open_shared_state(bus: Bus, ring: KeyRing, controller_id: str) -> SharedState:
    """Check JetStream and open (create) the buckets and the stream; raises ``JetStreamUnavailable``."""
    jetstream = await open_jetstream(bus)
    prefix = bucket_prefix(bus.subjects.prefix)
    names = {
        "keys_bucket": f"{prefix}_keys",
        "usage_stream": f"{prefix}_USAGE",
        "usage_bucket": f"{prefix}_usage",
        "settings_bucket": f"{prefix}_settings",
        "limits_bucket": f"{prefix}_limits",
    }
    keys = await jetstream.bucket(names["keys_bucket"], history=8, description="mlxcluster API keys (digests only)")
    stream = await jetstream.stream(
        names["usage_stream"], [bus.subjects.usage_all], description="mlxcluster usage, one per request"
    )
    totals = await jetstream.bucket(names["usage_bucket"], description="mlxcluster usage per key and day")
    settings = await jetstream.bucket(names["settings_bucket"], description="mlxcluster worker settings")
    limits = await jetstream.bucket(
        names["limits_bucket"], description="mlxcluster rate-limit leases per key and minute", ttl_s=BUCKET_TTL_S
    )
    return SharedState(
        keys=KeyStore(keys, ring),
        usage=UsageLedger(stream, totals, bus.subjects, controller_id),
        limits=ClusterLimits(limits, controller_id),
        settings=settings,
        replicas=jetstream.replicas,
        names=names,
    )
