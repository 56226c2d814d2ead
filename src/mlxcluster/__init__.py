"""mlxcluster: a distributed LLM inference cluster (OpenAI API → NATS → mlx-lm workers).

Plugins import what they use from here or from :mod:`mlxcluster.api` (the same names): ``from mlxcluster.api
import hookimpl, Balancer, WorkerView``. Importing the package loads no aiohttp, NATS client or MLX.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlxcluster")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from mlxcluster.api import (  # noqa: E402  (after __version__, which nothing in the api needs)
    DEFAULT_MAX_ENTRIES,
    ELIGIBLE_STATES,
    MAX_INTER_TOKEN_SAMPLES,
    NO_MATCH,
    PROJECT_NAME,
    Balancer,
    BalancerContext,
    BalancerFactory,
    CacheAwareSection,
    CacheLookup,
    ChatMessage,
    ClusterSnapshot,
    Cursor,
    EligibleWorkers,
    Exporter,
    ExporterFactory,
    GroupInfo,
    InferenceRequest,
    LoadBalancingSection,
    LruMap,
    MetricsEvent,
    PrefixMatch,
    PromptCacheStats,
    Register,
    RequestFinished,
    RequestMigrated,
    RequestRetried,
    RequestStatus,
    WorkerState,
    WorkerStatusChanged,
    WorkerView,
    best,
    hookimpl,
    hookspec,
    least_utilized,
)

__all__ = [
    "__version__",
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
    "LruMap",
    "MetricsEvent",
    "PrefixMatch",
    "PromptCacheStats",
    "Register",
    "RequestFinished",
    "RequestMigrated",
    "RequestRetried",
    "RequestStatus",
    "WorkerState",
    "WorkerStatusChanged",
    "WorkerView",
    "best",
    "hookimpl",
    "hookspec",
    "least_utilized",
]
