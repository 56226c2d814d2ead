"""The message bus: a NATS connection with typed publish/subscribe/request helpers.

The :class:`Bus` is the only holder of the NATS connection: every other module publishes, subscribes,
flushes and probes through it (request streams: :mod:`mlxcluster.bus.streams`).

``Bus.connect`` keeps trying until the server answers (with backoff) and, once connected, reconnects
forever by default; the connection's changes reach listeners as events (:attr:`Bus.events`,
:mod:`mlxcluster.bus.telemetry`) and :meth:`Bus.counters` has its traffic. Failures raise a subclass of
:class:`BusError` that names the cause (:mod:`mlxcluster.bus.errors`). Incoming messages are decoded into
msgspec Structs; a message that does not decode is logged, counted in :attr:`Bus.invalid_messages` and dropped,
never raised into a handler.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from msgspec import Struct
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mlxcluster.bus.errors import BusConnectionError, BusError, BusNoRespondersError, BusTimeoutError
from mlxcluster.bus.telemetry import ConnectionEvents
from mlxcluster.config import NatsSection, redact_url
from mlxcluster.protocol import ProtocolError, decode, encode
from mlxcluster.subjects import Subjects

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Struct)
Handler = Callable[[T, Msg], Awaitable[None]]

MAX_CONNECT_BACKOFF_S = 5.0


def connect_options(config: NatsSection, *, name: str) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` from the ``[nats]`` section."""
    options: dict[str, Any] = {
        "servers": [url.strip() for url in config.url.split(",") if url.strip()],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": config.max_reconnect_attempts,
        "reconnect_time_wait": config.reconnect_time_wait_ms / 1000,
        "connect_timeout": config.connect_timeout_ms / 1000,
        "dont_randomize": not config.randomize_servers,
        "ping_interval": 10,
        "max_outstanding_pings": 3,
    }
    options["reconnect_to_server_handler"] = reconnect_backoff(
        config.reconnect_time_wait_ms / 1000, max(config.reconnect_time_wait_ms, config.reconnect_max_wait_ms) / 1000
    )
    if config.user is not None:
        options["user"] = config.user
        options["password"] = config.password or ""
    if config.token is not None:
        options["token"] = config.token
    if config.creds is not None:
        options["user_credentials"] = config.creds
    if config.tls.enabled:
        options["tls"] = tls_context(config)
    return options


