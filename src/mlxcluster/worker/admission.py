"""Admission control: at most ``max_concurrent`` requests run, at most ``max_queue`` wait, FIFO.

Continued streams (moved here from a lost worker mid-answer: a client is already reading them) wait ahead of
new requests and are never refused for a full queue: there are at most as many as the streams lost.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Admission:
    """A FIFO gate with a bounded wait queue; refusal is immediate when the queue is full."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._continued: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters) + len(self._continued)

    def would_queue(self) -> bool:
        """True if a request arriving now would have to wait."""
        return self.active >= self.max_concurrent

    async def acquire(self, *, continued: bool = False) -> bool:
        """Take a slot, waiting in line if needed; ``False`` if the queue is full (refuse the request).
        ``continued``: a stream moved here mid-answer, which waits ahead of new requests."""
        if self.active < self.max_concurrent and not self.queued:
            self.active += 1
            return True
        line = self._continued if continued else self._waiters
        if not continued and len(self._waiters) >= self.max_queue:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in line:
                line.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            raise
        return True

    def release(self) -> None:
        """Give a slot back, handing it straight to the next waiter (continued streams first)."""
        for line in (self._continued, self._waiters):
            while line:
                waiter = line.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.active -= 1
