"""Metrics exporters: the event feed, the built-in ``prometheus`` and ``log`` exporters, the ``jsonl`` plugin
against a controller with echo workers, slow and broken exporters, unknown names."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from cluster_harness import Cluster, RunningController, sse_events, wait_until, with_sections
from loopback import free_port
from prometheus_client.parser import text_string_to_metric_families

from mlxcluster.api import (
    ClusterSnapshot,
    MetricsEvent,
    RequestFinished,
    RequestRetried,
    WorkerStatusChanged,
    hookimpl,
)
from mlxcluster.builtin.exporters import LogExporter, PrometheusExporter
from mlxcluster.bus import Bus
from mlxcluster.config import Config, MetricsSection, PluginsSection
from mlxcluster.controller.app import create_app
from mlxcluster.controller.metering.latency_tally import LatencyTally, merge_latency
from mlxcluster.controller.metering.metrics_feed import (
    METRICS,
    ExporterError,
    ExporterRunner,
    MetricsFeed,
    build_metrics_feed,
)
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.plugins import PluginManager, get_plugin_manager
from mlxcluster.protocol import LatencyCounts

USER = [{"role": "user", "content": "one two three four five"}]


# --- test exporters, registered through the hook by a fixture plugin ---------------------------


class Recorder:
    """Keeps every event (async: runs on the loop)."""

    instances: list[Recorder] = []

    def __init__(self) -> None:
        self.events: list[MetricsEvent] = []
        self.started = self.closed = False
        Recorder.instances.append(self)

    async def start(self) -> None:
        self.started = True

    async def export(self, event: MetricsEvent) -> None:
        self.events.append(event)

    async def close(self) -> None:
        self.closed = True

    def finished(self) -> list[RequestFinished]:
        return [e for e in self.events if isinstance(e, RequestFinished)]


class SlowThreadExporter:
    """Blocks its thread for ``delay_s`` per event (a slow disk or network)."""

    def __init__(self, delay_s: float = 0.2) -> None:
        self.delay_s = float(delay_s)
        self.count = 0

    def export(self, event: MetricsEvent) -> None:
        time.sleep(self.delay_s)
        self.count += 1


class SlowAsyncExporter:
    """Awaits ``delay_s`` per event."""

    def __init__(self, delay_s: float = 0.2) -> None:
        self.delay_s = float(delay_s)
        self.count = 0

    async def export(self, event: MetricsEvent) -> None:
        await asyncio.sleep(self.delay_s)
        self.count += 1


class Broken:
    def export(self, event: MetricsEvent) -> None:
        raise RuntimeError("exporter bug")


class TestExporters:
    @hookimpl
    def mlxcluster_register_exporters(self, register):  # type: ignore[no-untyped-def]
        register("recorder", Recorder, "Keeps events in memory.")
        register("slow_thread", SlowThreadExporter, "Sleeps on its thread.")
        register("slow_async", SlowAsyncExporter, "Sleeps on the loop.")
        register("broken", Broken, "Raises on every event.")


@pytest.fixture
def pm() -> Iterator[PluginManager]:
    manager = get_plugin_manager(PluginsSection(), env={})
    plugin = TestExporters()
    manager.register(plugin, name="test-exporters")
    Recorder.instances.clear()
    yield manager
    manager.unregister(plugin)


async def start_controller(cluster: Cluster, config: Config, pm: PluginManager) -> RunningController:
    """Like the harness's ``start_controller``, with our plugin manager."""
    bus = await Bus.connect(config.nats, name="test-controller", attempts=5)
    app = create_app(config, bus, pm)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    cluster.controller = RunningController(app=app, runner=runner, bus=bus, port=port)
    return cluster.controller


def metrics_config(config: Config, *exporters: str, **settings: dict[str, Any]) -> Config:
    return with_sections(
        config, metrics={"exporters": list(exporters), "snapshot_interval_s": 0.05, "settings": settings}
    )


