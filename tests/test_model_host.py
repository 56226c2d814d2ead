"""The worker's model host: loads on demand (one at a time per model), keep-alive, LRU eviction under the
memory budget, pins, failed loads, unloads that wait for requests. Echo engines over model dirs of chosen sizes:
the host's bookkeeping is what is tested, not a model."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from mlxcluster.config import Config
from mlxcluster.worker.catalogue import CatalogueEntry, build_catalogue
from mlxcluster.worker.echo import EchoEngine
from mlxcluster.worker.engine_base import Engine
from mlxcluster.worker.memory_budget import MemoryBudget
from mlxcluster.worker.model_host import LoadError, ModelHost

MIB = 1024**2


def model_dir(root: Path, name: str, weights: int) -> Path:
    """A model dir with a llama config and a weights file of ``weights`` bytes (never loaded: echo serves it)."""
    path = root / name
    path.mkdir()
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 2048,
        "torch_dtype": "float16",
    }
    (path / "config.json").write_text(json.dumps(config))
    with (path / "model.safetensors").open("wb") as out:
        out.truncate(weights)
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Factory:
    """Echo engines, counting starts; ``slow`` loads take a while, ``broken`` ones fail."""

    def __init__(self, *, slow_s: float = 0.0, broken: set[str] | None = None) -> None:
        self.started: Counter[str] = Counter()
        self.slow_s = slow_s
        self.broken = broken or set()

    def __call__(self, entry: CatalogueEntry) -> Engine:
        factory = self

        class Counted(EchoEngine):
            async def start(self) -> None:
                factory.started[entry.name] += 1
                await asyncio.sleep(factory.slow_s)
                if entry.name in factory.broken:
                    raise OSError(f"cannot read the weights of {entry.name}")

        return Counted(models=[entry.name])


def make_host(
    tmp_path: Path,
    sizes: dict[str, int],
    *,
    budget: int,
    factory: Factory | None = None,
    keep_alive_s: float = 300.0,
    pinned: set[str] | None = None,
    clock: Clock | None = None,
) -> tuple[ModelHost, Factory]:
    dirs = [str(model_dir(tmp_path, name, size)) for name, size in sizes.items()]
    config = msgspec_config({"worker": {"engine": "echo", "models": dirs}})
    factory = factory or Factory()
    host = ModelHost(
        build_catalogue(config),
        factory,
        MemoryBudget(budget),
        models_dir=tmp_path,
        default_keep_alive_s=keep_alive_s,
        pinned=pinned,
        clock=clock or Clock(),
    )
    return host, factory


def msgspec_config(raw: dict[str, object]) -> Config:
    import msgspec

    return msgspec.convert(raw, Config)


async def test_concurrent_first_requests_share_one_load(tmp_path: Path) -> None:
    host, factory = make_host(tmp_path, {"a": 4 * MIB}, budget=64 * MIB, factory=Factory(slow_s=0.2))
    assert host.catalogue.names() == ["a"] and host.loaded() == []
    leases = await asyncio.gather(*(host.acquire("a") for _ in range(8)))
    assert factory.started == {"a": 1} and host.loads == 1
    assert len({id(lease.engine) for lease in leases}) == 1
    assert host.state("a") is not None and host.state("a").in_flight == 8  # type: ignore[union-attr]
    for lease in leases:
        lease.release()
        lease.release()  # idempotent
    assert host.state("a").in_flight == 0  # type: ignore[union-attr]
    assert host.budget.weights_bytes() == 4 * MIB
    await host.stop()


async def test_keep_alive_expiry_zero_and_negative(tmp_path: Path) -> None:
    clock = Clock()
    host, _ = make_host(tmp_path, {"a": MIB, "b": MIB, "c": MIB}, budget=64 * MIB, keep_alive_s=60, clock=clock)
    (await host.acquire("a")).release()  # the default keep-alive: 60 s
    (await host.acquire("b", keep_alive_s=-1)).release()  # for ever
    assert host.state("a").expires_at == clock.now + 60  # type: ignore[union-attr]
    assert host.state("b").expires_at is None  # type: ignore[union-attr]
    lease = await host.acquire("c", keep_alive_s=0)  # unloads when its request ends
    clock.now += 59
    host.sweep()
    assert sorted(host.loaded()) == ["a", "b", "c"]
    lease.release()
    await wait_for(lambda: "c" not in host.loaded() and host.state("c") is None)
    clock.now += 2
    host.sweep()
    await wait_for(lambda: host.state("a") is None)
    assert host.loaded() == ["b"] and host.unloads == 2
    assert host.budget.weights_bytes() == MIB
    await host.stop()


async def test_a_model_keep_alive_default_comes_from_its_own_setting(tmp_path: Path) -> None:
    clock = Clock()
    host, _ = make_host(tmp_path, {"a": MIB, "b": MIB}, budget=64 * MIB, keep_alive_s=60, clock=clock)
    host.model_keep_alive_s = {"a": 3600.0}
    (await host.acquire("a")).release()
    (await host.acquire("b")).release()
    assert host.state("a").expires_at == clock.now + 3600  # type: ignore[union-attr]
    assert host.state("b").expires_at == clock.now + 60  # type: ignore[union-attr]
    await host.stop()


async def test_a_model_in_use_never_expires(tmp_path: Path) -> None:
    clock = Clock()
    host, _ = make_host(tmp_path, {"a": MIB}, budget=64 * MIB, keep_alive_s=1, clock=clock)
    lease = await host.acquire("a")
    clock.now += 100
    host.sweep()
    assert host.loaded() == ["a"] and host.state("a").expires_at is None  # type: ignore[union-attr]
    lease.release()
    assert host.state("a").expires_at == clock.now + 1  # type: ignore[union-attr]
    await host.stop()


async def test_lru_eviction_pins_and_force_under_a_small_budget(tmp_path: Path) -> None:
    clock = Clock()
    sizes = {"a": 6 * MIB, "b": 6 * MIB, "c": 6 * MIB, "big": 20 * MIB}
    host, _ = make_host(tmp_path, sizes, budget=13 * MIB, clock=clock)  # two of a, b, c fit
    (await host.acquire("a")).release()
    clock.now += 1
    (await host.acquire("b")).release()
    clock.now += 1
    (await host.acquire("a")).release()  # a is now the most recently used
    clock.now += 1
    (await host.acquire("c")).release()  # evicts b, the least recently used
    await wait_for(lambda: host.state("b") is None)
    assert sorted(host.loaded()) == ["a", "c"]
    assert host.budget.weights_bytes() <= host.budget.limit_bytes
    await host.load("c", pin=True)
    held = await host.acquire("a")  # in flight: not evictable either
    with pytest.raises(LoadError, match=r"'b' needs 6.0 MiB.*held: a 6.0 MiB 1 in flight, c 6.0 MiB pinned"):
        await host.acquire("b")
    with pytest.raises(LoadError, match="'big' needs 20.0 MiB"):
        await host.load("big")
    held.release()
    state, warning = await host.load("big", force=True)  # evicts a (idle now), then loads past the budget
    assert state.state == "loaded" and "forced past the memory budget" in warning
    assert sorted(host.loaded()) == ["big", "c"]
    await host.stop()


async def test_a_failed_load_fails_every_waiter_and_the_next_request_tries_again(tmp_path: Path) -> None:
    factory = Factory(slow_s=0.1, broken={"a"})
    host, _ = make_host(tmp_path, {"a": MIB}, budget=64 * MIB, factory=factory)
    results = await asyncio.gather(*(host.acquire("a") for _ in range(4)), return_exceptions=True)
    assert all(isinstance(r, LoadError) and "cannot read the weights of a" in str(r) for r in results)
    assert factory.started == {"a": 1} and host.loaded() == [] and host.budget.weights_bytes() == 0
    factory.broken.clear()
    (await host.acquire("a")).release()
    assert factory.started == {"a": 2} and host.loaded() == ["a"]
    with pytest.raises(LoadError, match="not in this worker's catalogue"):
        await host.acquire("nope")
    await host.stop()


async def test_unload_waits_for_requests_and_a_new_request_loads_again(tmp_path: Path) -> None:
    host, factory = make_host(tmp_path, {"a": MIB}, budget=64 * MIB)
    lease = await host.acquire("a")
    unloading = asyncio.create_task(host.unload("a"))
    await wait_for(lambda: host.state("a") is not None and host.state("a").state == "unloading")  # type: ignore[union-attr]
    again = asyncio.create_task(host.acquire("a"))  # waits for the unload, then loads again
    await asyncio.sleep(0.1)
    assert not unloading.done() and not again.done()
    lease.release()
    state = await unloading
    assert state is not None and state.name == "a"
    (await again).release()
    assert factory.started == {"a": 2} and host.loaded() == ["a"]
    assert await host.unload("nope") is None
    await host.stop()


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_requests_waiting_for_memory_unload_idle_models(tmp_path: Path) -> None:
    clock = Clock()
    host, _ = make_host(tmp_path, {"a": 6 * MIB, "b": 6 * MIB}, budget=13 * MIB, clock=clock)
    (await host.acquire("a")).release()  # idle, unpinned
    lease = await host.acquire("b")
    waiting = asyncio.create_task(host.budget.reserve("b", 3 * MIB))  # a request of b's needs a's room
    await asyncio.sleep(0.05)
    assert not waiting.done() and host.budget.waiting_bytes() == 3 * MIB
    host.sweep()
    reservation = await asyncio.wait_for(waiting, 5)
    assert host.state("a") is None and host.loaded() == ["b"]
    reservation.release()
    lease.release()
    await host.stop()


async def test_a_repo_id_missing_offline_is_listed_then_fails_its_load_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config = msgspec_config({"worker": {"models": ["org/absent"]}})
    catalogue = build_catalogue(config)
    (entry,) = catalogue.models()
    assert entry.name == "org/absent" and entry.source == "hub" and entry.weights_bytes == 0
    host = ModelHost(catalogue, Factory(), MemoryBudget(64 * MIB), models_dir=tmp_path)
    with pytest.raises(LoadError) as failed:
        await host.acquire("org/absent")
    message = str(failed.value)
    assert "\n" not in message and "Traceback" not in message
    assert "HF_HUB_OFFLINE is set" in message and "mlxcluster models pull org/absent" in message
    assert host.loaded() == [] and host.budget.weights_bytes() == 0
    await host.stop()
