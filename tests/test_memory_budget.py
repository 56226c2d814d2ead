"""The worker's memory budget: admission by bytes in arrival order, prompt caches shrunk on demand."""

from __future__ import annotations

import asyncio

import pytest

from mlxcluster.protocol import MemoryParts
from mlxcluster.worker import memory_budget
from mlxcluster.worker.memory_budget import MemoryBudget, NeverFits, Reservation


class FakeCache:
    """A prompt cache that shrinks to whatever target it is given, at once."""

    def __init__(self, nbytes: int = 0) -> None:
        self.nbytes = nbytes
        self.targets: list[int] = []

    def shrink(self, target: int) -> None:
        self.targets.append(target)
        self.nbytes = min(self.nbytes, target)


def budget_with(limit: int, **models: tuple[int, FakeCache]) -> MemoryBudget:
    budget = MemoryBudget(limit)
    for name, (weights, cache) in models.items():
        budget.add_model(name, weights, cache_bytes=lambda c=cache: c.nbytes, shrink_cache=cache.shrink)
    return budget


async def test_reserve_and_release_account_for_the_bytes() -> None:
    cache = FakeCache(10)
    budget = budget_with(100, a=(40, cache))
    reservation = await budget.reserve("a", 30)
    assert (budget.weights_bytes(), budget.kv_bytes(), budget.cache_bytes()) == (40, 30, 10)
    assert budget.parts() == MemoryParts(budget_bytes=100, weights_bytes=40, prompt_cache_bytes=10, kv_bytes=30)
    assert budget.room_for_weights() == 30
    reservation.release()
    reservation.release()  # idempotent
    assert budget.kv_bytes() == 0
    with await budget.reserve("a", 20) as held:
        assert isinstance(held, Reservation) and budget.kv_bytes() == 20
    assert budget.kv_bytes() == 0
    assert budget.peak_bytes == 80


async def test_admission_shrinks_the_largest_cache_first() -> None:
    big, small = FakeCache(30), FakeCache(10)
    budget = budget_with(100, a=(20, big), b=(20, small))
    assert budget.peak_bytes == 80
    await budget.reserve("a", 25)  # 20 + 20 + 40 caches + 25 = 105: 5 bytes too many
    assert (big.targets, small.targets) == ([25], [])
    assert budget.peak_bytes == 100
    budget.make_room(40)  # 40 + 25 + 35 caches + 40 = 140: the large cache empties, then the small one shrinks
    assert (big.targets, small.targets) == ([25, 0], [0])
    assert budget.cache_bytes() == 0


async def test_a_cache_that_shrinks_later_counts_at_its_target() -> None:
    budget = MemoryBudget(100)
    held = [60]
    asked: list[int] = []
    budget.add_model("a", 10, cache_bytes=lambda: held[0], shrink_cache=asked.append)
    budget.make_room(50)
    assert asked == [40] and budget.cache_bytes() == 40  # posted, not done yet
    held[0] = 30  # the generation thread evicted, then the cache grows again on its own
    assert budget.cache_bytes() == 30
    held[0] = 45
    assert budget.cache_bytes() == 45


async def test_waiters_are_admitted_in_arrival_order() -> None:
    budget = budget_with(100, a=(20, FakeCache()))
    first = await budget.reserve("a", 60)
    order: list[str] = []

    async def ask(name: str, nbytes: int) -> Reservation:
        reservation = await budget.reserve("a", nbytes)
        order.append(name)
        return reservation

    big = asyncio.create_task(ask("big", 70))
    await asyncio.sleep(0)
    small = asyncio.create_task(ask("small", 10))  # would fit now, but the big one came first
    await asyncio.sleep(0.01)
    assert order == [] and budget.waiting_bytes() == 80 and budget.kv_bytes() == 60
    first.release()
    (await big).release()
    await small
    assert order == ["big", "small"]
    assert budget.kv_bytes() == 10


async def test_a_cancelled_waiter_reserves_nothing_and_lets_the_next_in() -> None:
    budget = budget_with(100, a=(20, FakeCache()))
    running = await budget.reserve("a", 50)
    big = asyncio.create_task(budget.reserve("a", 60))
    await asyncio.sleep(0)
    small = asyncio.create_task(budget.reserve("a", 20))
    await asyncio.sleep(0.01)
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    assert (await small).nbytes == 20  # behind the cancelled one only
    assert budget.kv_bytes() == 70 and budget.waiting_bytes() == 0
    running.release()


async def test_a_waiter_cancelled_as_it_is_granted_gives_the_bytes_back() -> None:
    budget = budget_with(100, a=(20, FakeCache()))
    running = await budget.reserve("a", 50)
    waiter = asyncio.create_task(budget.reserve("a", 60))
    await asyncio.sleep(0.01)
    running.release()  # grants the waiter; its task has not run yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.kv_bytes() == 0


async def test_waiting_is_called_while_it_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_budget, "WAITING_PING_S", 0.02)
    budget = budget_with(100, a=(20, FakeCache()))
    running = await budget.reserve("a", 80)
    pings: list[int] = []
    waiter = asyncio.create_task(budget.reserve("a", 10, waiting=lambda: pings.append(1)))
    await asyncio.sleep(0.11)
    running.release()
    await waiter
    assert 3 <= len(pings) <= 6


async def test_never_fits_names_the_bytes_the_budget_and_the_weights() -> None:
    budget = budget_with(100 << 20, a=(60 << 20, FakeCache()))
    with pytest.raises(NeverFits) as caught:
        await budget.reserve("a", 41 << 20)
    assert "41.0 MiB" in str(caught.value) and "100.0 MiB" in str(caught.value) and "60.0 MiB" in str(caught.value)
    assert budget.kv_bytes() == 0 and budget.waiting_bytes() == 0


async def test_removing_a_model_lets_waiters_in() -> None:
    budget = budget_with(100, a=(40, FakeCache()), b=(40, FakeCache()))
    waiter = asyncio.create_task(budget.reserve("a", 50))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    budget.remove_model("b")
    assert (await waiter).nbytes == 50
    assert budget.weights_bytes() == 40
