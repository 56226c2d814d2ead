"""Usage that survives: each finished request appended to a JetStream stream, folded into per-key per-day totals.

Recording is off the request path: :meth:`UsageLedger.record` queues a :class:`UsageRecord`; a sender task
publishes what is queued pipelined and resends what was not acknowledged, under the request id as the
message id, so a resend after a lost acknowledgement is dropped by the server as a duplicate. A clean stop
sends what is queued first.

Folding is exact and idempotent: every controller reads the stream in order from the ``_folded`` watermark
and adds each record to its key's :class:`DayTotals` entry with compare-and-set, skipping records at or below
the entry's ``through_seq``. Two controllers folding the same records, or one folding again after a crash,
count each record once. :meth:`UsageLedger.catch_up` folds up to the stream's end before a totals query,
so a query sees every request acknowledged before it. A record that does not decode is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from mlxcluster.api import RequestFinished
from mlxcluster.bus.jetstream import AppendStream, Bucket, KeyExists, RevisionChanged, StreamMessage
from mlxcluster.controller.shared.records import (
    DayTotals,
    Folded,
    Totals,
    UsageRecord,
    day_decoder,
    encoder,
    folded_decoder,
    token,
    usage_decoder,
    utc_day,
)
from mlxcluster.subjects import Subjects

log = logging.getLogger(__name__)

FOLD_INTERVAL_S = 0.25
RESEND_DELAY_S = 0.5
CATCH_UP_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
CAS_ATTEMPTS = 16
FOLDED_KEY = "_folded"


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One row of a usage answer: a day (and a model, by model) and its totals."""

    day: str
    model: str | None
    totals: Totals

    def to_json(self) -> dict[str, object]:
        row: dict[str, object] = {"day": self.day}
        if self.model is not None:
            row["model"] = self.model
        row.update(msgspec.structs.asdict(self.totals))
        return row


