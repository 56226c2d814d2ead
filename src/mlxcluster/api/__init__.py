"""Everything a plugin author uses, in one import: ``from mlxcluster.api import hookimpl, Balancer, ...``.

- :mod:`~mlxcluster.api.hooks`: :data:`hookimpl`, the hook specs and the ``register`` callback they receive;
- :mod:`~mlxcluster.api.balancer`: :class:`WorkerView`, :class:`Balancer`, :class:`BalancerContext` and
  :class:`PrefixMatch` (what a load-balancing strategy receives and returns);
- :mod:`~mlxcluster.api.exporter`: the metrics events, :class:`ClusterSnapshot` and :class:`Exporter`;
- :mod:`~mlxcluster.api.helpers`: what the built-in balancers share (round-robin ties, least utilized, a
  bounded LRU);
- the request a balancer sees (:class:`InferenceRequest`, from :mod:`mlxcluster.protocol`) and the settings a
  :class:`BalancerContext` carries (from :mod:`mlxcluster.config`).

A leaf: it imports only the standard library, msgspec, pluggy and mlxcluster's own leaf modules (``protocol``,
``config``, ``prefix_digest``), never the controller, the worker or the built-ins, so plugins and
``mlxcluster balancers list`` load it cheaply. The same names are re-exported from ``mlxcluster``.
"""

from __future__ import annotations

from mlxcluster.api.balancer import (
    ELIGIBLE_STATES,
    NO_MATCH,
    Balancer,
    BalancerContext,
    BalancerFactory,
    CacheLookup,
    EligibleWorkers,
    LoadBuckets,
    PrefixMatch,
    WorkerState,
    WorkerView,
)
from mlxcluster.api.exporter import (
    MAX_INTER_TOKEN_SAMPLES,
    ClusterSnapshot,
    Exporter,
    ExporterFactory,
    MetricsEvent,
    RequestFinished,
    RequestMigrated,
    RequestRetried,
    RequestStatus,
    WorkerStatusChanged,
)
from mlxcluster.api.helpers import DEFAULT_MAX_ENTRIES, Cursor, LruMap, best, least_utilized
from mlxcluster.api.hooks import PROJECT_NAME, Register, hookimpl, hookspec
from mlxcluster.config import CacheAwareSection, LoadBalancingSection
from mlxcluster.protocol import (
    AcceleratorStats,
    ChatMessage,
    GroupInfo,
    InferenceRequest,
    PromptCacheStats,
    SpeculationCounts,
)

__all__ = [
    "AcceleratorStats",
    "DEFAULT_MAX_ENTRIES",
    "ELIGIBLE_STATES",
    "MAX_INTER_TOKEN_SAMPLES",
    "NO_MATCH",
    "PROJECT_NAME",
    "Balancer",
    "BalancerContext",
    "BalancerFactory",
    "CacheAwareSection",
    "CacheLookup",
    "ChatMessage",
    "ClusterSnapshot",
    "Cursor",
    "EligibleWorkers",
    "Exporter",
    "ExporterFactory",
    "GroupInfo",
    "InferenceRequest",
    "LoadBalancingSection",
    "LoadBuckets",
    "LruMap",
    "MetricsEvent",
    "PrefixMatch",
    "PromptCacheStats",
    "Register",
    "RequestFinished",
    "RequestMigrated",
    "RequestRetried",
    "RequestStatus",
    "SpeculationCounts",
    "WorkerState",
    "WorkerStatusChanged",
    "WorkerView",
    "best",
    "hookimpl",
    "hookspec",
    "least_utilized",
]
