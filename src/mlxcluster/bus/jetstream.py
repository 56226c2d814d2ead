"""JetStream over the bus's connection: key-value buckets and one append-only stream, typed thinly.

The :class:`~mlxcluster.bus.client.Bus` stays the one holder of the NATS connection; this module is the only
one that speaks nats-py's JetStream API. :func:`open_jetstream` checks that the server runs JetStream (one
line saying what to do when it does not); buckets and streams get the replication factor the NATS cluster
allows (R3 on a cluster of three servers or more, fewer on a smaller one). :class:`Bucket` is a KV bucket
with compare-and-set on the entry's revision, watched into a callback; :class:`AppendStream` is a stream
appended to without waiting on each acknowledgement and read back in order; :class:`ObjectBucket` holds values
larger than one message (a request's images).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from mlxcluster.bus.client import Bus

log = logging.getLogger(__name__)

MAX_REPLICAS = 3
API_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 0.5
START_WAIT_S = 15.0
"""How long a start waits for JetStream to answer (a new NATS cluster elects its JetStream leader first)."""


class JetStreamUnavailable(Exception):
    """The NATS server does not run JetStream (or does not answer its API); the message says what to do."""


class KeyExists(Exception):
    """:meth:`Bucket.create` found the key already there."""


class RevisionChanged(Exception):
    """:meth:`Bucket.update` lost a compare-and-set: the entry changed since the revision given."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One KV entry: its key, value (``None``: deleted) and revision (the stream sequence that wrote it)."""

    key: str
    value: bytes | None
    revision: int


EntryHandler = Callable[[Entry], None]
T = TypeVar("T")


def clustered(bus: Bus) -> bool:
    """Whether the server the bus is connected to is part of a NATS cluster (its INFO names the cluster)."""
    info = getattr(bus.nc, "_server_info", None) or {}
    return bool(info.get("cluster"))


