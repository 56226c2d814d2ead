"""Rank 0's word to the other ranks of a worker group, over the group's own ``mx.distributed`` ring.

A broadcast is an ``all_sum`` in which rank 0 contributes the bytes and every other rank zeros: one
collective of :data:`HEADER_BYTES` (a length and the first bytes), and a second only when the message is
longer. Every collective, and every model step (the model's own collectives run inside it), runs under a
:class:`Watchdog`: one that has not returned after ``stall_timeout_s`` means a member died or stalled,
and the group is broken. A collective that fails (the ring noticed a closed socket) breaks it at once.
A broken channel refuses all further use with :class:`GroupBroken`.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

HEADER_BYTES = 512
_LENGTH = struct.Struct("<I")


class GroupBroken(RuntimeError):
    """A member of the group is gone or stalled; the group must re-form."""


class Watchdog:
    """Calls ``on_stall(what, seconds)`` once when one guarded section runs longer than ``timeout_s``."""

    def __init__(self, timeout_s: float, on_stall: Callable[[str, float], None], *, poll_s: float = 0.1) -> None:
        self.timeout_s = timeout_s
        self._on_stall = on_stall
        self._poll_s = poll_s
        self._section: tuple[str, float, float] | None = None
        self._fired = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="group-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, what: str, timeout_s: float | None = None) -> Iterator[None]:
        """Time the section ``what`` (sections do not nest: one thread drives the ring)."""
        self._section = (what, time.monotonic(), timeout_s or self.timeout_s)
        try:
            yield
        finally:
            self._section = None

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self._poll_s):
            section = self._section
            if section is None or self._fired:
                continue
            elapsed = time.monotonic() - section[1]
            if elapsed > section[2]:
                self._fired = True
                self._on_stall(section[0], elapsed)


class Channel:
    """Broadcasts from rank 0 over ``group`` under a watchdog; ``on_broken(reason)`` is called once."""

    def __init__(self, *, stall_timeout_s: float, on_broken: Callable[[str], None]) -> None:
        self.group: Any = None
        self.rank = 0
        self.size = 1
        self.broken: str | None = None
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self.watchdog = Watchdog(stall_timeout_s, self._stalled)

    def attach(self, group: Any) -> None:
        """Use ``group`` (an ``mx.distributed.Group``) from now on."""
        self.group = group
        self.rank = int(group.rank())
        self.size = int(group.size())

    def fail(self, reason: str) -> None:
        """Mark the group broken (first reason wins) and tell the owner."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = reason
        log.error("worker group broken: %s", reason)
        try:
            self._on_broken(reason)
        except Exception:
            log.exception("handling a broken group failed")

    def _stalled(self, what: str, seconds: float) -> None:
        self.fail(f"{what} did not complete within {seconds:.1f} s (a member died or stalled)")

    @contextlib.contextmanager
    def guarded(self, what: str, timeout_s: float | None = None) -> Iterator[None]:
        """Run a section that contains collectives: watched for stalls, and a failure breaks the group."""
        if self.broken is not None:
            raise GroupBroken(self.broken)
        with self.watchdog.guard(what, timeout_s):
            try:
                yield
            except GroupBroken:
                raise
            except Exception as exc:
                if self.broken is None and _is_collective_failure(exc):
                    self.fail(f"{what} failed: {exc}")
                if self.broken is not None:
                    raise GroupBroken(self.broken) from exc
                raise
        if self.broken is not None:  # the watchdog fired while we were inside
            raise GroupBroken(self.broken)

    def broadcast(self, payload: bytes | None = None) -> bytes:
        """Rank 0: send ``payload``; other ranks: pass nothing and receive it."""
        import mlx.core as mx
        import numpy as np

        with self.guarded("a broadcast from rank 0"):
            head = np.zeros(HEADER_BYTES, dtype=np.uint8)
            data = payload or b""
            if self.rank == 0:
                first = data[: HEADER_BYTES - _LENGTH.size]
                head[: _LENGTH.size] = np.frombuffer(_LENGTH.pack(len(data)), dtype=np.uint8)
                head[_LENGTH.size : _LENGTH.size + len(first)] = np.frombuffer(first, dtype=np.uint8)
            summed = self._all_sum(mx, head)
            (length,) = _LENGTH.unpack(summed[: _LENGTH.size].tobytes())
            received = summed[_LENGTH.size : _LENGTH.size + min(length, HEADER_BYTES - _LENGTH.size)].tobytes()
            rest = length - len(received)
            if rest > 0:
                tail = np.zeros(rest, dtype=np.uint8)
                if self.rank == 0:
                    tail[:] = np.frombuffer(data[len(received) :], dtype=np.uint8)
                received += self._all_sum(mx, tail).tobytes()
            return data if self.rank == 0 else received

    def _all_sum(self, mx: Any, buffer: Any) -> Any:
        import numpy as np

        out = mx.distributed.all_sum(mx.array(buffer), group=self.group, stream=mx.cpu)
        mx.eval(out)
        return np.array(out, copy=False)

    def close(self) -> None:
        self.watchdog.stop()


def _is_collective_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and ("[ring]" in str(exc) or "[jaccl]" in str(exc))
