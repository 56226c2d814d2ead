"""What the shared state holds, as msgspec Structs: key records, usage records and per-day usage totals.

Where they live (``P`` is ``nats.subject_prefix`` with dots as underscores, ``p`` the prefix itself):

- ``P_keys`` (KV bucket): one :class:`KeyRecord` per key at ``key.<token(name)>``. The record carries the
  key's limits (``rpm``, ``tpm``, ``max_concurrent``).
- ``P_limits`` (KV bucket, entries expire after a few minutes): per key, ``<token(name)>.w<minute>`` →
  :class:`WindowLeases` (what all controllers leased of that minute's budget) and ``<token(name)>.slots`` →
  :class:`SlotLeases` (the ``max_concurrent`` slots each controller holds, each with an expiry); see
  ``controller/shared/limits.py``.
- ``P_USAGE`` (stream, subjects ``p.usage.<token(name)>``): one :class:`UsageRecord` per finished request.
- ``P_settings`` (KV bucket): one ``protocol.WorkerSettingsChanged`` per worker at ``worker.<token(id)>``
  (drain, priority, tags; ``forget`` once forgotten).
- ``P_usage`` (KV bucket): one :class:`DayTotals` per key and UTC day at ``<token(name)>.<YYYY-MM-DD>``, folded
  from the stream, and ``_folded``, the stream sequence every message up to which is in the totals.

Every field added later must have a default, so controllers of mixed versions read each other's records.
"""

from __future__ import annotations

import re
import time
from typing import Literal

import msgspec
from msgspec import Struct

KeySource = Literal["api", "config"]
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def token(name: str) -> str:
    """``name`` as one KV-key / subject token: letters, digits, ``_`` and ``-`` as they are, anything else as
    ``=XX`` (its UTF-8 bytes in hex), so every key name maps to one token and back."""
    return _UNSAFE.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), name)


def bucket_prefix(subject_prefix: str) -> str:
    """The prefix of bucket and stream names for ``nats.subject_prefix`` (bucket names allow no dots)."""
    return subject_prefix.replace(".", "_")


class KeyRecord(Struct, kw_only=True, omit_defaults=True):
    """One API key as the bucket holds it: never its value, only the SHA-256 of it."""

    name: str
    sha256: str
    """Hex SHA-256 of the key value."""
    models: list[str] = []
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    admin: bool = False
    expires_at: float | None = None
    """Unix time after which the key is refused (``None``: never)."""
    created_at: float = 0.0
    updated_at: float = 0.0
    revoked_at: float | None = None
    source: KeySource = "api"
    """``config``: seeded from a controller's config file (changed there, not through the API)."""
    generation: int = 1
    """1 when created, one more at each rotation."""

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (time.time() if now is None else now)


class UsageRecord(Struct, kw_only=True, omit_defaults=True):
    """One finished request, as appended to the usage stream."""

    request_id: str
    key: str
    model: str
    status: str
    """``ok`` (answered in full), ``error`` or ``cancelled``."""
    time: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    controller: str = ""


class Totals(Struct, kw_only=True):
    """Counts over some requests: ``requests`` are the ones answered in full (status ``ok``)."""

    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, record: UsageRecord) -> None:
        self.requests += record.status == "ok"
        self.errors += record.status == "error"
        self.cancelled += record.status == "cancelled"
        self.prompt_tokens += record.prompt_tokens
        self.cached_tokens += record.cached_tokens
        self.completion_tokens += record.completion_tokens

    def merge(self, other: Totals) -> None:
        for name in self.__struct_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class DayTotals(Struct, kw_only=True):
    """One key's usage on one UTC day, in all and per model."""

    key: str
    day: str
    through_seq: int = 0
    """The newest usage-stream sequence folded in: a message at or below it is already counted."""
    total: Totals = msgspec.field(default_factory=Totals)
    models: dict[str, Totals] = msgspec.field(default_factory=dict)


class Folded(Struct, kw_only=True):
    """The usage bucket's ``_folded`` entry: every stream message up to ``seq`` is in the day totals."""

    seq: int = 0


def utc_day(when: float) -> str:
    """``YYYY-MM-DD`` of the UTC day of unix time ``when``."""
    return time.strftime("%Y-%m-%d", time.gmtime(when))


class WindowLeases(Struct, kw_only=True, omit_defaults=True):
    """What all controllers together leased of one key's budget for one fixed minute."""

    requests: int = 0
    tokens: int = 0


class Slot(Struct, kw_only=True):
    """The ``max_concurrent`` slots one controller holds, until ``until`` (unix time) unless it renews them."""

    held: int
    until: float


class SlotLeases(Struct, kw_only=True, omit_defaults=True):
    """One key's running-request slots, by controller id."""

    slots: dict[str, Slot] = {}

    def live(self, now: float) -> int:
        """Slots held by every controller whose lease has not lapsed."""
        return sum(slot.held for slot in self.slots.values() if slot.until > now)


encoder = msgspec.json.Encoder()
key_record_decoder = msgspec.json.Decoder(KeyRecord)
usage_decoder = msgspec.json.Decoder(UsageRecord)
day_decoder = msgspec.json.Decoder(DayTotals)
folded_decoder = msgspec.json.Decoder(Folded)
window_decoder = msgspec.json.Decoder(WindowLeases)
slots_decoder = msgspec.json.Decoder(SlotLeases)
