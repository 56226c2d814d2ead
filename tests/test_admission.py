"""Admission control: a FIFO gate with a bounded queue that never leaks a slot."""

from __future__ import annotations

import asyncio

from mlxcluster.worker.admission import Admission


async def settle() -> None:
    """Let every ready task run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_admits_up_to_max_concurrent_without_waiting() -> None:
    gate = Admission(max_concurrent=2, max_queue=0)
    assert not gate.would_queue()
    assert await gate.acquire()
    assert await gate.acquire()
    assert gate.active == 2 and gate.would_queue()
    assert not await gate.acquire()  # no queue at all: refused at once
    gate.release()
    gate.release()
    assert gate.active == 0


async def test_waiters_are_served_in_arrival_order() -> None:
    gate = Admission(max_concurrent=1, max_queue=3)
    assert await gate.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        assert await gate.acquire()
        order.append(n)

    tasks = [asyncio.create_task(wait(n)) for n in range(3)]
    await settle()
    assert gate.queued == 3 and order == []
    for expected in range(3):
        gate.release()
        await settle()
        assert order == list(range(expected + 1))
        assert gate.active == 1
    gate.release()
    await asyncio.gather(*tasks)
    assert (gate.active, gate.queued) == (0, 0)


async def test_queue_is_bounded_and_refusal_is_immediate() -> None:
    gate = Admission(max_concurrent=1, max_queue=2)
    assert await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
    await settle()
    assert gate.queued == 2
    assert await asyncio.wait_for(gate.acquire(), 0.5) is False
    assert gate.queued == 2
    for _ in range(3):
        gate.release()
        await settle()
    assert all(await asyncio.gather(*waiters))
    assert (gate.active, gate.queued) == (0, 0)


async def test_newcomer_does_not_overtake_the_queue() -> None:
    gate = Admission(max_concurrent=1, max_queue=2)
    assert await gate.acquire()
    order: list[str] = []

    async def wait(name: str) -> None:
        await gate.acquire()
        order.append(name)
        gate.release()

    first = asyncio.create_task(wait("queued"))
    await settle()
    gate.release()  # the slot goes to the waiter, not to whoever asks next
    late = asyncio.create_task(wait("late"))
    await asyncio.gather(first, late)
    assert order == ["queued", "late"]
    assert gate.active == 0


async def test_cancelled_waiter_leaves_the_queue_without_leaking() -> None:
    gate = Admission(max_concurrent=1, max_queue=3)
    assert await gate.acquire()
    a, b, c = (asyncio.create_task(gate.acquire()) for _ in range(3))
    await settle()
    b.cancel()
    await settle()
    assert b.cancelled()
    assert gate.queued == 2
    gate.release()
    await settle()
    assert a.done() and not c.done()
    gate.release()
    await settle()
    assert c.done()
    gate.release()
    assert (gate.active, gate.queued) == (0, 0)


async def test_waiter_cancelled_just_after_being_handed_a_slot_passes_it_on() -> None:
    gate = Admission(max_concurrent=1, max_queue=2)
    assert await gate.acquire()
    handed = asyncio.create_task(gate.acquire())
    nxt = asyncio.create_task(gate.acquire())
    await settle()
    gate.release()  # the slot is handed to ``handed``'s future...
    handed.cancel()  # ...which is cancelled before it could run
    await settle()
    assert handed.cancelled()
    assert nxt.done() and nxt.result() is True  # the slot went on to the next waiter
    assert gate.active == 1
    gate.release()
    assert (gate.active, gate.queued) == (0, 0)
    # No slot leaked: the full capacity is available again.
    assert await gate.acquire()
    gate.release()


async def test_waiter_cancelled_after_handoff_with_nobody_behind_frees_the_slot() -> None:
    gate = Admission(max_concurrent=1, max_queue=1)
    assert await gate.acquire()
    handed = asyncio.create_task(gate.acquire())
    await settle()
    gate.release()
    handed.cancel()
    await settle()
    assert handed.cancelled()
    assert (gate.active, gate.queued) == (0, 0)


async def test_timeout_while_queued_releases_the_place() -> None:
    gate = Admission(max_concurrent=1, max_queue=1)
    assert await gate.acquire()
    try:
        async with asyncio.timeout(0.05):
            await gate.acquire()
    except TimeoutError:
        pass
    assert gate.queued == 0
    waiter = asyncio.create_task(gate.acquire())  # the queue place is free again
    await settle()
    assert gate.queued == 1
    gate.release()
    assert await waiter
    gate.release()
    assert gate.active == 0


async def test_continued_streams_wait_ahead_of_new_requests_and_past_a_full_queue() -> None:
    gate = Admission(max_concurrent=1, max_queue=1)
    assert await gate.acquire()
    order: list[str] = []

    async def wait(name: str, *, continued: bool = False) -> None:
        assert await gate.acquire(continued=continued)
        order.append(name)

    new = asyncio.create_task(wait("new"))
    await settle()
    assert not await gate.acquire()  # the queue (1) is full for a new request...
    moved = [asyncio.create_task(wait(f"moved{i}", continued=True)) for i in range(2)]
    await settle()
    assert gate.queued == 3  # ...not for streams moved here mid-answer
    for _ in range(3):
        gate.release()
        await settle()
    assert order == ["moved0", "moved1", "new"]
    gate.release()
    await asyncio.gather(new, *moved)
    assert (gate.active, gate.queued) == (0, 0)