@pytest.fixture
async def cluster(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    """Two echo workers (``w1``, ``w2``) started; each test starts its own controller."""
    async with Cluster(cluster_config) as running:
        await running.start_worker("w1")
        await running.start_worker("w2")
        yield running


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics body, keyed by (sample name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(controller: RunningController, path: str = "/metrics") -> tuple[str, str]:
    async with controller.session().get(controller.url + path) as resp:
        assert resp.status == 200
        return await resp.text(), resp.headers["Content-Type"]


async def traffic(controller: RunningController) -> tuple[int, int]:
    """3 chats (one streamed with usage) and 1 unknown-model request; return summed (prompt, completion) usage."""
    client = controller.client(api_key="key")
    prompt = completion = 0
    for _ in range(2):
        reply = await client.chat.completions.create(model="echo", messages=USER)
        prompt += reply.usage.prompt_tokens
        completion += reply.usage.completion_tokens
    stream = await client.chat.completions.create(
        model="echo", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.usage is not None:
            prompt += chunk.usage.prompt_tokens
            completion += chunk.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=USER)
    return prompt, completion


# --- prometheus -------------------------------------------------------------------------------


async def test_metrics_endpoint_after_known_traffic(cluster: Cluster) -> None:
    config = with_sections(metrics_config(cluster.config, "prometheus"), controller={"api_keys": ["key"]})
    controller = await start_controller(cluster, config, get_plugin_manager(config.plugins, env={}))
    await wait_until(lambda: controller.ctx.registry.stats().online == 2, what="2 workers online")  # /api needs a key
    prompt, completion = await traffic(controller)
    assert prompt > 0 and completion > 0

    async def settled() -> dict | None:
        values = samples((await scrape(controller))[0])
        done = values.get(("mlxcluster_request_duration_seconds_count", ()), 0) == 4
        idle = values[("mlxcluster_inflight_requests", ())] == 0  # gauges come from a snapshot after the traffic
        return values if done and idle and values[("mlxcluster_workers", (("status", "online"),))] == 2 else None

    values = await wait_until(settled, what="4 requests in /metrics")
    text, content_type = await scrape(controller)  # no API key needed: /metrics is outside /v1 and /api
    assert content_type.startswith("text/plain; version=0.0.4")
    assert values[("mlxcluster_requests_total", (("model", "echo"), ("status", "ok")))] == 3
    assert values[("mlxcluster_requests_total", (("model", "unknown"), ("status", "error")))] == 1
    assert not any(
        name == "mlxcluster_requests_total" and ("model", "no-such-model") in labels for name, labels in values
    )
    assert values[("mlxcluster_tokens_total", (("kind", "completion"),))] == completion
    assert values[("mlxcluster_tokens_total", (("kind", "prompt"),))] == prompt
    assert values[("mlxcluster_ttft_seconds_count", ())] == 3
    assert values[("mlxcluster_inter_token_latency_seconds_count", ())] > 0
    assert values[("mlxcluster_inflight_requests", ())] == 0
    assert values[("mlxcluster_queue_depth", ())] == 0
    assert values[("mlxcluster_workers", (("status", "offline"),))] == 0
    assert {labels for name, labels in values if name == "mlxcluster_worker_tokens_per_second"} == {
        (("worker", "w1"),),
        (("worker", "w2"),),
    }
    assert values[("mlxcluster_retries_total", ())] == 0
    assert values[("mlxcluster_invalid_messages_total", ())] == 0
    assert values[("mlxcluster_tier", (("figure", "controllers_online"),))] == 1  # this controller, from its heartbeat
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "mlxcluster_requests",
        "mlxcluster_request_duration_seconds",
        "mlxcluster_ttft_seconds",
        "mlxcluster_inter_token_latency_seconds",
        "mlxcluster_tokens",
        "mlxcluster_inflight_requests",
        "mlxcluster_queue_depth",
        "mlxcluster_workers",
        "mlxcluster_tier",
        "mlxcluster_tier_request_duration_seconds",  # this controller's own heartbeat, summed
        "mlxcluster_tier_ttft_seconds",
        "mlxcluster_worker_tokens_per_second",
        "mlxcluster_retries",
        "mlxcluster_invalid_messages",
        "mlxcluster_migrations",
        "mlxcluster_cache_index_entries",  # the index exists with any strategy; no worker here has a cache
        "mlxcluster_cache_index_max_entries",
        "mlxcluster_cache_index_evictions",
        "mlxcluster_cache_index_events",
        "mlxcluster_key_requests",
        "mlxcluster_key_tokens",
        "mlxcluster_key_rate_limited",
        "mlxcluster_nats_connected",  # the controller's NATS connection (echo workers report no accelerator)
        "mlxcluster_nats_reconnects",
        "mlxcluster_nats_disconnects",
        "mlxcluster_nats_slow_consumer_drops",
        "mlxcluster_nats_errors",
        "mlxcluster_nats_messages",
        "mlxcluster_nats_bytes",
    } == {name for name in families if name.startswith("mlxcluster_")}
    assert values[("mlxcluster_nats_connected", ())] == 1
    assert values[("mlxcluster_nats_reconnects_total", ())] == 0
    assert values[("mlxcluster_nats_messages_total", (("direction", "in"),))] > 0  # heartbeats, frames
    assert values[("mlxcluster_nats_bytes_total", (("direction", "out"),))] > 0  # requests, announce
    key = ("key", "api_keys[0]")  # the plain api_keys entry, by its position
    assert values[("mlxcluster_key_requests_total", (key, ("status", "ok")))] == 3
    assert values[("mlxcluster_key_requests_total", (key, ("status", "error")))] == 1
    assert values[("mlxcluster_key_tokens_total", (key, ("kind", "completion")))] == completion

    await controller.bus.nc.publish(controller.bus.subjects.heartbeat, b"not msgpack or json")  # a malformed message

    async def invalid_counted() -> bool:
        return samples((await scrape(controller))[0])[("mlxcluster_invalid_messages_total", ())] == 1

    await wait_until(invalid_counted, what="the invalid message in /metrics")


async def test_retries_are_counted(cluster: Cluster) -> None:
    config = with_sections(metrics_config(cluster.config, "prometheus"), load_balancing={"strategy": "round_robin"})
    await cluster.start_fake("a-gone", None)  # registered, but nobody answers its inference subject
    controller = await start_controller(cluster, config, get_plugin_manager(config.plugins, env={}))
    await controller.wait_online("a-gone", "w1", "w2")
    client = controller.client()
    for _ in range(3):
        await client.chat.completions.create(model="echo", messages=USER)
    retries = controller.ctx.dispatcher.stats.retries
    assert retries >= 1

    async def counted() -> bool:
        values = samples((await scrape(controller))[0])
        return values[("mlxcluster_requests_total", (("model", "echo"), ("status", "ok")))] == 3

    await wait_until(counted, what="3 requests in /metrics")
    assert samples((await scrape(controller))[0])[("mlxcluster_retries_total", ())] == retries


async def test_prometheus_exporter_on_its_own() -> None:
    exporter = PrometheusExporter(path="/custom")
    registry_before = exporter.registry
    await exporter.export(
        ClusterSnapshot(time=1, worker_tokens_per_second={"a": 10.0, "b": 20.0}, invalid_messages_total=2)
    )
    await exporter.export(ClusterSnapshot(time=2, worker_tokens_per_second={"b": 25.0}, invalid_messages_total=5))
    await exporter.export(RequestRetried(time=3, request_id="r", model="m", worker="a", attempt=2, reason="gone"))
    values = samples(exporter.text().decode())
    assert values[("mlxcluster_worker_tokens_per_second", (("worker", "b"),))] == 25.0
    assert ("mlxcluster_worker_tokens_per_second", (("worker", "a"),)) not in values  # gone workers are removed
    assert values[("mlxcluster_invalid_messages_total", ())] == 5
    assert values[("mlxcluster_retries_total", ())] == 1
    assert [route.path for route in exporter.routes()] == ["/custom"]
    gaps = (0.001, 0.0011, 0.002, 7.0)  # "le" is inclusive: 0.001 falls in the 0.001 bucket
    await exporter.export(
        RequestFinished(time=4, request_id="r", model="m", status="ok", duration_s=1, inter_token_s=gaps)
    )
    values = samples(exporter.text().decode())
    itl = "mlxcluster_inter_token_latency_seconds"
    assert [values[(f"{itl}_bucket", (("le", le),))] for le in ("0.001", "0.0025", "1.0", "+Inf")] == [1, 3, 3, 4]
    assert values[(f"{itl}_count", ())] == 4 and values[(f"{itl}_sum", ())] == pytest.approx(sum(gaps))
    assert PrometheusExporter().registry is not registry_before  # one registry per exporter, no global state
    with pytest.raises(ValueError, match="must start with '/'"):
        PrometheusExporter(path="metrics")


async def test_prometheus_speculation_series_follow_the_snapshot() -> None:
    exporter = PrometheusExporter()
    await exporter.export(ClusterSnapshot(time=1))
    assert not any(name.startswith("mlxcluster_worker_speculative") for name, _ in samples(exporter.text().decode()))
    spec = {
        "a": {
            "steps": 4,
            "drafted": 10,
            "accepted": 7,
            "model_drafted": 3,
            "model_accepted": 2,
            "acceptance_rate": 0.7,
        },
        "b": {"steps": 0, "drafted": 0, "accepted": 0, "acceptance_rate": 0.0},
    }
    await exporter.export(ClusterSnapshot(time=2, worker_speculation=spec))
    text = exporter.text().decode()
    assert "# TYPE mlxcluster_worker_speculative_accepted_tokens_total counter" in text
    assert "# TYPE mlxcluster_worker_speculative_acceptance_rate gauge" in text
    values = samples(text)
    a, b = (("worker", "a"),), (("worker", "b"),)
    assert values[("mlxcluster_worker_speculative_steps_total", a)] == 4
    assert values[("mlxcluster_worker_speculative_drafted_tokens_total", a)] == 10
    assert values[("mlxcluster_worker_speculative_accepted_tokens_total", a)] == 7
    assert values[("mlxcluster_worker_speculative_acceptance_rate", a)] == 0.7
    assert values[("mlxcluster_worker_speculative_draft_model_drafted_tokens_total", a)] == 3
    assert values[("mlxcluster_worker_speculative_draft_model_accepted_tokens_total", a)] == 2
    assert values[("mlxcluster_worker_speculative_drafted_tokens_total", b)] == 0  # zeros are series too
    await exporter.export(ClusterSnapshot(time=3, worker_speculation={"b": spec["b"]}))
    values = samples(exporter.text().decode())
    assert ("mlxcluster_worker_speculative_steps_total", a) not in values  # gone workers are removed
    assert ("mlxcluster_worker_speculative_acceptance_rate", b) in values


def _finished(duration_s: float, ttft_s: float | None) -> RequestFinished:
    return RequestFinished(
        time=1, request_id="r", model="echo", worker="w1", status="ok", duration_s=duration_s, ttft_s=ttft_s,
        prompt_tokens=3, completion_tokens=5,
    )  # fmt: skip


async def test_the_tiers_latency_histograms_sum_every_controllers_heartbeat() -> None:
    first, second = LatencyTally(), LatencyTally()
    first.on_finished(_finished(0.07, 0.003))
    second.on_finished(_finished(0.07, None))  # no first token: counted in the duration only
    second.on_finished(_finished(700.0, 0.02))  # beyond the last bound: +Inf
    old_version = {"ttft_seconds": LatencyCounts(counts=[1, 2], sum=9.0)}  # another layout: left out
    merged = merge_latency([first.counts(), second.counts(), old_version])
    duration, ttft = merged["request_duration_seconds"], merged["ttft_seconds"]
    assert duration.counts[1] == 2 and duration.counts[-1] == 1 and sum(duration.counts) == 3
    assert duration.sum == pytest.approx(700.14) and sum(ttft.counts) == 2 and ttft.sum == pytest.approx(0.023)
    assert second.prompt_tokens == 6 and second.completion_tokens == 10

    exporter = PrometheusExporter()
    await exporter.export(ClusterSnapshot(time=1))
    assert not any(name.startswith("mlxcluster_tier_") for name, _ in samples(exporter.text().decode()))
    await exporter.export(ClusterSnapshot(time=2, tier_latency=merged))
    values = samples(exporter.text().decode())
    assert values[("mlxcluster_tier_request_duration_seconds_count", ())] == 3
    assert values[("mlxcluster_tier_request_duration_seconds_bucket", (("le", "0.1"),))] == 2
    assert values[("mlxcluster_tier_request_duration_seconds_bucket", (("le", "600.0"),))] == 2
    assert values[("mlxcluster_tier_ttft_seconds_bucket", (("le", "0.005"),))] == 1
    assert values[("mlxcluster_tier_ttft_seconds_count", ())] == 2


# --- the event feed ---------------------------------------------------------------------------


async def test_events_from_a_controller(cluster: Cluster, pm: PluginManager) -> None:
    config = metrics_config(cluster.config, "recorder")
    controller = await start_controller(cluster, config, pm)
    await controller.wait_online("w1", "w2")
    (recorder,) = Recorder.instances
    assert recorder.started
    await traffic(controller)
    feed = controller.app[METRICS]
    await wait_until(lambda: len(recorder.finished()) == 4, what="4 RequestFinished events")
    ok = [e for e in recorder.finished() if e.status == "ok"]
    assert len(ok) == 3 and {e.worker for e in ok} <= {"w1", "w2"}
    for event in ok:
        assert event.model == "echo" and event.model_known and event.attempts == 1
        assert event.ttft_s is not None and 0 < event.ttft_s <= event.duration_s
        assert event.completion_tokens > 0 and event.prompt_tokens > 0
        assert all(gap >= 0 for gap in event.inter_token_s)
    assert sum(e.stream for e in ok) == 1
    (missing,) = [e for e in recorder.finished() if e.status == "error"]
    assert (missing.error, missing.worker, missing.model_known) == ("model_not_found", None, False)
    changes = [e for e in recorder.events if isinstance(e, WorkerStatusChanged)]
    assert {(e.worker, e.current) for e in changes} >= {("w1", "online"), ("w2", "online")}

    def last_snapshot() -> ClusterSnapshot | None:
        snapshot = next(e for e in reversed(recorder.events) if isinstance(e, ClusterSnapshot))
        return snapshot if snapshot.requests_total == 3 and snapshot.inflight == 0 else None  # not mid-request

    snapshot = await wait_until(last_snapshot, what="a snapshot after the traffic")
    assert snapshot.workers["online"] == 2 and snapshot.inflight == 0 and snapshot.capacity > 0
    assert feed.dropped == 0
    await controller.stop()
    cluster.controller = None
    assert recorder.closed


async def test_a_client_that_goes_away_is_cancelled(cluster: Cluster, pm: PluginManager) -> None:
    config = metrics_config(cluster.config, "recorder")
    await cluster.start_worker("slow", models=["slow"], token_delay_ms=50)
    controller = await start_controller(cluster, config, pm)
    await controller.wait_online("slow")
    (recorder,) = Recorder.instances
    body = {"model": "slow", "messages": [{"role": "user", "content": " ".join(["x"] * 200)}], "stream": True}
    async with controller.session().post(controller.url + "/v1/chat/completions", json=body) as resp:
        events = sse_events(resp)
        for _ in range(3):
            await anext(events)
    event = await wait_until(lambda: next(iter(recorder.finished()), None), what="the RequestFinished event")
    assert event.status == "cancelled" and event.worker == "slow" and event.ttft_s is not None


async def test_slow_exporters_never_slow_requests(cluster: Cluster, pm: PluginManager) -> None:
    async def timed(config: Config, manager: PluginManager) -> float:
        controller = await start_controller(cluster, config, manager)
        await controller.wait_online("w1", "w2")
        client = controller.client()
        started = time.perf_counter()
        for _ in range(20):
            await client.chat.completions.create(model="echo", messages=USER)
        elapsed = time.perf_counter() - started
        await controller.stop()
        cluster.controller = None
        return elapsed

    baseline = await timed(cluster.config, pm)
    slow_config = metrics_config(
        cluster.config, "slow_thread", "slow_async", slow_thread={"delay_s": 0.5}, slow_async={"delay_s": 0.5}
    )
    started = time.perf_counter()
    with_slow = await timed(slow_config, pm)
    # 20 requests → 20+ events per exporter at 0.5 s each: 10 s if anything waited for them
    assert with_slow < baseline + 2.0, (baseline, with_slow)
    assert time.perf_counter() - started < 8.0  # closing does not wait for the backlog either


async def test_full_queue_drops_and_counts() -> None:
    slow = SlowThreadExporter(delay_s=0.2)
    recorder = Recorder()
    feed = MetricsFeed(
        [ExporterRunner("slow", slow, queue_size=3), ExporterRunner("recorder", recorder, queue_size=100)]
    )
    await feed.start()
    started = time.perf_counter()
    for i in range(20):
        feed.emit(RequestRetried(time=i, request_id=f"r{i}", model="m", worker="w", attempt=2, reason="x"))
    # emit never waits: waiting on the slow exporter would take 17 x 0.2 s; 1 s leaves room for a loaded machine
    assert time.perf_counter() - started < 1.0
    assert await feed.drained(timeout=5)
    assert len(recorder.events) == 20  # a slow exporter does not starve the others
    assert feed.dropped == 20 - slow.count and 16 <= feed.dropped <= 17
    await feed.close()


async def test_a_broken_exporter_is_isolated(caplog: pytest.LogCaptureFixture) -> None:
    broken, recorder = ExporterRunner("broken", Broken()), ExporterRunner("recorder", Recorder())
    feed = MetricsFeed([broken, recorder])
    await feed.start()
    with caplog.at_level(logging.ERROR, logger="mlxcluster.controller.metering.metrics_feed"):
        for i in range(3):
            feed.emit(RequestRetried(time=i, request_id=f"r{i}", model="m", worker="w", attempt=2, reason="x"))
        assert await feed.drained()
    await feed.close()
    assert broken.failed == 3 and len(recorder.exporter.events) == 3
    assert "exporter broken failed" in caplog.text and "exporter bug" in caplog.text


# --- configuration errors ---------------------------------------------------------------------


def test_unknown_exporter_names_the_registered_ones(pm: PluginManager) -> None:
    with pytest.raises(ExporterError) as info:
        build_metrics_feed(pm, MetricsSection(exporters=["prometheus", "statsd"]))
    message = str(info.value)
    assert message.startswith("metrics.exporters: unknown exporter 'statsd' (registered: ")
    assert "log" in message and "prometheus" in message and "recorder" in message


def test_bad_settings_name_the_key(pm: PluginManager) -> None:
    section = MetricsSection(exporters=["log"], settings={"log": {"interval": 5}})
    with pytest.raises(ExporterError, match=r"^metrics.settings.log: .*unexpected keyword argument 'interval'"):
        build_metrics_feed(pm, section)
    with pytest.raises(ExporterError, match=r"interval_s must be > 0"):
        build_metrics_feed(pm, MetricsSection(exporters=["log"], settings={"log": {"interval_s": 0}}))


def test_no_exporters_no_feed_work(pm: PluginManager) -> None:
    feed = build_metrics_feed(pm, MetricsSection())
    assert feed.runners == [] and feed.routes() == []


# --- log and jsonl ----------------------------------------------------------------------------


async def test_log_exporter_writes_summary_lines(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    config = metrics_config(cluster.config, "log", log={"interval_s": 0.2})
    with caplog.at_level(logging.INFO, logger="mlxcluster.metrics"):
        controller = await start_controller(cluster, config, get_plugin_manager(config.plugins, env={}))
        await controller.wait_online("w1", "w2")
        client = controller.client()
        for _ in range(2):
            await client.chat.completions.create(model="echo", messages=USER)

        def counted() -> bool:
            lines = [r.getMessage() for r in caplog.records if r.name == "mlxcluster.metrics"]
            return sum(int(re.match(r"metrics: (\d+) requests", line).group(1)) for line in lines) == 2

        await wait_until(counted, what="log lines covering 2 requests")
    line = next(r.getMessage() for r in caplog.records if re.match(r"metrics: [1-9]", r.getMessage()))
    assert "ok" in line and "tok/s" in line and "ttft p50" in line and "workers 2 online" in line


def test_log_exporter_summary_text() -> None:
    exporter = LogExporter(interval_s=10)
    for ttft in (0.1, 0.2, 0.3):
        exporter.export(
            RequestFinished(
                time=1, request_id="r", model="m", status="ok", duration_s=1, ttft_s=ttft, completion_tokens=5
            )
        )
    exporter.export(RequestFinished(time=1, request_id="r", model="m", status="error", error="x", duration_s=1))
    exporter.export(ClusterSnapshot(time=1, workers={"online": 3}))  # before interval_s: no line yet
    assert exporter.lines == 0
    text = exporter.summary(ClusterSnapshot(time=1, inflight=2, workers={"online": 3}), now=exporter.since + 2)
    assert text.startswith("metrics: 4 requests in 2s (3 ok, 1 error, 0 cancelled; 2.00 req/s), 15 completion tokens")
    assert "ttft p50 200ms p95 300ms" in text and "now 2 in flight" in text and "workers 3 online 0 degraded" in text


async def test_jsonl_plugin_file_after_traffic(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    config = metrics_config(cluster.config, "jsonl", "prometheus", jsonl={"path": str(path)})
    controller = await start_controller(cluster, config, get_plugin_manager(config.plugins, env={}))
    await controller.wait_online("w1", "w2")
    prompt, completion = await traffic(controller)
    await wait_until(lambda: path.is_file() and len(path.read_text().splitlines()) == 4, what="4 lines")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["status"] for line in lines] == ["ok", "ok", "ok", "error"]
    assert sum(line["completion_tokens"] for line in lines) == completion
    assert sum(line["prompt_tokens"] for line in lines) == prompt
    assert {line["worker"] for line in lines[:3]} <= {"w1", "w2"} and lines[3]["worker"] is None
    assert lines[3]["model"] == "no-such-model" and lines[3]["error"] == "model_not_found"
    for line in lines[:3]:
        assert set(line) >= {"request_id", "model", "worker", "status", "ttft_s", "duration_s", "completion_tokens"}
        assert line["request_id"].startswith("chatcmpl-") and 0 < line["ttft_s"] <= line["duration_s"]
    assert [line["stream"] for line in lines] == [False, False, True, False]


def test_exporter_settings_from_toml_and_env(tmp_path: Path) -> None:
    from mlxcluster.config import ConfigError, load

    path = tmp_path / "cluster.toml"
    path.write_text('[metrics]\nexporters = ["log"]\n[metrics.settings.log]\ninterval_s = 30\nlevel = "warning"\n')
    assert load(path, env={}).metrics.settings == {"log": {"interval_s": 30, "level": "warning"}}
    env = {"MLXCLUSTER_METRICS_SETTINGS": '{"jsonl": {"path": "r.jsonl"}}'}
    assert load(path, env=env).metrics.settings == {"jsonl": {"path": "r.jsonl"}}
    with pytest.raises(ConfigError, match="MLXCLUSTER_METRICS_SETTINGS: metrics.settings: invalid JSON object"):
        load(path, env={"MLXCLUSTER_METRICS_SETTINGS": "path=x"})
    path.write_text("[metrics.settings]\nlog = 5\n")
    with pytest.raises(ConfigError, match=r"cluster.toml: metrics.settings.log: expected object, got 5$"):
        load(path, env={})
    path.write_text("[metrics.settings.log]\ninterval_s = 1\n[metrics.settings.jsonl]\npath = {a = 1}\n")
    with pytest.raises(ConfigError, match=r"cluster.toml: metrics.settings.jsonl.path: expected .*got \{\"a\": 1\}$"):
        load(path, env={})