async def open_jetstream(bus: Bus, *, wait_s: float = START_WAIT_S) -> JetStream:
    """The bus's JetStream, checked: raises :class:`JetStreamUnavailable` at once when the server has none, and
    after ``wait_s`` when JetStream does not answer (a NATS cluster still electing its JetStream leader)."""
    js = bus.nc.jetstream(timeout=API_TIMEOUT_S)
    probe = bus.nc.jetstream(timeout=PROBE_TIMEOUT_S)  # a cluster without a leader yet leaves it unanswered
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await probe.account_info()
            break
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            if getattr(exc, "err_code", None) is not None:  # JetStream runs but is not ready (no leader yet)
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                    continue
                raise JetStreamUnavailable(f"JetStream on {bus.server_address} is not ready: {exc}") from None
            raise JetStreamUnavailable(
                f"the NATS server at {bus.server_address} does not run JetStream, which shared keys and usage "
                "need: start nats-server with -js (embedded: nats.embedded.jetstream = true), or run the "
                "controller with --no-shared-state (controller.shared_state = false)"
            ) from None
        except (nats.errors.Error, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise JetStreamUnavailable(
                    f"JetStream on {bus.server_address} did not answer within {wait_s:.0f}s: "
                    f"{exc or type(exc).__name__}"
                ) from None
            await asyncio.sleep(0.25)
    return JetStream(js, MAX_REPLICAS if clustered(bus) else 1)


class JetStream:
    """Opens (creating when missing) the buckets and streams of the cluster with one replication factor.

    On a NATS cluster a new bucket or stream is asked for with 3 replicas, then 2 where the cluster cannot
    place 3 (fewer servers with JetStream), then 1; what worked is used for the rest (:attr:`replicas`).
    A server outside any cluster gets 1. An existing bucket or stream keeps the replicas it was made with.
    """

    def __init__(self, js: JetStreamContext, replicas: int) -> None:
        self.js = js
        self.replicas = replicas

    async def _create(self, make: Callable[[int], Awaitable[T]], what: str) -> T:
        while True:
            try:
                made = await make(self.replicas)
            except nats.js.errors.APIError as exc:
                if self.replicas <= 1:
                    raise
                log.info("%s with %d replicas refused (%s); trying %d", what, self.replicas, exc, self.replicas - 1)
                self.replicas -= 1
                continue
            log.info("created %s (R%d)", what, self.replicas)
            return made

    async def bucket(self, name: str, *, history: int = 1, description: str = "", ttl_s: float | None = None) -> Bucket:
        """The KV bucket ``name``; created with :attr:`replicas` replicas if it does not exist (an existing one
        keeps the settings it was made with). ``ttl_s``: an entry not written again for that long is removed."""
        try:
            kv = await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:

            def config(replicas: int) -> api.KeyValueConfig:
                return api.KeyValueConfig(
                    bucket=name,
                    history=history,
                    replicas=replicas,
                    storage=api.StorageType.FILE,
                    description=description,
                    ttl=ttl_s,
                )

            kv = await self._create(lambda replicas: self.js.create_key_value(config(replicas)), f"KV bucket {name}")
        return Bucket(kv)

    async def objects(self, name: str, *, description: str = "", ttl_s: float | None = None) -> ObjectBucket:
        """The object store bucket ``name``; created if missing (an existing one keeps its settings). ``ttl_s``:
        an object older than that is removed."""
        try:
            store = await self.js.object_store(name)
        except nats.js.errors.BucketNotFoundError:

            def config(replicas: int) -> api.ObjectStoreConfig:
                return api.ObjectStoreConfig(
                    description=description, ttl=ttl_s, storage=api.StorageType.FILE, replicas=replicas
                )

            store = await self._create(
                lambda replicas: self.js.create_object_store(name, config(replicas)), f"object store {name}"
            )
        return ObjectBucket(store)

    async def stream(self, name: str, subjects: list[str], *, description: str = "") -> AppendStream:
        """The stream ``name`` over ``subjects``; created if missing (an existing one keeps its settings)."""
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:

            def config(replicas: int) -> api.StreamConfig:
                return api.StreamConfig(
                    name=name,
                    subjects=subjects,
                    description=description,
                    num_replicas=replicas,
                    storage=api.StorageType.FILE,
                    duplicate_window=120.0,
                )

            await self._create(lambda replicas: self.js.add_stream(config(replicas)), f"stream {name}")
        return AppendStream(self.js, name)


class ObjectBucket:
    """An object store bucket: values larger than one NATS message, sent in chunks by nats-py."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def put(self, name: str, data: bytes) -> None:
        await self.store.put(name, data)

    async def get(self, name: str) -> bytes | None:
        """The object ``name``'s bytes; ``None`` when there is none (never put, deleted or expired)."""
        try:
            result = await self.store.get(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            return None
        return bytes(result.data or b"")

    async def delete(self, name: str) -> None:
        """Remove the object ``name`` (nothing when it is gone already)."""
        with contextlib.suppress(nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            await self.store.delete(name)


class Bucket:
    """A KV bucket: get, create, put, compare-and-set update, and a watch of every change."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, key: str) -> Entry | None:
        """The entry at ``key``; ``None`` when there is none (or it was deleted)."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return Entry(key, entry.value, entry.revision or 0)

    async def create(self, key: str, value: bytes) -> int:
        """Write ``value`` only if ``key`` has none; its revision. Raises :class:`KeyExists`."""
        try:
            return await self.kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise KeyExists(key) from None

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Write ``value`` only if the entry is still at revision ``last``; the new revision.
        Raises :class:`RevisionChanged` when it moved on."""
        try:
            return await self.kv.update(key, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise RevisionChanged(key) from None

    async def put(self, key: str, value: bytes) -> int:
        """Write ``value`` whatever is there; the new revision."""
        return await self.kv.put(key, value)

    async def entries(self, pattern: str) -> list[Entry]:
        """Every entry whose key matches ``pattern`` (NATS wildcards), read once (deleted ones left out)."""
        watcher = await self.kv.watch(pattern, ignore_deletes=True)
        found: list[Entry] = []
        try:
            while (update := await watcher.updates(timeout=API_TIMEOUT_S)) is not None:  # type: ignore[no-untyped-call]
                found.append(Entry(update.key, update.value or b"", update.revision or 0))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        return found

    async def watch(self, on_entry: EntryHandler, ready: asyncio.Event) -> None:
        """Call ``on_entry`` for every entry now in the bucket, set ``ready``, then for every change, until
        cancelled. A failing handler is logged, never ends the watch."""
        watcher = await self.kv.watchall()
        try:
            async for update in watcher:
                if update is None:  # the bucket's current contents have all been delivered
                    ready.set()
                    continue
                deleted = update.operation in ("DEL", "PURGE")
                entry = Entry(update.key, None if deleted else (update.value or b""), update.revision or 0)
                try:
                    on_entry(entry)
                except Exception:
                    log.exception("KV watch handler failed on %s", update.key)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One message read back from an :class:`AppendStream`."""

    seq: int
    subject: str
    data: bytes


class AppendStream:
    """An append-only stream: publishes pipelined (acknowledgements awaited together), read back in order."""

    def __init__(self, js: JetStreamContext, name: str) -> None:
        self.js = js
        self.name = name

    async def append(self, subject: str, data: bytes, *, msg_id: str) -> asyncio.Future[api.PubAck]:
        """Send one message; the future settles with the server's acknowledgement. ``msg_id`` makes a resend
        of the same message (after a lost acknowledgement) a duplicate the server drops."""
        return await self.js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id}, stream=self.name)

    async def last_seq(self) -> int:
        """The sequence of the newest message (0: empty)."""
        info = await self.js.stream_info(self.name)
        return int(info.state.last_seq or 0)

    async def follow(
        self, subject: str, start_seq: int, on_message: Callable[[StreamMessage], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """Deliver every message on ``subject`` (wildcards allowed) from ``start_seq`` on, in order, to
        ``on_message`` (an ordered consumer: it resumes by itself after a reconnect); the returned coroutine
        function stops it."""

        async def deliver(msg: Msg) -> None:
            await on_message(StreamMessage(msg.metadata.sequence.stream, msg.subject, msg.data))

        subscription = await self.js.subscribe(
            subject,
            stream=self.name,
            cb=deliver,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=max(1, start_seq)),
            manual_ack=True,
        )

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

        return stop
