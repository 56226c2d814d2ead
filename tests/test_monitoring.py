"""Request monitoring and worker telemetry: ``/api/cluster/requests`` (in flight, then finished, per key),
one access-log line per request (JSON with ``logging.format = "json"``), hardware and load figures in the
worker API, speculative decoding counts in the worker API and ``/metrics``, ``/health`` with a timestamp, and
the controller ``degraded`` while NATS is down.

Real echo workers, the real controller app, the real nats-server (stopped and restarted for the outage).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cluster_harness import Cluster, RunningController, demo_model_or_skip, wait_until, with_sections, words

from mlxcluster.bus import BusEvent
from mlxcluster.config import Config, LoggingSection
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.logsetup import JsonFormatter
from mlxcluster.protocol import SpeculationCounts
from mlxcluster.worker.echo import EchoEngine

ADMIN, ALICE, BOB = "sk-admin-aa11", "sk-alice-bb22", "sk-bob-cc33"


@pytest.fixture
async def cluster(cluster_config: Config, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    keys = [
        {"name": "ops", "key": ADMIN, "admin": True},
        {"name": "alice", "key": ALICE},
        {"name": "bob", "key": BOB},
    ]
    config = with_sections(cluster_config, controller={"keys": keys_of(keys), "recent_requests": 5})
    async with Cluster(config) as running:
        await running.start_worker("w1", token_delay_ms=30)
        controller = await running.start_controller()
        await wait_until(lambda: controller.ctx.registry.stats().online == 1, what="w1 online")
        yield running


def keys_of(entries: list[dict[str, Any]]) -> Any:
    from mlxcluster.config import from_dict

    return from_dict({"controller": {"keys": entries}}).controller.keys


async def get(controller: RunningController, path: str, key: str = ADMIN) -> tuple[int, Any]:
    async with controller.session().get(controller.url + path, headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json()


async def test_requests_in_flight_then_finished(cluster: Cluster) -> None:
    controller = cluster.controller
    assert controller is not None
    alice = controller.client(api_key=ALICE)
    stream = await alice.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": words(40)}], stream=True
    )
    chunks = aiter(stream)
    await anext(chunks)
    await anext(chunks)
    status, listing = await get(controller, "/api/cluster/requests")
    assert status == 200 and abs(listing["time"] - time.time()) < 60
    [live] = listing["in_flight"]
    assert (live["key"], live["model"], live["worker"], live["state"]) == ("alice", "echo", "w1", "streaming")
    assert live["ttft_ms"] > 0 and live["total_ms"] >= live["ttft_ms"] and live["completion_tokens"] >= 1
    assert live["attempts"] == 1 and live["migrations"] == 0
    async for _ in chunks:
        pass
    await wait_until(lambda: not controller.ctx.dispatcher.live, what="the stream finished")
    status, listing = await get(controller, "/api/cluster/requests")
    assert listing["in_flight"] == []
    [done] = listing["recent"]
    assert done["id"] == live["id"] and done["state"] == "ok" and done["finish_reason"] == "stop"
    assert done["completion_tokens"] == 40 and done["prompt_tokens"] == 40 and done["stream"] is True
    assert done["total_ms"] >= done["ttft_ms"] > 0
    assert done["queued_ms"] is None or done["queued_ms"] >= 0
    assert done["error"] is None


async def test_errors_keys_and_the_bounded_history(cluster: Cluster) -> None:
    controller = cluster.controller
    assert controller is not None
    bob = controller.client(api_key=BOB)
    for i in range(7):
        await bob.chat.completions.create(model="echo", messages=[{"role": "user", "content": words(i + 1)}])
    try:
        await bob.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    except Exception:
        pass
    status, listing = await get(controller, "/api/cluster/requests")
    assert listing["recent_capacity"] == 5 and len(listing["recent"]) == 5
    newest = listing["recent"][0]
    assert (newest["state"], newest["error"], newest["model"], newest["worker"]) == (
        "error",
        "model_not_found",
        "(unknown)",  # a name the client chose is never echoed back as a model
        None,
    )
    # a non-admin key sees only its own requests; an admin filters with ?key=
    await controller.client(api_key=ALICE).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "a"}]
    )
    _, mine = await get(controller, "/api/cluster/requests", key=BOB)
    assert {r["key"] for r in mine["recent"]} == {"bob"}
    _, filtered = await get(controller, "/api/cluster/requests?key=alice&limit=3")
    assert [r["key"] for r in filtered["recent"]] == ["alice"]
    _, errors = await get(controller, "/api/cluster/requests?state=error")
    assert [r["state"] for r in errors["recent"]] == ["error"]
    status, body = await get(controller, "/api/cluster/requests?limit=-1")
    assert status == 400 and body["error"]["param"] == "limit"
    status, body = await get(controller, "/api/cluster/requests?state=sleeping")
    assert status == 400 and body["error"]["param"] == "state"


async def test_one_access_log_line_per_request_in_json(cluster: Cluster) -> None:
    controller = cluster.controller
    assert controller is not None
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("controller"))
    access = logging.getLogger("mlxcluster.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        alice = controller.client(api_key=ALICE)
        for i in range(3):
            await alice.chat.completions.create(model="echo", messages=[{"role": "user", "content": words(i + 2)}])
    finally:
        access.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line["logger"] == "mlxcluster.access" and line["role"] == "controller"
        assert (line["key"], line["model"], line["worker"], line["status"]) == ("alice", "echo", "w1", "ok")
        assert line["completion_tokens"] == i + 2 and line["finish_reason"] == "stop"
        assert line["total_ms"] > 0 and line["ttft_ms"] > 0 and line["request_id"].startswith("chatcmpl-")
        assert ALICE not in json.dumps(line)
    assert LoggingSection(format="json").format == "json"


async def test_worker_telemetry_in_the_api(cluster: Cluster) -> None:
    controller = cluster.controller
    assert controller is not None
    client = controller.client(api_key=ALICE)
    for _ in range(3):
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": words(3)}])
    await wait_until(
        lambda: controller.ctx.registry.get("w1").requests_total >= 3, what="a heartbeat after the requests"
    )  # type: ignore[union-attr]
    status, one = await get(controller, "/api/cluster/workers/w1")
    assert status == 200
    assert one["hardware"] == {"chip": "Test CPU 9000", "cpu_cores": 4, "memory_gb": 16.0, "accelerator": "cpu"} or (
        one["hardware"]["chip"] == "Test CPU 9000" and one["hardware"]["cpu_cores"] == 4
    )
    assert one["capabilities"]["models"] == ["echo"] and one["capabilities"]["engine"] == "echo"
    assert one["cpu_percent"] is not None and one["cpu_percent"] >= 0
    assert one["rss_bytes"] > 10_000_000  # a real process's resident set
    assert abs(one["registered_at"] - time.time()) < 120 and one["started_at"] <= one["registered_at"]
    assert one["avg_latency_ms"] > 0 and one["avg_ttft_ms"] > 0 and one["latency_samples"] == 3
    assert one["drained"] is False
    _, listing = await get(controller, "/api/cluster/workers")
    assert listing["workers"][0]["rss_bytes"] == one["rss_bytes"] or listing["workers"][0]["rss_bytes"] > 0


class SpeculatingEcho(EchoEngine):
    """The echo engine reporting given speculative decoding counts (the echo engine itself never speculates)."""

    def __init__(self, counts: SpeculationCounts, **options: Any) -> None:
        super().__init__(**options)
        self.counts = counts

    def speculation_stats(self) -> SpeculationCounts | None:
        return self.counts


async def test_speculation_counts_in_the_api_and_metrics(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    from jsonschema import Draft202012Validator
    from prometheus_client.parser import text_string_to_metric_families

    config = with_sections(cluster_config, metrics={"exporters": ["prometheus"], "snapshot_interval_s": 0.05})
    async with Cluster(config) as running:
        engine = SpeculatingEcho(SpeculationCounts(steps=4, drafted=10, accepted=7, model_drafted=4, model_accepted=1))
        await running.start_worker("w-spec", engine=engine)
        await running.start_worker("w-plain")
        controller = await running.start_controller()
        await controller.wait_online("w-spec", "w-plain")

        async def reported() -> dict[str, Any] | None:
            workers = {w["id"]: w for w in await controller.workers()}
            return workers if workers.get("w-spec", {}).get("speculation") else None

        workers = await wait_until(reported, what="speculation counts in /api/cluster/workers")
        expected = {
            "steps": 4,
            "drafted": 10,
            "accepted": 7,
            "model_drafted": 4,
            "model_accepted": 1,
            "acceptance_rate": 0.7,
            "model_acceptance_rate": 0.25,
        }
        assert workers["w-spec"]["speculation"] == expected
        assert workers["w-plain"]["speculation"] is None  # reported as null, not left out
        async with controller.session().get(f"{controller.url}/api/cluster/workers/w-spec") as resp:
            assert (await resp.json())["speculation"] == expected
        async with controller.session().get(f"{controller.url}/openapi.json") as resp:
            document = await resp.json()
        schema = {"$ref": "#/components/schemas/WorkerList", "components": document["components"]}
        Draft202012Validator(schema).validate({"workers": list(workers.values()), "total": len(workers)})

        engine.counts = SpeculationCounts(
            steps=5, drafted=12, accepted=9, model_drafted=6, model_accepted=3
        )  # counters since the worker started

        async def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            async with controller.session().get(f"{controller.url}/metrics") as resp:
                text = await resp.text()
            values = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            accepted = values.get(("mlxcluster_worker_speculative_accepted_tokens_total", (("worker", "w-spec"),)))
            return values if accepted == 9 else None

        values = await wait_until(scraped, what="the latest speculation counts in /metrics")
        spec = (("worker", "w-spec"),)
        assert values[("mlxcluster_worker_speculative_steps_total", spec)] == 5
        assert values[("mlxcluster_worker_speculative_drafted_tokens_total", spec)] == 12
        assert values[("mlxcluster_worker_speculative_acceptance_rate", spec)] == 0.75
        assert values[("mlxcluster_worker_speculative_draft_model_drafted_tokens_total", spec)] == 6
        assert values[("mlxcluster_worker_speculative_draft_model_accepted_tokens_total", spec)] == 3
        assert not [key for key in values if key[0].startswith("mlxcluster_worker_speculative") and key[1] != spec]


async def nats_metrics(controller: RunningController) -> dict[str, float]:
    """The unlabelled ``mlxcluster_nats_*`` samples of the controller's ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    async with controller.session().get(f"{controller.url}/metrics") as resp:
        text = await resp.text()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("mlxcluster_nats_") and not s.labels
    }