def backoff_delay(failures: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with jitter: ``min(cap, base * 2**failures)`` scaled by 0.5..1.0, so
    reconnecting nodes spread out instead of hitting a restarted server all at once."""
    ceiling = min(cap_s, base_s * 2.0 ** min(failures, 30))
    draw = rng.random() if rng is not None else random.random()
    return ceiling * (0.5 + 0.5 * draw)


def reconnect_backoff(base_s: float, cap_s: float) -> Callable[[list[Any], dict[str, Any]], tuple[Any, float]]:
    """nats-py's ``reconnect_to_server_handler``: the server tried least (first in pool order among equals),
    after :func:`backoff_delay` of its failed attempts so far."""

    def choose(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        server = min(servers, key=lambda s: s.reconnects)
        return server, backoff_delay(server.reconnects, base_s, cap_s)

    return choose


def tls_context(config: NatsSection) -> ssl.SSLContext:
    """A client TLS context from ``[nats.tls]``."""
    context = ssl.create_default_context(cafile=config.tls.ca_file)
    if config.tls.cert_file:
        context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    if not config.tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def headers_size(headers: dict[str, str] | None) -> int:
    """Bytes of ``headers`` as nats-py encodes them (``NATS/1.0\\r\\n``, ``key: value\\r\\n`` each, ``\\r\\n``)."""
    if not headers:
        return 0
    lines = sum(len(k.strip().encode()) + len(v.strip().encode()) + 4 for k, v in headers.items())
    return len(b"NATS/1.0\r\n") + lines + 2


class Bus:
    """A connected NATS client plus the cluster's subjects and typed helpers."""

    def __init__(self, nc: NATS, subjects: Subjects, events: ConnectionEvents | None = None) -> None:
        self.nc = nc
        self.subjects = subjects
        self.invalid_messages: Counter[str] = Counter()
        self.events = events if events is not None else ConnectionEvents("bus")
        """The connection's state changes, for listeners (:meth:`ConnectionEvents.add_listener`); only a bus made by
        :meth:`connect` hears them (its callbacks were given to nats-py)."""
        if self.events.nc is None:
            self.events.nc = nc

    @classmethod
    async def connect(
        cls,
        config: NatsSection,
        *,
        name: str,
        attempts: int | None = None,
    ) -> Bus:
        """Connect, retrying with backoff until the server answers.

        :param attempts: give up after this many failed initial attempts (``None``: follow
            ``max_reconnect_attempts``, where ``-1`` means forever).
        """
        limit = attempts if attempts is not None else config.max_reconnect_attempts
        options = connect_options(config, name=name)
        events = ConnectionEvents(name)
        options.update(events.callbacks())
        options["reconnect_to_server_handler"] = events.announcing(options["reconnect_to_server_handler"])
        # nats-py retries a failed first connect by itself (forever when max_reconnect_attempts is -1, even
        # on an auth error), so each attempt here allows one retry per server; the configured policy is
        # restored once connected.
        options["max_reconnect_attempts"] = 1
        tried = 0
        while True:
            try:
                nc = await nats.connect(**options)
                nc.options["max_reconnect_attempts"] = config.max_reconnect_attempts
                break
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                tried += 1
                if 0 <= limit <= tried:
                    url = redact_url(config.url)
                    raise BusConnectionError(f"cannot connect to NATS at {url}: {exc or type(exc).__name__}") from None
                delay = backoff_delay(tried - 1, 0.1, MAX_CONNECT_BACKOFF_S)
                log.warning("NATS not reachable at %s (%s); retrying in %.1fs", redact_url(config.url), exc, delay)
                await asyncio.sleep(delay)
        bus = cls(nc, Subjects(config.subject_prefix), events)
        log.info("connected to NATS %s as %s", bus.server_address or redact_url(config.url), name)
        events.connected(nc, bus.server_address)
        return bus

    @property
    def max_payload(self) -> int:
        """Largest message the server accepts, in bytes (as the server announced it)."""
        return self.nc.max_payload

    @property
    def server_address(self) -> str | None:
        """``host:port`` of the server connected to (never the URL's credentials), ``None`` when not connected."""
        url = self.nc.connected_url
        return f"{url.hostname}:{url.port}" if url is not None and url.hostname else None

    @property
    def is_connected(self) -> bool:
        return self.nc.is_connected

    def counters(self) -> dict[str, int]:
        """The connection's figures since the node connected: ``connected`` (1 or 0), ``reconnects``,
        ``disconnects``, messages and bytes in and out, ``slow_consumer_drops`` (messages dropped because a
        subscription could not keep up), ``errors`` (what nats-py reported) and ``invalid_messages``."""
        stats = self.nc.stats
        return {
            "connected": int(self.nc.is_connected),
            "reconnects": stats["reconnects"],
            "disconnects": self.events.disconnects,
            "in_msgs": stats["in_msgs"],
            "out_msgs": stats["out_msgs"],
            "in_bytes": stats["in_bytes"],
            "out_bytes": stats["out_bytes"],
            "slow_consumer_drops": self.events.slow_consumer_drops,
            "errors": self.events.errors,
            "invalid_messages": self.invalid_messages_total,
        }

    @property
    def epoch(self) -> int:
        """Changes whenever the connection drops or comes back: a failure seen across a change of epoch
        may be the bus's fault rather than the peer's."""
        return self.nc.stats["reconnects"] * 2 + (0 if self.nc.is_connected else 1)

    async def publish(self, subject: str, message: Struct, *, reply: str = "") -> None:
        """Encode and publish one message."""
        await self.nc.publish(subject, encode(message), reply=reply)

    async def publish_encoded(
        self, subject: str, payload: bytes, *, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Publish bytes already encoded (a request sized once by the dispatcher, an empty probe answer)."""
        await self.nc.publish(subject, payload, reply=reply, headers=headers)

    async def flush(self, timeout: int = 10) -> None:
        """Wait until the server has seen everything sent so far (subscriptions included)."""
        await self.nc.flush(timeout=timeout)

    async def probe(self, subject: str, *, headers: dict[str, str], timeout: float) -> dict[str, str] | None:
        """An empty request with ``headers``: the answer's headers (``{}`` without any); ``None`` when nobody
        listens on ``subject``. Raises :class:`BusTimeoutError` when nobody answered in time,
        :class:`BusConnectionError` when the bus failed."""
        try:
            answer = await self.nc.request(subject, b"", timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            return None
        except nats.errors.TimeoutError:
            raise BusTimeoutError(f"no answer on {subject} within {timeout:.3g}s") from None
        except (nats.errors.Error, OSError) as exc:
            raise BusConnectionError(f"no answer on {subject}: {exc or type(exc).__name__}") from None
        return dict(answer.headers or {})

    async def subscribe_raw(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], *, unbounded: bool = False
    ) -> Subscription:
        """Subscribe with a handler of raw messages (the stream inbox decodes frames itself).

        :param unbounded: no limit on the bytes pending for the handler (a busy inbox must not drop frames).
        """
        if unbounded:
            return await self.nc.subscribe(subject, cb=handler, pending_bytes_limit=-1)
        return await self.nc.subscribe(subject, cb=handler)

    async def subscribe(
        self,
        subject: str,
        message_type: type[T] | Any,
        handler: Callable[[Any, Msg], Awaitable[None]],
        *,
        queue: str = "",
    ) -> Subscription:
        """Subscribe and call ``handler(decoded, msg)``; undecodable messages are dropped and counted.

        :param queue: a queue group name, so each message goes to one member of the group.
        """

        async def on_message(msg: Msg) -> None:
            try:
                decoded = decode(msg.data, message_type)
            except ProtocolError as exc:
                self.invalid_messages[msg.subject] += 1
                log.warning("dropped invalid message on %s: %s", msg.subject, exc)
                return
            try:
                await handler(decoded, msg)
            except Exception:
                log.exception("handler for %s failed", msg.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_message)

    async def request(
        self,
        subject: str,
        message: Struct,
        response_type: type[T],
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> T:
        """Send one request (with message ``headers``: a trace context) and decode the single reply.

        :raises BusNoRespondersError: nobody listens on ``subject``.
        :raises BusTimeoutError: no reply within ``timeout``.
        :raises BusConnectionError: the connection is closed or failed.
        :raises BusError: the reply did not decode.
        """
        try:
            msg = await self.nc.request(subject, encode(message), timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise BusNoRespondersError(f"no responders on {subject}") from None
        except nats.errors.TimeoutError:
            raise BusTimeoutError(f"no reply on {subject} within {timeout:.3g}s") from None
        except (nats.errors.Error, OSError) as exc:
            raise BusConnectionError(f"request on {subject} failed: {exc or type(exc).__name__}") from None
        try:
            return decode(msg.data, response_type)
        except ProtocolError as exc:
            self.invalid_messages[subject] += 1
            raise BusError(str(exc)) from None

    @property
    def invalid_messages_total(self) -> int:
        return sum(self.invalid_messages.values())

    async def close(self, *, drain: bool = True) -> None:
        """Drain (let pending messages through, then close) or close at once."""
        if self.nc.is_closed:
            return
        try:
            if drain and self.nc.is_connected:
                await self.nc.drain()
            else:
                await self.nc.close()
        except Exception as exc:  # drain on a broken connection can fail; closing is what matters
            log.debug("closing NATS connection: %s", exc)
            await self.nc.close()