class UsageLedger:
    """This controller's end of the usage stream and the totals bucket."""

    def __init__(self, stream: AppendStream, totals: Bucket, subjects: Subjects, controller_id: str) -> None:
        self.stream = stream
        self.totals = totals
        self.subjects = subjects
        self.controller_id = controller_id
        self.invalid_records = 0
        self._queue: list[UsageRecord] = []
        self._queued = asyncio.Event()
        self._in_flight = 0
        self._seen_seq = 0
        self._pending: dict[tuple[str, str], list[tuple[int, UsageRecord]]] = defaultdict(list)
        self._fold_lock = asyncio.Lock()

    # --- recording -----------------------------------------------------------------------------

    def record(self, event: RequestFinished) -> None:
        """Queue the usage of one finished request of a key (cheap; the sender publishes it)."""
        if event.key is None:
            return
        self._queue.append(
            UsageRecord(
                request_id=event.request_id,
                key=event.key,
                model=event.model,
                status=event.status,
                time=event.time,
                prompt_tokens=event.prompt_tokens,
                cached_tokens=event.cached_tokens,
                completion_tokens=event.completion_tokens,
                controller=self.controller_id,
            )
        )
        self._queued.set()

    @property
    def unsent(self) -> int:
        """Records queued or awaiting their acknowledgement."""
        return len(self._queue) + self._in_flight

    async def _send_queued(self) -> None:
        batch, self._queue = self._queue, []
        self._in_flight += len(batch)
        failed: list[UsageRecord] = []
        try:
            acks: list[asyncio.Future[Any]] = []
            sent: list[UsageRecord] = []
            for record in batch:
                subject = self.subjects.usage(token(record.key))
                try:
                    acks.append(await self.stream.append(subject, encoder.encode(record), msg_id=record.request_id))
                    sent.append(record)
                except (nats.errors.Error, TimeoutError) as exc:
                    log.warning("usage record not sent (%s); will resend", exc)
                    failed.append(record)
            results = await asyncio.gather(*acks, return_exceptions=True)
            failed += [
                record for record, result in zip(sent, results, strict=True) if isinstance(result, BaseException)
            ]
        finally:
            self._in_flight -= len(batch)
        if failed:
            self._queue[:0] = failed
            await asyncio.sleep(RESEND_DELAY_S)
            self._queued.set()

    async def run_sender(self) -> None:
        """Publish queued records until cancelled."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            if self._queue:
                await self._send_queued()

    async def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Send what is queued and wait for the acknowledgements (at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.unsent and time.monotonic() < deadline:
            if self._queue and not self._in_flight:
                await self._send_queued()
            else:
                await asyncio.sleep(0.01)
        if self.unsent:
            log.warning("%d usage record(s) not acknowledged at stop", self.unsent)

    # --- folding -------------------------------------------------------------------------------

    async def watermark(self) -> int:
        entry = await self.totals.get(FOLDED_KEY)
        if entry is None or entry.value is None:
            return 0
        try:
            return folded_decoder.decode(entry.value).seq
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.invalid_records += 1
            return 0

    async def on_message(self, message: StreamMessage) -> None:
        """One stream message: held for the next fold."""
        self._seen_seq = max(self._seen_seq, message.seq)
        try:
            record = usage_decoder.decode(message.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.invalid_records += 1
            log.warning("dropped a malformed usage record (stream seq %d): %s", message.seq, exc)
            return
        self._pending[(record.key, utc_day(record.time))].append((message.seq, record))

    async def fold(self) -> None:
        """Add the held records to their day totals (compare-and-set), then move the watermark."""
        async with self._fold_lock:
            pending, self._pending = self._pending, defaultdict(list)
            through = self._seen_seq
            try:
                for (key, day), records in pending.items():
                    await self._fold_day(key, day, records)
            except BaseException:
                for slot, records in pending.items():  # folded again next time: skipped where already counted
                    self._pending[slot][:0] = records
                raise
            if pending:
                await self._advance(through)

    async def _fold_day(self, key: str, day: str, records: list[tuple[int, UsageRecord]]) -> None:
        name = f"{token(key)}.{day}"
        for _ in range(CAS_ATTEMPTS):
            entry = await self.totals.get(name)
            totals = DayTotals(key=key, day=day)
            if entry is not None and entry.value is not None:
                try:
                    totals = day_decoder.decode(entry.value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.invalid_records += 1
                    log.warning("replacing a malformed usage totals entry %s", name)
            fresh = [(seq, record) for seq, record in records if seq > totals.through_seq]
            if not fresh:
                return
            for seq, record in fresh:
                totals.total.add(record)
                totals.models.setdefault(record.model, Totals()).add(record)
                totals.through_seq = max(totals.through_seq, seq)
            try:
                if entry is None:
                    await self.totals.create(name, encoder.encode(totals))
                else:
                    await self.totals.update(name, encoder.encode(totals), entry.revision)
                return
            except (RevisionChanged, KeyExists):  # another controller wrote it first: read again
                continue
        raise RuntimeError(f"usage totals {name} kept changing")

    async def _advance(self, seq: int) -> None:
        for _ in range(CAS_ATTEMPTS):
            entry = await self.totals.get(FOLDED_KEY)
            held = 0
            if entry is not None and entry.value is not None:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    held = folded_decoder.decode(entry.value).seq
            if held >= seq:
                return
            try:
                if entry is None:
                    await self.totals.create(FOLDED_KEY, encoder.encode(Folded(seq=seq)))
                else:
                    await self.totals.update(FOLDED_KEY, encoder.encode(Folded(seq=seq)), entry.revision)
                return
            except (RevisionChanged, KeyExists):  # lost the race: read again
                continue

    async def run_folder(self) -> None:
        """Follow the stream from the watermark and fold every :data:`FOLD_INTERVAL_S` until cancelled."""
        start = await self.watermark() + 1
        stop = await self.stream.follow(self.subjects.usage_all, start, self.on_message)
        try:
            while True:
                await asyncio.sleep(FOLD_INTERVAL_S)
                try:
                    await self.fold()
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError, RuntimeError) as exc:
                    log.warning("folding usage failed (%s); retrying", exc)
        finally:
            await stop()

    async def catch_up(self, timeout: float = CATCH_UP_TIMEOUT_S) -> None:
        """Fold every record the stream holds now (what this controller queued is sent first)."""
        await self.flush(timeout)
        target = await self.stream.last_seq()
        deadline = time.monotonic() + timeout
        while self._seen_seq < target and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await self.fold()

    # --- reading -------------------------------------------------------------------------------

    async def days(self, key: str, since_day: str | None) -> list[DayTotals]:
        """The day totals of ``key`` from ``since_day`` on (all days when ``None``), oldest first."""
        found: list[DayTotals] = []
        for entry in await self.totals.entries(f"{token(key)}.*"):
            try:
                totals = day_decoder.decode(entry.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.invalid_records += 1
                continue
            if since_day is None or totals.day >= since_day:
                found.append(totals)
        return sorted(found, key=lambda t: t.day)


def usage_rows(days: list[DayTotals], *, by_model: bool) -> tuple[Totals, list[UsageRow]]:
    """The sum over ``days`` and one row per day (per day and model with ``by_model``)."""
    total = Totals()
    rows: list[UsageRow] = []
    for day in days:
        total.merge(day.total)
        if by_model:
            rows += [UsageRow(day.day, model, totals) for model, totals in sorted(day.models.items())]
        else:
            rows.append(UsageRow(day.day, None, day.total))
    return total, rows
