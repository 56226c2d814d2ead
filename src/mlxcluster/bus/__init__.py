"""The bus: the one NATS connection of a node (:mod:`.client`) and the request streams over it (:mod:`.streams`)."""

from mlxcluster.bus.client import (
    MAX_CONNECT_BACKOFF_S,
    Bus,
    BusError,
    Handler,
    backoff_delay,
    connect_options,
    reconnect_backoff,
    tls_context,
)
from mlxcluster.bus.streams import ReplyStream, ReplyWriter, Signal, StreamInbox, WorkerFrame

__all__ = [
    "MAX_CONNECT_BACKOFF_S",
    "Bus",
    "BusError",
    "Handler",
    "ReplyStream",
    "ReplyWriter",
    "Signal",
    "StreamInbox",
    "WorkerFrame",
    "backoff_delay",
    "connect_options",
    "reconnect_backoff",
    "tls_context",
]
