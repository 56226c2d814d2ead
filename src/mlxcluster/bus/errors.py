"""What the bus raises: :class:`BusError` and one subclass per cause, so callers tell them apart by type.

``except BusError`` still catches every one of them.
"""

from __future__ import annotations


class BusError(Exception):
    """The bus could not do what was asked (connect, request) and says why."""


class BusConnectionError(BusError):
    """No connection to NATS: the server could not be reached, or the connection was closed or lost."""


class BusTimeoutError(BusError):
    """Nobody answered a request within its timeout (someone listens on the subject but did not reply)."""


class BusNoRespondersError(BusError):
    """Nobody listens on the subject a request went to (NATS said "no responders" at once)."""
