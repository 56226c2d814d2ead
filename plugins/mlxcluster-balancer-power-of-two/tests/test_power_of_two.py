"""The power-of-two balancer on its own and as an installed entry-point plugin."""

from __future__ import annotations

from collections import Counter

import pytest
from mlxcluster_power_of_two import PowerOfTwo

from mlxcluster.api import InferenceRequest, WorkerView
from mlxcluster.config import LoadBalancingSection, PluginsSection
from mlxcluster.controller.routing.balancing import build_balancer
from mlxcluster.plugins import collect_balancers, get_plugin_manager, list_plugins

REQUEST = InferenceRequest(request_id="r", model="m", prompt="hi")


def worker(worker_id: str, load: int = 0, max_concurrent: int = 4) -> WorkerView:
    return WorkerView(id=worker_id, status="online", load=load, max_concurrent=max_concurrent, models=("m",))


def test_no_worker_and_one_worker() -> None:
    balancer = PowerOfTwo(seed=1)
    assert balancer.pick([], REQUEST) is None
    only = worker("a", load=100)
    assert all(balancer.pick([only], REQUEST) is only for _ in range(10))


def test_of_two_workers_the_less_loaded_always_wins() -> None:
    balancer = PowerOfTwo(seed=2)
    busy, idle = worker("busy", load=3), worker("idle", load=1)
    assert {balancer.pick([busy, idle], REQUEST).id for _ in range(50)} == {"idle"}


def test_utilization_not_raw_load_decides() -> None:
    big = worker("big", load=4, max_concurrent=16)  # 25 % busy
    small = worker("small", load=2, max_concurrent=2)  # full
    balancer = PowerOfTwo(seed=3)
    assert {balancer.pick([small, big], REQUEST).id for _ in range(20)} == {"big"}


def test_the_most_loaded_worker_is_never_picked_and_the_rest_share() -> None:
    workers = [worker("w0", load=0), worker("w1", load=1), worker("w2", load=2), worker("w3", load=3)]
    balancer = PowerOfTwo(seed=4)
    picks = Counter(balancer.pick(workers, REQUEST).id for _ in range(3000))
    assert "w3" not in picks  # it loses to whichever other worker is drawn with it
    # w0 wins whenever drawn (1/2 of draws), w1 against w2/w3 (1/3), w2 against w3 (1/6)
    assert picks["w0"] > picks["w1"] > picks["w2"] > 0
    assert picks["w0"] == pytest.approx(1500, rel=0.1) and picks["w2"] == pytest.approx(500, rel=0.2)


def test_equal_load_spreads_over_all_workers() -> None:
    workers = [worker(f"w{i}") for i in range(5)]
    balancer = PowerOfTwo(seed=5)
    picks = Counter(balancer.pick(workers, REQUEST).id for _ in range(2000))
    assert set(picks) == {w.id for w in workers}
    assert min(picks.values()) > 250


def test_installed_entry_point_registers_power_of_two() -> None:
    pm = get_plugin_manager(PluginsSection(), env={})
    entry = collect_balancers(pm)["power_of_two"]
    assert entry.plugin == "power-of-two" and "less loaded" in entry.description
    (row,) = [p for p in list_plugins(pm) if p.name == "power-of-two"]
    assert (row.status, row.source, row.package) == ("loaded", "entry point", "mlxcluster-balancer-power-of-two")
    balancer = build_balancer(pm, LoadBalancingSection(strategy="power_of_two"))
    chosen = balancer.pick([worker("a", load=2), worker("b", load=0)], REQUEST)
    assert chosen is not None and chosen.id == "b"


def test_disabled_by_name() -> None:
    pm = get_plugin_manager(PluginsSection(disabled=["mlxcluster-balancer-power-of-two"]), env={})
    assert "power_of_two" not in collect_balancers(pm)
    assert [p.status for p in list_plugins(pm) if p.name == "power-of-two"] == ["disabled"]
