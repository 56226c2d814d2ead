"""Rate limits that hold across controllers: each controller leases slices of a key's budget from a KV bucket.

A key's ``rpm`` and ``tpm`` are budgets of fixed minutes (``floor(unix time / 60)``, the same on every
controller): the entry ``<token>.w<minute>`` of the ``P_limits`` bucket holds what all controllers together
leased of that minute (:class:`~mlxcluster.controller.shared.records.WindowLeases`). A controller leases a
slice (at most 1/16 of the budget, at least what the request needs) with compare-and-set on the entry's
revision, retried on a lost race, and spends it locally: a request that fits what this controller holds does
no I/O. When the minute's budget is all leased the request is refused (429), and so is every later one of
that key on this controller for the next second with no I/O either (then one read sees whether a peer gave
some back); so across the cluster at most ``rpm`` requests start in a minute. What a controller leased but
did not spend it gives back once the key has been idle there for :data:`IDLE_RETURN_S` (so a key's traffic
moving to another controller finds the budget), and the rest lapses with the minute.

``tpm`` is charged as on one controller: a request's ``max_tokens`` when it starts (given back when it ends),
its actual prompt + completion tokens when it finishes. A controller that spent more than it leased (a
request used more than it reserved) covers that first at its next lease, so a minute's tokens overshoot
``tpm`` by at most the excess of the requests running when it ran out, as on one controller.

``max_concurrent`` slots are leased one at a time in ``<token>.slots``
(:class:`~mlxcluster.controller.shared.records.SlotLeases`): a slot is taken when a request needs one this
controller does not hold, and given back (off the response path) when a request ends and no other took it.
Each controller's slots carry an expiry that it renews every few seconds while it holds any; a controller
that dies leaks its slots only until they lapse (:data:`SLOT_TTL_S`).

A malformed entry is dropped (overwritten by a fresh one), logged and counted in :attr:`ClusterLimits.invalid_records`.
JetStream not answering refuses the request with 503 ``shared_state_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import nats.errors

from mlxcluster.bus.jetstream import Bucket, Entry, KeyExists, RevisionChanged
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.metering.keys import ApiKey
from mlxcluster.controller.metering.ratelimit import RateLimited, format_reset
from mlxcluster.controller.shared.records import (
    Slot,
    SlotLeases,
    WindowLeases,
    encoder,
    slots_decoder,
    token,
    window_decoder,
)

log = logging.getLogger(__name__)

WINDOW_S = 60
SLICE_DIVISOR = 16
"""A lease is at most 1/16 of a minute's budget (and at least 1, or what the request needs)."""
SLOT_TTL_S = 15.0
"""A controller's ``max_concurrent`` slots lapse this long after it last renewed them."""
BUCKET_TTL_S = 300.0
"""Entries of the limits bucket not written for this long are removed by the server."""
CAS_ATTEMPTS = 32
FULL_RECHECK_S = 1.0
"""A minute found all leased is refused with no I/O for this long, then read again (leases given back)."""
IDLE_RETURN_S = 5.0
"""A key not admitted on this controller for this long gives back this minute's unspent lease."""
S = TypeVar("S", WindowLeases, SlotLeases)