async def nats_connected(controller: RunningController, value: int) -> bool:
    return (await nats_metrics(controller)).get("mlxcluster_nats_connected") == value


async def test_controller_is_degraded_while_nats_is_down(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    config = with_sections(cluster_config, metrics={"exporters": ["prometheus"], "snapshot_interval_s": 60})
    async with Cluster(config) as running:
        await running.start_worker("w1")
        controller = await running.start_controller()
        await wait_until(lambda: controller.ctx.registry.stats().online == 1, what="w1 online")
        events: list[BusEvent] = []
        controller.bus.events.add_listener(events.append)
        assert (await nats_metrics(controller))["mlxcluster_nats_connected"] == 1
        async with controller.session().get(controller.url + "/ready") as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "ready"
        await nats_server.stop()
        await wait_until(lambda: controller.ctx.lifecycle.state == "degraded", what="degraded")
        assert events[0].state == "disconnected"
        # the gauge follows the event at once: the snapshot period (60 s) has not come round
        await wait_until(lambda: nats_connected(controller, 0), what="mlxcluster_nats_connected 0 in /metrics")
        async with controller.session().get(controller.url + "/health") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "degraded" and body["state"] == "degraded"
            assert body["reason"] == "NATS unreachable"
        async with controller.session().get(controller.url + "/ready") as resp:
            assert resp.status == 503 and (await resp.json())["state"] == "degraded"
        await nats_server.start()
        await wait_until(lambda: controller.ctx.lifecycle.state == "ready", timeout=20, what="ready again")
        assert events[-1].state == "connected" and "reconnecting" in {e.state for e in events}
        await wait_until(lambda: nats_connected(controller, 1), what="mlxcluster_nats_connected 1 again")
        metrics = await nats_metrics(controller)
        assert metrics["mlxcluster_nats_reconnects_total"] == 1 and metrics["mlxcluster_nats_disconnects_total"] == 1
        _, status = await get(controller, "/api/cluster/status")
        assert status["nats"]["state"] == "connected" and status["nats"]["reconnects"] == 1
        async with controller.session().get(controller.url + "/health") as resp:
            body = await resp.json()
            assert body["status"] == "ok" and "reason" not in body
        await wait_until(lambda: controller.ctx.registry.stats().online == 1, timeout=20, what="w1 back")
        async with controller.session().get(controller.url + "/ready") as resp:
            assert resp.status == 200


@pytest.mark.model
async def test_the_real_model_end_to_end_with_a_limited_key(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    """The demo model behind a key with a TPM limit: usage from the model's own token counts reaches the
    request monitor (with the engine's queue time), the key's usage and the rate-limit headers."""
    from mlxcluster.worker.engine import MlxEngine

    demo_model = demo_model_or_skip()
    keys = keys_of([{"name": "team", "key": ALICE, "tpm": 100_000}, {"name": "ops", "key": ADMIN, "admin": True}])
    config = with_sections(cluster_config, controller={"keys": keys})
    engine = MlxEngine(str(demo_model), max_concurrent=2)
    await engine.start()
    try:
        async with Cluster(config) as running:
            await running.start_worker("mlx-1", engine=engine)  # type: ignore[arg-type]
            controller = await running.start_controller()
            await wait_until(lambda: controller.ctx.registry.stats().online == 1, what="the model worker online")
            client = controller.client(api_key=ALICE, timeout=120)
            model = engine.model_name
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8
            )
            usage = raw.parse().usage
            assert usage is not None and usage.prompt_tokens > 10 and 1 <= usage.completion_tokens <= 8
            assert raw.headers["x-ratelimit-remaining-tokens"] == str(100_000 - 8)  # max_tokens reserved while it ran
            second = await client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
            )
            assert int(second.headers["x-ratelimit-remaining-tokens"]) == 100_000 - usage.total_tokens - 4
            _, listing = await get(controller, "/api/cluster/requests")
            first = listing["recent"][-1]
            assert (first["key"], first["model"], first["worker"], first["state"]) == ("team", model, "mlx-1", "ok")
            assert (first["prompt_tokens"], first["completion_tokens"]) == (
                usage.prompt_tokens,
                usage.completion_tokens,
            )
            assert first["queued_ms"] is not None and first["queued_ms"] >= 0  # the mlx engine measures its queue
            assert first["finish_reason"] in ("stop", "length") and first["ttft_ms"] > 0
            _, keys_body = await get(controller, "/api/cluster/keys")
            team = {row["name"]: row for row in keys_body["keys"]}["team"]
            assert team["usage"]["requests"] == 2 and team["usage"]["prompt_tokens"] >= usage.prompt_tokens
    finally:
        await engine.stop()
