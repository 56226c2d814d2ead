"""The JSON-lines exporter on its own, through the event feed, and as an installed entry-point plugin."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from mlxcluster_exporter_jsonl import JsonlExporter

from mlxcluster.api import ClusterSnapshot, RequestFinished, RequestRetried
from mlxcluster.config import MetricsSection, PluginsSection
from mlxcluster.controller.metering.metrics_feed import ExporterError, build_metrics_feed
from mlxcluster.plugins import collect_exporters, get_plugin_manager, list_plugins


def finished(request_id: str, **fields: object) -> RequestFinished:
    values: dict[str, object] = {
        "time": time.time(),
        "request_id": request_id,
        "model": "m",
        "worker": "w1",
        "status": "ok",
        "duration_s": 0.5,
        "ttft_s": 0.1,
        "inter_token_s": (0.01, 0.03),
        "prompt_tokens": 3,
        "completion_tokens": 7,
        "attempts": 1,
    }
    values.update(fields)
    return RequestFinished(**values)  # type: ignore[arg-type]


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_finished_request(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "requests.jsonl"
    exporter = JsonlExporter(path=str(path))
    exporter.start()
    exporter.export(finished("r1"))
    exporter.export(RequestRetried(time=1.0, request_id="r2", model="m", worker="w1", attempt=2, reason="gone"))
    exporter.export(ClusterSnapshot(time=1.0, inflight=1))
    exporter.export(finished("r2", status="error", error="no_capacity", worker=None, ttft_s=None, inter_token_s=()))
    exporter.close()
    first, second = read_lines(path)
    assert first["request_id"] == "r1" and first["status"] == "ok" and first["worker"] == "w1"
    assert first["ttft_s"] == 0.1 and first["duration_s"] == 0.5 and first["inter_token_s"] == pytest.approx(0.02)
    assert (first["prompt_tokens"], first["completion_tokens"], first["attempts"]) == (3, 7, 1)
    assert second == {**second, "status": "error", "error": "no_capacity", "worker": None, "ttft_s": None}
    assert second["inter_token_s"] is None


def test_appends_and_all_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"earlier": true}\n')
    exporter = JsonlExporter(path=str(path), all_events=True)
    exporter.export(finished("r1"))  # opens lazily without start()
    exporter.export(ClusterSnapshot(time=2.0, inflight=4, workers={"online": 2}))
    exporter.close()
    lines = read_lines(path)
    assert lines[0] == {"earlier": True} and lines[1]["request_id"] == "r1"
    assert lines[2]["event"] == "cluster_snapshot" and lines[2]["inflight"] == 4


def test_through_the_feed_on_its_own_thread(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    section = MetricsSection(exporters=["jsonl"], settings={"jsonl": {"path": str(path)}})
    feed = build_metrics_feed(get_plugin_manager(PluginsSection(), env={}), section)

    async def run() -> None:
        await feed.start()
        for i in range(50):
            feed.emit(finished(f"r{i}"))
        assert await feed.drained()
        await feed.close()

    asyncio.run(run())
    assert [line["request_id"] for line in read_lines(path)] == [f"r{i}" for i in range(50)]
    assert feed.dropped == 0


def test_missing_path_is_a_clear_error() -> None:
    pm = get_plugin_manager(PluginsSection(), env={})
    with pytest.raises(ExporterError, match=r"metrics.settings.jsonl: .*path"):
        build_metrics_feed(pm, MetricsSection(exporters=["jsonl"]))


def test_installed_entry_point_registers_jsonl() -> None:
    pm = get_plugin_manager(PluginsSection(), env={})
    entry = collect_exporters(pm)["jsonl"]
    assert entry.plugin == "jsonl" and entry.factory is JsonlExporter
    (row,) = [p for p in list_plugins(pm) if p.name == "jsonl"]
    assert (row.status, row.package, row.hooks) == (
        "loaded",
        "mlxcluster-exporter-jsonl",
        ("mlxcluster_register_exporters",),
    )
