"""The bus: the one NATS connection of a node (:mod:`.client`), the request streams over it (:mod:`.streams`), its
connection events and counters (:mod:`.telemetry`) and its errors (:mod:`.errors`)."""

from mlxcluster.bus.client import (
    MAX_CONNECT_BACKOFF_S,
    Bus,
    Handler,
    backoff_delay,
    connect_options,
    headers_size,
    reconnect_backoff,
    tls_context,
)
from mlxcluster.bus.errors import BusConnectionError, BusError, BusNoRespondersError, BusTimeoutError
from mlxcluster.bus.streams import ReplyStream, ReplyWriter, Signal, StreamInbox, WorkerFrame
from mlxcluster.bus.telemetry import BUS_STATES, BusEvent, BusListener, BusState, ConnectionEvents

__all__ = [
    "BUS_STATES",
    "MAX_CONNECT_BACKOFF_S",
    "Bus",
    "BusConnectionError",
    "BusError",
    "BusEvent",
    "BusListener",
    "BusNoRespondersError",
    "BusState",
    "BusTimeoutError",
    "ConnectionEvents",
    "Handler",
    "ReplyStream",
    "ReplyWriter",
    "Signal",
    "StreamInbox",
    "WorkerFrame",
    "backoff_delay",
    "connect_options",
    "headers_size",
    "reconnect_backoff",
    "tls_context",
]
