"""API keys at runtime: create, revoke, rotate and change keys in the shared KV bucket; follow it into the ring.

Every change is a compare-and-set on the record's revision (read, change, ``update(last=revision)``, again on a
lost race), so two controllers changing one key never lose either change. Every controller's
:class:`~mlxcluster.controller.metering.keys.KeyRing` follows the bucket through a KV watch, so a change made on
one is in force on all within the watch's delivery time (milliseconds). A record that does not decode is
dropped, logged and counted in :attr:`KeyStore.invalid_records`.

The bucket holds digests only: a new key's value is made here, answered once, and never stored.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

import msgspec

from mlxcluster.bus.jetstream import Bucket, Entry, KeyExists, RevisionChanged
from mlxcluster.controller.metering.keys import ApiKey, KeyRing, key_digest
from mlxcluster.controller.shared.records import KeyRecord, encoder, key_record_decoder, token

log = logging.getLogger(__name__)

KEY_PREFIX = "key."
CAS_ATTEMPTS = 8
SECRET_PREFIX = "sk-mlx-"


class KeyNotFound(Exception):
    """No key of that name."""


class KeyConflict(Exception):
    """The change is not possible (a name taken, a config key changed through the API); the message says why."""


def new_secret() -> str:
    """A fresh key value: ``sk-mlx-`` and 32 random bytes, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def api_key(record: KeyRecord, revision: int) -> ApiKey:
    """The ring's view of a bucket record."""
    return ApiKey(
        name=record.name,
        digest=bytes.fromhex(record.sha256),
        rpm=record.rpm,
        tpm=record.tpm,
        max_concurrent=record.max_concurrent,
        models=frozenset(record.models),
        admin=record.admin,
        expires_at=record.expires_at,
        revoked=record.revoked,
        source=record.source,
        created_at=record.created_at or None,
        revision=revision,
    )


def config_record(key: ApiKey, now: float) -> KeyRecord:
    """The bucket record of a key from a config file."""
    return KeyRecord(
        name=key.name,
        sha256=key.digest.hex(),
        models=sorted(key.models),
        rpm=key.rpm,
        tpm=key.tpm,
        max_concurrent=key.max_concurrent,
        admin=key.admin,
        created_at=now,
        updated_at=now,
        source="config",
    )


class KeyStore:
    """The keys bucket, and the ring that follows it."""

    def __init__(self, bucket: Bucket, ring: KeyRing) -> None:
        self.bucket = bucket
        self.ring = ring
        self.invalid_records = 0
        self.ready = asyncio.Event()

    @staticmethod
    def entry_key(name: str) -> str:
        return KEY_PREFIX + token(name)

    def on_entry(self, entry: Entry) -> None:
        """Apply one bucket change to the ring (the watch's callback)."""
        if not entry.key.startswith(KEY_PREFIX):
            return
        if entry.value is None:
            log.warning("key entry %s was deleted from the bucket", entry.key)
            return
        try:
            record = key_record_decoder.decode(entry.value)
            key = api_key(record, entry.revision)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self.invalid_records += 1
            log.warning("dropped a malformed key record at %s (revision %d): %s", entry.key, entry.revision, exc)
            return
        self.ring.apply(key)

    async def follow(self) -> None:
        """Watch the bucket into the ring until cancelled (:attr:`ready` once the current keys are in)."""
        await self.bucket.watch(self.on_entry, self.ready)

    async def seed(self, keys: list[ApiKey]) -> None:
        """Write this controller's config keys into the bucket (marked ``config``) where they are not there as
        they are; a name the API created is left alone (the config key still works on this controller). The
        records reserve the names and say where a key came from; each controller honours only its own file's
        keys (:meth:`KeyRing.apply`)."""
        for key in keys:
            now = time.time()
            record = config_record(key, now)
            for _ in range(CAS_ATTEMPTS):
                entry = await self.bucket.get(self.entry_key(key.name))
                if entry is None or entry.value is None:
                    try:
                        await self.bucket.create(self.entry_key(key.name), encoder.encode(record))
                    except KeyExists:
                        continue
                    break
                held = _decode(entry)
                if held is not None and held.source == "api":
                    log.warning("config key %r has the name of a key created through the API; kept apart", key.name)
                    break
                if held is not None and _same_key(held, record):
                    break
                if held is not None:
                    record.created_at = held.created_at or now
                try:
                    await self.bucket.update(self.entry_key(key.name), encoder.encode(record), entry.revision)
                except RevisionChanged:
                    continue
                break

    async def create(self, record: KeyRecord) -> tuple[KeyRecord, str, int]:
        """Store a new key made from ``record`` (its ``sha256`` is replaced); the record, the key value (to be
        shown once) and the revision. Raises :class:`KeyConflict` for a name taken (a revoked key's too)."""
        if record.name in self.ring.config_names():
            raise KeyConflict(f"a key named {record.name!r} exists (in the config file)")
        secret = new_secret()
        now = time.time()
        record.sha256 = key_digest(secret).hex()
        record.created_at = record.updated_at = now
        record.source = "api"
        try:
            revision = await self.bucket.create(self.entry_key(record.name), encoder.encode(record))
        except KeyExists:
            raise KeyConflict(f"a key named {record.name!r} exists") from None
        self.ring.apply(api_key(record, revision))
        return record, secret, revision

    async def change(self, name: str, edit: Callable[[KeyRecord], None]) -> tuple[KeyRecord, int]:
        """Apply ``edit`` to the stored record of ``name`` with compare-and-set (retried on a lost race)."""
        if name in self.ring.config_names():
            raise KeyConflict(f"the key {name!r} comes from the config file: change it there")
        for _ in range(CAS_ATTEMPTS):
            entry = await self.bucket.get(self.entry_key(name))
            record = _decode(entry) if entry is not None else None
            if entry is None or record is None:
                raise KeyNotFound(name)
            if record.source == "config":
                raise KeyConflict(f"the key {name!r} comes from a config file: change it there")
            edit(record)
            record.updated_at = time.time()
            try:
                revision = await self.bucket.update(entry.key, encoder.encode(record), entry.revision)
            except RevisionChanged:
                continue
            self.ring.apply(api_key(record, revision))
            return record, revision
        raise KeyConflict(f"the key {name!r} kept changing; try again")

    async def revoke(self, name: str) -> KeyRecord:
        """Refuse the key from now on (its record and usage stay; the name stays taken)."""

        def edit(record: KeyRecord) -> None:
            if record.revoked_at is None:
                record.revoked_at = time.time()

        return (await self.change(name, edit))[0]

    async def rotate(self, name: str) -> tuple[KeyRecord, str]:
        """Give the key a new value (the old one is refused from now on); the record and the new value."""
        secret = new_secret()

        def edit(record: KeyRecord) -> None:
            if record.revoked_at is not None:
                raise KeyConflict(f"the key {name!r} is revoked")
            record.sha256 = key_digest(secret).hex()
            record.generation += 1

        record, _ = await self.change(name, edit)
        return record, secret


def _decode(entry: Entry) -> KeyRecord | None:
    if entry.value is None:
        return None
    try:
        return key_record_decoder.decode(entry.value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _same_key(a: KeyRecord, b: KeyRecord) -> bool:
    """Whether two records describe the same key with the same limits (times aside)."""
    fields = ("sha256", "models", "rpm", "tpm", "max_concurrent", "admin", "expires_at", "revoked_at", "source")
    return all(getattr(a, f) == getattr(b, f) for f in fields)
