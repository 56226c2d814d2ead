"""The bus's connection as events and counters.

nats-py reports a connection's changes through callbacks given to ``nats.connect``; :class:`ConnectionEvents`
turns them into :class:`BusEvent` values it hands to every listener added with :meth:`ConnectionEvents.add_listener`
(``connected``, ``disconnected``, ``reconnecting`` before each attempt, ``closed``), logs them, and counts what
nats-py does not (disconnections, messages dropped because a subscription could not keep up). Listeners are
plain functions called on the event loop, in the order the changes happened: the controller's state follows the
bus through one, instead of polling it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import nats.errors
from msgspec import Struct
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)

BusState = Literal["connected", "disconnected", "reconnecting", "closed"]
BUS_STATES: tuple[BusState, ...] = ("connected", "disconnected", "reconnecting", "closed")


class BusEvent(Struct, frozen=True, kw_only=True):
    """One change of the connection.

    ``connected``: the first connection, or a reconnection (``reconnects`` > 0); ``disconnected``: the connection
    dropped (nats-py reconnects unless the node is closing); ``reconnecting``: about to try a server again
    (``attempt`` counts the tries since the drop, ``delay_s`` is the wait before this one); ``closed``: the
    connection is closed for good (a deliberate close, or reconnection given up).
    """

    state: BusState
    time: float
    """Wall-clock time of the change (``time.time()``)."""
    server: str | None = None
    """``host:port`` of the server connected to (``connected``) or about to be tried (``reconnecting``)."""
    reconnects: int = 0
    """Reconnections since the node connected first."""
    attempt: int = 0
    delay_s: float = 0.0
    error: str | None = None
    """The last error nats-py reported before this change, if any."""


BusListener = Callable[[BusEvent], None]
ReconnectHandler = Callable[[list[Any], dict[str, Any]], tuple[Any, float]]


class ConnectionEvents:
    """The connection's state, its listeners and the counters nats-py does not keep, for one NATS client.

    :param name: the node's connection name, in log lines.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.state: BusState = "disconnected"
        self.since = time.time()
        self.disconnects = 0
        """Times an established connection dropped (a deliberate close not counted)."""
        self.slow_consumer_drops = 0
        """Messages nats-py dropped because a subscription's pending queue was full."""
        self.errors = 0
        """Errors nats-py reported (slow consumers included)."""
        self.last_error: str | None = None
        self.nc: NATS | None = None
        self._listeners: list[BusListener] = []
        self._attempt = 0

    # --- listeners ---------------------------------------------------------------------------------

    def add_listener(self, listener: BusListener) -> None:
        """Call ``listener(event)`` on every change from now on (on the event loop; it must not block)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: BusListener) -> None:
        """Stop calling ``listener`` (unknown listeners are ignored)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, state: BusState, **fields: Any) -> BusEvent:
        """Record ``state`` and tell every listener (a failing listener is logged, the others still hear it)."""
        reconnects = self.nc.stats["reconnects"] if self.nc is not None else 0
        event = BusEvent(state=state, time=time.time(), reconnects=reconnects, error=self.last_error, **fields)
        self.state, self.since = state, event.time
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("%s: a NATS connection listener failed on %s", self.name, state)
        return event

    # --- nats-py's callbacks -----------------------------------------------------------------------

    def connected(self, nc: NATS, server: str | None) -> None:
        """The first connection is up (called by ``Bus.connect``)."""
        self.nc = nc
        self._attempt = 0
        self.emit("connected", server=server)

    def callbacks(self) -> dict[str, Callable[..., Awaitable[None]]]:
        """``disconnected_cb``, ``reconnected_cb``, ``closed_cb`` and ``error_cb`` for ``nats.connect``."""
        return {
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "closed_cb": self._closed,
            "error_cb": self._error,
        }

    def announcing(self, choose: ReconnectHandler) -> ReconnectHandler:
        """``choose`` (nats-py's ``reconnect_to_server_handler``) that first says ``reconnecting``."""

        def handler(servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
            server, delay = choose(servers, info)
            self._attempt += 1
            uri = getattr(server, "uri", None)
            address = f"{uri.hostname}:{uri.port}" if uri is not None and uri.hostname else None
            self.emit("reconnecting", server=address, attempt=self._attempt, delay_s=round(delay, 3))
            return server, delay

        return handler

    @property
    def _closing(self) -> bool:
        return self.nc is not None and (self.nc.is_closed or self.nc.is_draining)

    async def _disconnected(self) -> None:
        if self._closing or self.state in ("disconnected", "closed"):
            log.debug("%s: disconnected from NATS", self.name)
            return
        log.warning("%s: disconnected from NATS", self.name)
        self.disconnects += 1
        self._attempt = 0
        self.emit("disconnected")

    async def _reconnected(self) -> None:
        log.info("%s: reconnected to NATS", self.name)
        self._attempt = 0
        self.emit("connected", server=_address(self.nc))  # names the error that broke the connection, then forgets it
        self.last_error = None

    async def _closed(self) -> None:
        log.info("%s: NATS connection closed", self.name)
        if self.state != "closed":
            self.emit("closed")

    async def _error(self, exc: Exception) -> None:
        self.errors += 1
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer_drops += 1
            if self.slow_consumer_drops & (self.slow_consumer_drops - 1) == 0:  # the 1st, 2nd, 4th, 8th... drop
                log.warning(
                    "%s: NATS slow consumer on %s: %d message(s) dropped so far",
                    self.name,
                    exc.subject,
                    self.slow_consumer_drops,
                )
            return
        self.last_error = str(exc) or type(exc).__name__
        log.warning("%s: NATS error: %s", self.name, self.last_error)


def _address(nc: NATS | None) -> str | None:
    url = nc.connected_url if nc is not None else None
    return f"{url.hostname}:{url.port}" if url is not None and url.hostname else None