@dataclass(slots=True)
class _Lease:
    """What this controller holds of one key."""

    minute: int = -1
    requests: int = 0
    """Requests leased and not started yet, this minute."""
    tokens: int = 0
    """Tokens leased and not charged yet, this minute (negative: charged beyond the lease)."""
    reserved: int = 0
    """``max_tokens`` of running requests charged to this minute's tokens (given back as they end)."""
    started: int = 0
    """Requests started on this controller this minute."""
    leased_requests: int = 0
    leased_tokens: int = 0
    """The minute's entry as last read or written: leased by all controllers."""
    full_at: tuple[int | None, int | None] = (None, None)
    """The ``rpm`` / ``tpm`` at which this minute's entry was found all leased: refused with no more reads
    until :data:`FULL_RECHECK_S` after ``read_at``."""
    read_at: float = 0.0
    """When this controller last read or wrote the minute's entry."""
    admitted_at: float = 0.0
    """When this controller last admitted a request of the key."""
    running: int = 0
    held: int = 0
    """``max_concurrent`` slots this controller holds in the bucket."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def roll(self, minute: int) -> None:
        if minute != self.minute:
            self.minute = minute
            self.requests = self.tokens = self.reserved = self.started = 0
            self.leased_requests = self.leased_tokens = 0
            self.full_at = (None, None)

    def known_full(self, now: float) -> tuple[int | None, int | None]:
        """``full_at`` while it is fresh (within :data:`FULL_RECHECK_S` of the read that found it)."""
        return self.full_at if now - self.read_at < FULL_RECHECK_S else (None, None)

    def unspent(self) -> bool:
        return self.requests > 0 or self.tokens > 0


def shared_state_unavailable(exc: BaseException) -> ApiError:
    """The 503 for a limits bucket that did not answer."""
    return ApiError(
        503,
        f"The shared state (NATS JetStream) did not answer: {exc or type(exc).__name__}; try again",
        type="server_error",
        code="shared_state_unavailable",
        retry_after=1.0,
    )


class ClusterLimits:
    """``rpm``, ``tpm`` and ``max_concurrent`` of every key across every controller sharing ``bucket``."""

    def __init__(
        self,
        bucket: Bucket,
        controller_id: str,
        *,
        clock: Callable[[], float] = time.time,
        slot_ttl_s: float = SLOT_TTL_S,
    ) -> None:
        self.bucket = bucket
        self.controller_id = controller_id
        self._clock = clock
        self.slot_ttl_s = slot_ttl_s
        self._leases: dict[str, _Lease] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.invalid_records = 0
        self.conflicts = 0
        """Compare-and-set races lost (and retried)."""

    def _lease(self, name: str) -> _Lease:
        lease = self._leases.get(name)
        if lease is None:
            lease = self._leases[name] = _Lease()
        return lease

    async def admit(self, key: ApiKey, reserve: int = 0) -> dict[str, str]:
        """Start one request of ``key`` or raise :class:`RateLimited`; the headers to send. Does no I/O when
        this controller's leases cover the request. Every admitted request needs one :meth:`release`."""
        if not key.limited:
            return {}
        lease = self._lease(key.name)
        now = self._clock()
        lease.roll(int(now // WINDOW_S))
        if self._short(key, lease, reserve):
            async with lease.lock:
                now = self._clock()
                lease.roll(int(now // WINDOW_S))
                try:
                    await self._top_up(key, lease, reserve, now)
                except (nats.errors.Error, TimeoutError) as exc:
                    raise shared_state_unavailable(exc) from None
        if key.rpm is not None:
            lease.requests -= 1
        if key.tpm is not None:
            lease.tokens -= reserve
            lease.reserved += reserve
        lease.started += 1
        lease.running += 1
        lease.admitted_at = now
        return self._headers(key, lease, now)

    def _short(self, key: ApiKey, lease: _Lease, reserve: int) -> bool:
        """Whether this controller's leases do not cover one more request."""
        return (
            (key.rpm is not None and lease.requests < 1)
            or (key.tpm is not None and lease.tokens < 1)
            or (key.max_concurrent is not None and lease.running >= lease.held)
        )

    async def _top_up(self, key: ApiKey, lease: _Lease, reserve: int, now: float) -> None:
        """Lease what the request needs (under the key's lock), or raise :class:`RateLimited`."""
        want_requests = max(1, (key.rpm or 0) // SLICE_DIVISOR) if key.rpm and lease.requests < 1 else 0
        want_tokens = 0
        if key.tpm is not None and lease.tokens < max(1, reserve):
            want_tokens = max(max(1, reserve) - lease.tokens, key.tpm // SLICE_DIVISOR)
        if key.rpm is not None and key.rpm <= 0 and lease.requests < 1:
            raise self._refused(key, lease, now, "requests")
        full_at = lease.known_full(now)
        if want_requests and full_at[0] == key.rpm:
            raise self._refused(key, lease, now, "requests")
        if want_tokens and full_at[1] == key.tpm and lease.tokens < 1:
            raise self._refused(key, lease, now, "tokens")
        if want_requests or want_tokens:
            await self._lease_window(key, lease, now, want_requests, want_tokens)
        if key.max_concurrent is not None and lease.running >= lease.held:
            await self._take_slot(key, lease, now)

    async def _lease_window(self, key: ApiKey, lease: _Lease, now: float, requests: int, tokens: int) -> None:
        entry_key = f"{token(key.name)}.w{lease.minute}"
        for _ in range(CAS_ATTEMPTS):
            entry, held = await self._read(entry_key, window_decoder, WindowLeases)
            lease.leased_requests, lease.leased_tokens = held.requests, held.tokens
            lease.read_at = now
            granted_requests = min(requests, max(0, (key.rpm or 0) - held.requests))
            granted_tokens = min(tokens, max(0, (key.tpm or 0) - held.tokens))
            lease.full_at = (
                key.rpm if requests and held.requests >= (key.rpm or 0) else None,
                key.tpm if tokens and held.tokens >= (key.tpm or 0) else None,
            )
            if requests and lease.requests + granted_requests < 1:
                raise self._refused(key, lease, now, "requests")
            if tokens and lease.tokens + granted_tokens < 1:
                raise self._refused(key, lease, now, "tokens")
            held.requests += granted_requests
            held.tokens += granted_tokens
            if not await self._write(entry_key, entry, held):
                continue
            lease.requests += granted_requests
            lease.tokens += granted_tokens
            lease.leased_requests, lease.leased_tokens = held.requests, held.tokens
            return
        raise shared_state_unavailable(TimeoutError(f"the limits entry {entry_key} kept changing"))

    async def _take_slot(self, key: ApiKey, lease: _Lease, now: float) -> None:
        assert key.max_concurrent is not None
        entry_key = f"{token(key.name)}.slots"
        for _ in range(CAS_ATTEMPTS):
            entry, held = await self._read(entry_key, slots_decoder, SlotLeases)
            if held.live(now) - self._own(held, now) + lease.held >= key.max_concurrent:
                raise RateLimited(
                    f"Key '{key.name}' already has {held.live(now)} request(s) running across the cluster, its "
                    "max_concurrent limit",
                    "requests",
                    1.0,
                    self._headers(key, lease, now),
                )
            self._prune(held, now)
            held.slots[self.controller_id] = Slot(held=lease.held + 1, until=now + self.slot_ttl_s)
            if await self._write(entry_key, entry, held):
                lease.held += 1
                return
        raise shared_state_unavailable(TimeoutError(f"the limits entry {entry_key} kept changing"))

    def _own(self, held: SlotLeases, now: float) -> int:
        slot = held.slots.get(self.controller_id)
        return slot.held if slot is not None and slot.until > now else 0

    @staticmethod
    def _prune(held: SlotLeases, now: float) -> None:
        for name in [name for name, slot in held.slots.items() if slot.until <= now]:
            del held.slots[name]

    async def _read(self, entry_key: str, decoder: msgspec.json.Decoder[S], empty: type[S]) -> tuple[Entry | None, S]:
        """The entry and its value; a malformed one is counted and read as empty (the write replaces it)."""
        entry = await self.bucket.get(entry_key)
        if entry is None or entry.value is None:
            return entry, empty()
        try:
            return entry, decoder.decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.invalid_records += 1
            log.warning("dropped a malformed limits entry at %s (revision %d): %s", entry_key, entry.revision, exc)
            return entry, empty()

    async def _write(self, entry_key: str, entry: Entry | None, value: WindowLeases | SlotLeases) -> bool:
        """Compare-and-set ``value`` over ``entry`` (created when there was none); ``False``: lost a race."""
        try:
            if entry is None:
                await self.bucket.create(entry_key, encoder.encode(value))
            else:
                await self.bucket.update(entry_key, encoder.encode(value), entry.revision)
        except (KeyExists, RevisionChanged):
            self.conflicts += 1
            return False
        return True

    def release(self, key: ApiKey, reserve: int = 0) -> None:
        """One admitted request of ``key`` ended: its reserve back to this minute's tokens, its slot given back
        in the background unless another request took it."""
        lease = self._leases.get(key.name)
        if lease is None or lease.running <= 0:
            return
        lease.running -= 1
        lease.roll(int(self._clock() // WINDOW_S))
        refund = min(reserve, lease.reserved)
        lease.reserved -= refund
        lease.tokens += refund
        if lease.held > lease.running:
            self._spawn(self._give_back_slots(key.name, lease))

    def record_tokens(self, key_name: str, tokens: int) -> None:
        """Charge a finished request's tokens to this minute (this controller's lease; no I/O)."""
        lease = self._leases.get(key_name)
        if lease is None or tokens <= 0:
            return
        lease.roll(int(self._clock() // WINDOW_S))
        lease.tokens -= tokens

    def running(self, key: ApiKey) -> int:
        """Requests of ``key`` running on this controller."""
        lease = self._leases.get(key.name)
        return lease.running if lease is not None else 0

    def snapshot(self, key: ApiKey) -> dict[str, int | None]:
        """This minute: requests started here, leased by all controllers, and this controller's slots."""
        lease = self._leases.get(key.name)
        if lease is None:
            lease = _Lease()
        lease.roll(int(self._clock() // WINDOW_S))
        return {
            "requests_this_minute": lease.started,
            "requests_leased": lease.leased_requests,
            "tokens_leased": lease.leased_tokens,
            "tokens_reserved": lease.reserved,
            "running": lease.running,
            "slots_held": lease.held,
        }

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back_slots(self, name: str, lease: _Lease) -> None:
        async with lease.lock:
            try:
                await self._set_slots(name, lease, lease.running)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("could not give back %s's slots (they lapse by themselves): %s", name, exc)

    async def _set_slots(self, name: str, lease: _Lease, held: int) -> None:
        """Hold ``held`` slots of ``name`` from now on (fewer: given back; the same: renewed)."""
        entry_key = f"{token(name)}.slots"
        for _ in range(CAS_ATTEMPTS):
            now = self._clock()
            entry, value = await self._read(entry_key, slots_decoder, SlotLeases)
            self._prune(value, now)
            if held > 0:
                value.slots[self.controller_id] = Slot(held=held, until=now + self.slot_ttl_s)
            else:
                value.slots.pop(self.controller_id, None)
            if await self._write(entry_key, entry, value):
                lease.held = held
                return

    async def run(self) -> None:
        """Until cancelled: renew this controller's slots (at least every third of their lifetime) and give
        back the unspent leases of keys idle here (:meth:`give_back_idle`)."""
        while True:
            await asyncio.sleep(min(self.slot_ttl_s / 3, IDLE_RETURN_S / 2))
            for name, lease in list(self._leases.items()):
                if lease.held > 0:
                    async with lease.lock:
                        try:
                            await self._set_slots(name, lease, lease.held)
                        except Exception as exc:  # renewal goes on for the other keys and the next round
                            log.warning("could not renew %s's slots: %s", name, exc)
            await self.give_back_idle()

    async def give_back_idle(self) -> int:
        """Give back this minute's unspent requests and tokens of every key not admitted here for
        :data:`IDLE_RETURN_S`; how many keys gave some back."""
        now = self._clock()
        minute = int(now // WINDOW_S)
        returned = 0
        for name, lease in list(self._leases.items()):
            if lease.minute != minute or not lease.unspent() or now - lease.admitted_at < IDLE_RETURN_S:
                continue
            async with lease.lock:
                try:
                    if lease.minute == minute and lease.unspent():
                        await self._return_unspent(name, lease)
                        returned += 1
                except (nats.errors.Error, TimeoutError) as exc:  # it lapses with the minute instead
                    log.warning("could not give back %s's unspent lease: %s", name, exc)
        return returned

    async def close(self) -> None:
        """Give back every slot and this minute's unspent leases (a clean stop); the background work ends."""
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        minute = int(self._clock() // WINDOW_S)
        for name, lease in self._leases.items():
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with lease.lock:
                    await self._return_all(name, lease, minute)

    async def _return_all(self, name: str, lease: _Lease, minute: int) -> None:
        if lease.held:
            await self._set_slots(name, lease, 0)
        if lease.minute == minute and lease.unspent():
            await self._return_unspent(name, lease)

    async def _return_unspent(self, name: str, lease: _Lease) -> None:
        entry_key = f"{token(name)}.w{lease.minute}"
        for _ in range(CAS_ATTEMPTS):
            entry, held = await self._read(entry_key, window_decoder, WindowLeases)
            if entry is None:
                return
            held.requests = max(0, held.requests - max(0, lease.requests))
            held.tokens = max(0, held.tokens - max(0, lease.tokens))
            if await self._write(entry_key, entry, held):
                lease.requests = min(0, lease.requests)
                lease.tokens = min(0, lease.tokens)
                lease.leased_requests, lease.leased_tokens = held.requests, held.tokens
                return

    def _refused(self, key: ApiKey, lease: _Lease, now: float, kind: str) -> RateLimited:
        wait = (lease.minute + 1) * WINDOW_S - now
        if kind == "requests":
            message = (
                f"Rate limit reached for key '{key.name}' on requests per min (RPM): limit {key.rpm}, "
                f"leased by all controllers {lease.leased_requests}. Please try again in {format_reset(wait)}."
            )
        else:
            message = (
                f"Rate limit reached for key '{key.name}' on tokens per min (TPM): limit {key.tpm}, "
                f"leased by all controllers {lease.leased_tokens}. Please try again in {format_reset(wait)}."
            )
        return RateLimited(message, kind, wait, self._headers(key, lease, now))

    def _headers(self, key: ApiKey, lease: _Lease, now: float) -> dict[str, str]:
        """OpenAI's headers: remaining is the minute's budget less what all controllers leased (plus this
        controller's unspent lease, which its next requests may still use); reset is the minute's end."""
        reset = format_reset((lease.minute + 1) * WINDOW_S - now)
        headers: dict[str, str] = {}
        if key.rpm is not None:
            remaining = key.rpm - lease.leased_requests + max(0, lease.requests)
            headers["x-ratelimit-limit-requests"] = str(key.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, remaining))
            headers["x-ratelimit-reset-requests"] = reset
        if key.tpm is not None:
            remaining = key.tpm - lease.leased_tokens + lease.tokens
            headers["x-ratelimit-limit-tokens"] = str(key.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, remaining))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers
