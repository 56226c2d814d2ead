"""The Grafana dashboard in docs/grafana: every query parses as PromQL and names only series our Prometheus exporter
exposes (its registry fed one event of each kind and a snapshot with every figure filled in), with only the labels
and label values those series have (matchers such as ``figure="completed"``, ``by (...)`` groupings), and the
dashboard is one an import accepts (a datasource variable every panel uses, unique panel ids, a place on the grid)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from mlxcluster.api import ClusterSnapshot, RequestFinished, RequestMigrated, RequestRetried
from mlxcluster.builtin.exporters import PrometheusExporter
from mlxcluster.protocol import LATENCY_BUCKETS, LatencyCounts

TIER_FIGURES = (
    "controllers_online",
    "in_flight",
    "requests_total",
    "completed",
    "failed",
    "errors",
    "retries",
    "prompt_tokens",
    "completion_tokens",
)
"""The figures of the ``mlxcluster_tier`` gauge (:meth:`mlxcluster.controller.peers.Peers.totals`)."""
DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana" / "mlxcluster.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
SCRAPE_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every series it scrapes."""
Exposed = dict[str, dict[str, set[str]]]
"""Sample name → label name → the values seen."""


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def parsed(expr: str) -> Any:
    """``expr`` parsed (Grafana's variables replaced first); a query that does not parse raises ValueError."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return promql_parser.parse(expr)


def selectors(expr: str) -> set[str]:
    """The metric names of every vector selector in ``expr``."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(parsed(expr), visit)
    return names


def label_problems(expr: str, exposed: Exposed) -> list[str]:
    """What ``expr`` asks of labels that the exposed series do not have: a matcher's label (or, for ``=``, its
    value) missing from the metric it selects, or a ``by (...)`` label missing from a series it aggregates."""
    problems: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name in exposed:
            labels = exposed[node.name]
            for matcher in node.matchers.matchers:
                if matcher.name in SCRAPE_LABELS:
                    continue
                if matcher.name not in labels:
                    problems.append(f"{node.name} has no label {matcher.name!r}")
                elif matcher.op == promql_parser.MatchOp.Equal and matcher.value not in labels[matcher.name]:
                    problems.append(f"{node.name} has no series with {matcher.name}={matcher.value!r}")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type != promql_parser.AggModifierType.By:
                return
            for name in selectors_of(node.expr):
                missing = set(node.modifier.labels) - SCRAPE_LABELS - set(exposed.get(name, {}))
                problems.extend(f"by ({label}) over {name}, which has no such label" for label in sorted(missing))

    promql_parser.walk(parsed(expr), visit)
    return problems


def selectors_of(node: Any) -> set[str]:
    """The metric names of the vector selectors under ``node``."""
    names: set[str] = set()

    def visit(inner: Any) -> None:
        if isinstance(inner, promql_parser.VectorSelector) and inner.name:
            names.add(inner.name)

    promql_parser.walk(node, visit)
    return names


async def exposed_series() -> Exposed:
    """The samples of the exporter's /metrics text, with their labels' values, once it has seen every kind of
    event and every figure."""
    exporter = PrometheusExporter()
    now = time.time()
    worker = {"w1": 1.0}
    await exporter.export(
        RequestFinished(
            time=now,
            request_id="r1",
            model="m",
            worker="w1",
            status="ok",
            duration_s=0.5,
            ttft_s=0.1,
            inter_token_s=(0.01, 0.02),
            prompt_tokens=5,
            completion_tokens=7,
            cached_tokens=2,
            key="alice",
        )
    )
    await exporter.export(RequestRetried(time=now, request_id="r2", model="m", worker="w1", attempt=2, reason="x"))
    await exporter.export(
        RequestMigrated(
            time=now, request_id="r3", model="m", worker="w1", to_worker="w2", migration=1, reason="offline"
        )
    )
    cache = {
        "hits": 1,
        "misses": 1,
        "hit_tokens": 4,
        "prompt_tokens": 8,
        "evictions": 0,
        "bytes": 10,
        "limit_bytes": 100,
        "entries": 1,
        "hit_rate": 0.5,
        "token_hit_rate": 0.5,
    }
    accelerator = {
        "mlx_active_bytes": 1.0,
        "mlx_cache_bytes": 2.0,
        "mlx_peak_bytes": 3.0,
        "gpu_utilization": 50.0,
        "gpu_cores": 38.0,
        "gpu_memory_used_bytes": 4.0,
    }
    bus = {
        "connected": 1,
        "reconnects": 1,
        "disconnects": 1,
        "in_msgs": 3,
        "out_msgs": 4,
        "in_bytes": 30,
        "out_bytes": 40,
        "slow_consumer_drops": 0,
        "errors": 1,
        "invalid_messages": 1,
    }
    await exporter.export(
        ClusterSnapshot(
            time=now,
            inflight=1,
            queue_depth=0,
            workers={"online": 1},
            worker_tokens_per_second=worker,
            invalid_messages_total=1,
            worker_prompt_cache={"w1": cache},
            worker_speculation={"w1": {"steps": 1, "drafted": 2, "accepted": 1, "acceptance_rate": 0.5}},
            cache_index={"entries": 1, "max_entries": 10, "evictions": 0, "events": 1},
            rate_limited_by_key={"alice": 1},
            tier=dict.fromkeys(TIER_FIGURES, 1),
            tier_latency={
                name: LatencyCounts(counts=[1] * (len(b) + 1), sum=1.0) for name, b in LATENCY_BUCKETS.items()
            },
            bus=bus,
            worker_accelerator={"w1": accelerator},
        )
    )
    exposed: Exposed = {}
    for family in text_string_to_metric_families(exporter.text().decode()):
        for sample in family.samples:
            labels = exposed.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return exposed


async def test_every_dashboard_query_names_an_exposed_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exposed = await exposed_series()
    named: dict[str, set[str]] = {}
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            for name in selectors(target["expr"]):
                named.setdefault(name, set()).add(panel["title"])
    missing = {name: sorted(titles) for name, titles in named.items() if name not in exposed}
    assert not missing, f"the dashboard queries series the exporter does not expose: {missing}"
    problems = {
        panel["title"]: found
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if (found := label_problems(target["expr"], exposed))
    }
    assert not problems, f"the dashboard asks for labels the exposed series do not have: {problems}"
    # what issue 24 added is on the dashboard: the bus and the accelerators
    added = (
        "mlxcluster_nats_connected",
        "mlxcluster_nats_reconnects_total",
        "mlxcluster_nats_slow_consumer_drops_total",
        "mlxcluster_worker_gpu_utilization_ratio",
        "mlxcluster_worker_mlx_memory_bytes",
    )
    assert set(added) <= set(named), set(added) - set(named)
    # latency and requests come from the tier-wide series: a tier's processes share one port, so a scrape of
    # it sees one process's own figures
    tier_wide = (
        "mlxcluster_tier",
        "mlxcluster_tier_ttft_seconds_bucket",
        "mlxcluster_tier_request_duration_seconds_bucket",
    )
    assert set(tier_wide) <= set(named), set(tier_wide) - set(named)
    assert not {"mlxcluster_requests_total", "mlxcluster_ttft_seconds_bucket"} & set(named)


async def test_label_mistakes_are_caught() -> None:
    exposed = await exposed_series()
    assert label_problems('max(mlxcluster_tier{figure="in_flight"})', exposed) == []
    assert label_problems('max(mlxcluster_tier{figure="inflight"})', exposed) == [
        "mlxcluster_tier has no series with figure='inflight'"
    ]
    assert label_problems('sum(mlxcluster_inflight_requests{status="ok"})', exposed) == [
        "mlxcluster_inflight_requests has no label 'status'"
    ]
    assert label_problems("sum by (worker, instance) (rate(mlxcluster_tokens_total[5m]))", exposed) == [
        "by (worker) over mlxcluster_tokens_total, which has no such label"
    ]


def test_the_dashboard_imports() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${" + variable["name"] + "}"}
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["title"]
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source and panel["targets"], panel["title"]
        assert all(target["datasource"] == source and target["expr"] for target in panel["targets"]), panel["title"]
