"""Worker groups without the model: placement checks, the NATS rendezvous, dual mode's local groups, the ops."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from loopback import make_config

from mlxcluster.bus import Bus
from mlxcluster.config import ConfigError, GroupSection, load
from mlxcluster.supervisor import Supervisor
from mlxcluster.worker.group_ops import InsertOp, RemoveOp, SamplerSpec, StepOp, StoreOp, decoder, encoder
from mlxcluster.worker.placement import (
    ModelShape,
    PlacementError,
    check_group_fits,
    check_memory_fits,
    model_shape,
)
from mlxcluster.worker.rendezvous import Rendezvous, RendezvousError

DEMO = ModelShape(weights_bytes=538_090_233, attention_heads=9, kv_heads=3, layers=30)
GB = 1024**3


# --- placement --------------------------------------------------------------------------------


def test_tensor_group_must_divide_the_heads() -> None:
    check_group_fits(DEMO, 3, "tensor")
    with pytest.raises(PlacementError, match=r"group of 2 does not divide the model's 9 attention heads.*\(3\)"):
        check_group_fits(DEMO, 2, "tensor")
    with pytest.raises(PlacementError, match="9 KV heads|3 KV heads"):
        check_group_fits(DEMO, 9, "tensor")


def test_pipeline_group_needs_a_layer_per_rank() -> None:
    check_group_fits(DEMO, 30, "pipeline")
    with pytest.raises(PlacementError, match="more ranks than the model's 30 layers"):
        check_group_fits(DEMO, 31, "pipeline")


def test_weights_larger_than_memory_are_refused_with_a_group_suggested() -> None:
    check_memory_fits(DEMO, 1 * GB)
    with pytest.raises(PlacementError, match=r"do not fit .* worker group of at least 3 machines"):
        check_memory_fits(DEMO, int(0.2 * GB))
    check_memory_fits(DEMO, int(0.2 * GB), size=3)  # a third of the weights per member fits


def test_model_shape_reads_config_and_weight_sizes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4})
    )
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 500)
    assert model_shape(tmp_path) == ModelShape(weights_bytes=1500, attention_heads=8, kv_heads=2, layers=4)
    assert model_shape(tmp_path / "missing") is None


def test_a_worker_whose_model_does_not_fit_exits_2_naming_the_fix(tmp_path: Path, nats_server) -> None:  # type: ignore[no-untyped-def]
    """The real CLI, before any weight is loaded (the model dir is a config and sparse weights)."""
    model = tmp_path / "big-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 8}))
    with (model / "model.safetensors").open("wb") as handle:
        handle.truncate(3 * GB)  # sparse: takes no disk
    code, out = _run_cli(
        ["run", "--mode", "worker", "--model", str(model)], nats_server.url, MLXCLUSTER_WORKER_MEMORY_BUDGET_GB="1"
    )
    assert code == 2, out
    assert "do not fit the memory this worker may use" in out and "--group NAME --group-size N" in out


def test_a_group_that_does_not_divide_the_model_exits_2(tmp_path: Path, nats_server) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 9, "num_key_value_heads": 3}))
    argv = ["run", "--mode", "worker", "--model", str(model), "--group", "g", "--group-size", "2"]
    code, out = _run_cli(argv, nats_server.url)
    assert code == 2, out
    assert "group of 2 does not divide the model's 9 attention heads" in out


def test_a_pipeline_group_of_a_model_without_pipelining_exits_2(tmp_path: Path, nats_server) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30})
    )
    argv = ["run", "--mode", "worker", "--model", str(model), "--group", "g", "--group-size", "3"]
    code, out = _run_cli([*argv, "--parallel", "pipeline"], nats_server.url)
    assert code == 2, out
    assert "no pipeline parallelism for llama models; use --parallel tensor" in out


def _run_cli(args: list[str], nats_url: str, **env: str) -> tuple[int, str]:
    """Run ``mlxcluster`` as a worker on ``nats_url``; placement fails before any weight is read."""
    import subprocess

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLXCLUSTER_") or k == "MLXCLUSTER_MODELS_DIR"}
    full_env |= {"MLXCLUSTER_NATS_MODE": "external", "MLXCLUSTER_NATS_URL": nats_url, **env}
    done = subprocess.run(
        [sys.executable, "-m", "mlxcluster", *args], env=full_env, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout + done.stderr


# --- rendezvous over the real nats-server -----------------------------------------------------


async def _members(config, count: int, size: int, **settings) -> tuple[list[Bus], list[Rendezvous]]:  # type: ignore[no-untyped-def]
    buses = [await Bus.connect(config.nats, name=f"m{i}", attempts=5) for i in range(count)]
    group = GroupSection(name="g1", size=size, rendezvous_timeout_s=5.0, **settings)
    members = [Rendezvous(bus, group, f"host-{'cab'[i]}", "demo") for i, bus in enumerate(buses)]
    for member in members:
        await member.start()
    return buses, members


async def test_members_agree_on_one_rank_order_and_hostfile(cluster_config, nats_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    buses, members = await _members(cluster_config, 3, 3)
    try:
        formed = await asyncio.gather(*(m.form(10.0) for m in members))
        orders = [[h.member_id for h in f] for f in formed]
        assert orders == [["host-a", "host-b", "host-c"]] * 3  # by member id, the same everywhere
        hostfiles = [json.loads(Path(m.write_hostfile(str(tmp_path))).read_text()) for m in members]
        assert hostfiles[0] == hostfiles[1] == hostfiles[2] == [[h.address] for h in formed[0]]
        info = members[0].group_info("ring")
        assert [(m.rank, m.member_id) for m in info.members] == [(0, "host-a"), (1, "host-b"), (2, "host-c")]
        assert members[0].lost_member(1.0) is None
        await members[2].close()  # host-b stops saying hello
        await buses[2].close()
        for _ in range(100):
            lost = members[0].lost_member(0.5)
            if lost is not None:
                break
            await asyncio.sleep(0.1)
        assert lost is not None and "host-b (rank 1" in lost and "gone" in lost
    finally:
        for member, bus in zip(members, buses, strict=True):
            await member.close()
            await bus.close()


async def test_a_pinned_rank_comes_first(cluster_config, nats_server) -> None:  # type: ignore[no-untyped-def]
    buses, members = await _members(cluster_config, 2, 2)
    members[0].settings = GroupSection(name="g1", size=2, rank=0)  # host-c; host-a would be first by id
    try:
        formed = await asyncio.gather(*(m.form(10.0) for m in members))
        assert [h.member_id for h in formed[0]] == [h.member_id for h in formed[1]] == ["host-c", "host-a"]
    finally:
        for member, bus in zip(members, buses, strict=True):
            await member.close()
            await bus.close()


async def test_rendezvous_times_out_naming_who_is_there(cluster_config, nats_server) -> None:  # type: ignore[no-untyped-def]
    buses, members = await _members(cluster_config, 2, 3)
    try:
        with pytest.raises(RendezvousError, match=r"did not form within 1 s: 2 of 3 members heard \(host-a, host-c\)"):
            await members[0].form(1.0)
    finally:
        for member, bus in zip(members, buses, strict=True):
            await member.close()
            await bus.close()


async def test_a_member_of_another_size_is_ignored(cluster_config, nats_server) -> None:  # type: ignore[no-untyped-def]
    buses, members = await _members(cluster_config, 2, 2)
    odd_bus = await Bus.connect(cluster_config.nats, name="odd", attempts=5)
    odd = Rendezvous(odd_bus, GroupSection(name="g1", size=3), "host-z", "demo")
    await odd.start()
    try:
        formed = await asyncio.gather(*(m.form(10.0) for m in members))
        assert [h.member_id for h in formed[0]] == ["host-a", "host-c"]
    finally:
        for member, bus in [*zip(members, buses, strict=True), (odd, odd_bus)]:
            await member.close()
            await bus.close()


# --- configuration and dual mode --------------------------------------------------------------


def test_group_settings_from_the_environment() -> None:
    config = load(None, env={"MLXCLUSTER_WORKER_GROUP_NAME": "big", "MLXCLUSTER_WORKER_GROUP_SIZE": "3"})
    assert (config.worker.group.name, config.worker.group.size, config.worker.group.parallel) == ("big", 3, "tensor")
    with pytest.raises(ConfigError, match="worker.group.name"):
        load(None, env={"MLXCLUSTER_WORKER_GROUP_NAME": "a.b"})  # a NATS subject token


def test_dual_mode_starts_local_groups() -> None:
    config = make_config(worker={"group": {"size": 3}})
    supervisor = Supervisor(config, workers=6)
    workers = [s for s in supervisor.specs("nats://127.0.0.1:1") if s.name.startswith("worker")]
    names = [(s.env["MLXCLUSTER_WORKER_GROUP_NAME"], s.env["MLXCLUSTER_WORKER_GROUP_RANK"]) for s in workers]
    host = names[0][0].rsplit("-g", 1)[0]
    assert names == [(f"{host}-g{g}", str(r)) for g in (1, 2) for r in range(3)]
    assert supervisor.check_groups() is None
    assert Supervisor(config, workers=4).check_groups() == "--workers 4 is not a multiple of --group-size 3"


async def test_dual_mode_refuses_workers_that_do_not_make_whole_groups() -> None:
    config = make_config(worker={"group": {"size": 3}})
    from mlxcluster.errors import NodeError

    with pytest.raises(NodeError, match="not a multiple"):
        await Supervisor(config, workers=2).run(asyncio.Event())


# --- the broadcast operations -----------------------------------------------------------------


def test_operations_round_trip_compactly() -> None:
    ops = [
        InsertOp(
            uids=[4],
            segments=[[[1, 2, 3]]],
            max_tokens=[16],
            all_tokens=[[]],
            samplers=[SamplerSpec(0.7, 0.9, 0, 0.0, 12345)],
            penalties=[1.1],
            cache_keys=[[1, 2]],
            cached=[2],
        ),
        RemoveOp(uids=[3], keep_caches=True),
        StoreOp(tokens=[1, 2, 3, 9]),
        StepOp(),
    ]
    data = encoder.encode(ops)
    assert decoder.decode(data) == ops
    assert len(encoder.encode([StepOp()])) < 16  # the step every decode broadcasts stays tiny


# --- the watchdog and a broken channel ----------------------------------------------------------


def test_a_section_that_overruns_its_timeout_is_reported_once() -> None:
    import threading
    import time

    from mlxcluster.worker.group_channel import Watchdog

    fired: list[tuple[str, float]] = []
    done = threading.Event()

    def on_stall(what: str, seconds: float) -> None:
        fired.append((what, seconds))
        done.set()

    watchdog = Watchdog(0.2, on_stall, poll_s=0.02)
    try:
        with watchdog.guard("a quick step"):
            pass
        with watchdog.guard("a stuck collective"):
            assert done.wait(10)  # the section is still running when the watchdog speaks
            time.sleep(0.1)
        assert len(fired) == 1 and fired[0][0] == "a stuck collective" and fired[0][1] > 0.2
    finally:
        watchdog.stop()


def test_a_broken_channel_refuses_every_further_collective() -> None:
    from mlxcluster.worker.group_channel import Channel, GroupBroken

    reasons: list[str] = []
    channel = Channel(stall_timeout_s=5, on_broken=reasons.append)
    try:
        with pytest.raises(GroupBroken, match="peer was lost"), channel.guarded("a model step"):
            raise RuntimeError("[ring] connection to a peer was lost")
        assert reasons == ["a model step failed: [ring] connection to a peer was lost"]
        with pytest.raises(GroupBroken):
            channel.broadcast(b"x")
        channel.fail("another reason")
        assert len(reasons) == 1  # the first reason wins; the owner hears once
        other = Channel(stall_timeout_s=5, on_broken=reasons.append)
        with pytest.raises(ValueError), other.guarded("x"):
            raise ValueError("not a collective failure: raised as is")
        assert other.broken is None
        other.close()
    finally:
        channel.close()


# --- the followers' prompt cache ----------------------------------------------------------------


def test_a_follower_keeps_what_rank_0_stored_and_hands_out_trimmed_copies() -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlxcluster.worker.group_cache import FollowerCache

    kv = KVCache()
    kv.update_and_fetch(mx.zeros((1, 1, 5, 4)), mx.zeros((1, 1, 5, 4)))
    cache = FollowerCache()
    cache.finished([1, 2, 3, 4, 5], [kv])
    cache.store([1, 2, 3, 4, 5])
    copy = cache.take([1, 2, 3, 4, 5], 3)  # rank 0 reused 3 of the entry's 5 tokens
    assert copy[0].offset == 3 and cache.entries[(1, 2, 3, 4, 5)][0].offset == 5  # a copy; the entry is intact
    cache.new_step()
    with pytest.raises(KeyError):  # rank 0 can only store what finished since the last step
        cache.store([9, 9])
    cache.drop([1, 2, 3, 4, 5])
    assert cache.entries == {}


# --- dozing: an idle group's followers leave the ring -------------------------------------------


def test_an_idle_rank_0_lets_the_followers_doze_and_wakes_them_for_its_next_broadcast() -> None:
    """The first idle tick broadcasts a DozeOp (with what was pending), later ticks nothing; the next broadcast
    is preceded by the wake of that doze and followed by the end of its resends. Without a waker, ticks go on."""
    from mlxcluster.worker.group_channel import Channel
    from mlxcluster.worker.group_engine import BroadcastGenerator
    from mlxcluster.worker.group_ops import DozeOp, ResetOp

    events: list[tuple[Any, ...]] = []

    class Recording(Channel):  # the ring's broadcast, seen from rank 0 of a group of one
        def broadcast(self, payload: bytes | None = None) -> bytes:
            events.append(("broadcast", decoder.decode(payload or b"")))
            return payload or b""

    class Waker:
        def start(self, doze: str) -> None:
            events.append(("wake", doze))

        def stop(self, doze: str) -> None:
            events.append(("woken", doze))

    class Inner:
        prefill_step_size = 32

        def next(self) -> Any:
            events.append(("model step",))
            return [], []

    channel = Recording(stall_timeout_s=5, on_broken=lambda _reason: None)
    reset = ResetOp(4, 4, 32)
    try:
        generator = BroadcastGenerator(Inner(), channel, reset, None, waker=Waker())  # type: ignore[arg-type]
        generator.tick()
        assert events == []  # not idle long enough yet
        generator._last_sent -= 1
        generator.tick()
        (kind, ops), *_ = events
        doze = generator.dozing
        assert kind == "broadcast" and ops == [reset, DozeOp(doze)] and doze  # type: ignore[arg-type]
        events.clear()
        generator._last_sent -= 10
        generator.tick()
        assert events == []  # dozing: nothing more on the ring
        generator.next()
        assert events == [
            ("wake", doze),
            ("broadcast", [StepOp(prefill_step_size=32)]),
            ("woken", doze),
            ("model step",),
        ]
        assert generator.dozing is None

        events.clear()
        plain = BroadcastGenerator(Inner(), channel, reset, None)  # type: ignore[arg-type]
        plain._last_sent -= 1
        plain.tick()
        plain._last_sent -= 1
        plain.tick()
        assert events == [("broadcast", [reset]), ("broadcast", [])] and plain.dozing is None
    finally:
        channel.close()


def test_rank_0_ticks_only_when_its_loop_has_nothing_to_do() -> None:
    """A slow step between two busy turns is no idleness: no doze mid-request."""
    from collections import deque
    from types import SimpleNamespace

    from mlxcluster.worker.group_engine import GroupEngine

    ticks: list[int] = []
    generator = SimpleNamespace(tick=lambda: ticks.append(1))
    for active, waiting, expected in (({1: "job"}, deque(), 0), ({}, deque(["job"]), 0), ({}, deque(), 1)):
        engine = SimpleNamespace(_loop=SimpleNamespace(generator=generator, active=active, waiting=waiting))
        ticks.clear()
        GroupEngine._on_turn(engine)  # type: ignore[arg-type]
        assert len(ticks) == expected


@pytest.mark.usefixtures("nats_server")
async def test_a_wake_over_nats_ends_the_doze_it_names(cluster_config: Any) -> None:
    from mlxcluster.worker import group_wake
    from mlxcluster.worker.group_wake import WakeSender, WakeSignal

    bus = await Bus.connect(cluster_config.nats, name="test-wake", attempts=5)
    signal = WakeSignal()
    hearing = asyncio.create_task(signal.listen(bus, "g1"))
    other = asyncio.create_task(WakeSignal().listen(bus, "g2"))
    try:
        await asyncio.sleep(0.1)  # subscribed
        sender = WakeSender(bus, "g1", asyncio.get_running_loop())
        stray = WakeSender(bus, "g2", asyncio.get_running_loop())
        stray.start("d1")  # another group's wake of the same name
        await asyncio.sleep(0.2)
        assert not signal.wait("d1", 0.01)
        stray.stop("d1")
        sender.start("d1")
        assert await asyncio.to_thread(signal.wait, "d1", 5)
        await asyncio.sleep(group_wake.RESEND_S * 2.5)
        sender.stop("d1")
        await asyncio.sleep(0.05)
        resent = sender.sent
        assert resent >= 2  # published again until told the followers are back
        await asyncio.sleep(group_wake.RESEND_S * 2)
        assert sender.sent == resent  # and then no more
        assert not signal.wait("d2", 0.01)  # a doze no wake named yet
    finally:
        hearing.cancel()
        other.cancel()
        await bus.close()


def test_a_dozing_follower_ends_its_doze_when_the_group_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxcluster.protocol import GroupInfo
    from mlxcluster.worker import group_engine
    from mlxcluster.worker.group_channel import GroupBroken
    from mlxcluster.worker.group_engine import GroupFollower
    from mlxcluster.worker.group_ops import Formation

    monkeypatch.setattr(group_engine, "DOZE_CHECK_S", 0.02)
    formation = Formation(1, 3, "tensor", "ring", "", GroupInfo(name="g"), 5.0)
    follower = GroupFollower("model", formation=formation, on_broken=lambda _reason: None)
    try:
        follower.wake.heard("d1")
        follower._doze("d1")  # its wake came first: no wait
        follower.channel.fail("rank 0's hellos stopped")
        with pytest.raises(GroupBroken, match="hellos stopped"):
            follower._doze("d2")
    finally:
        follower.channel.close()
