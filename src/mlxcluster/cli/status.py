"""``mlxcluster status``: a running cluster's state, asked of its controller."""

from __future__ import annotations

import json
from typing import Any

import typer

from mlxcluster.cli.client import ask_controller
from mlxcluster.cli.common import ConfigOption, JsonOption, UrlOption
from mlxcluster.tables import table


def status_command(config_path: ConfigOption = None, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Show a running cluster's state (asks the controller)."""
    data = ask_controller(config_path, url, "/api/cluster/status")
    typer.echo(json.dumps(data, indent=2) if as_json else format_status(data))


def format_status(status: dict[str, Any]) -> str:
    workers = status["workers"]
    requests = status["requests"]
    nats = status["nats"]
    # fields an older controller may lack
    mode = f", {status['mode']} mode" if status.get("mode") else ""
    rate, window = requests.get("success_rate"), requests.get("success_rate_window_s")
    success = f", {rate:.1%} succeeded in the last {window / 60:.0f} min" if rate is not None and window else ""
    reconnects = f", {nats['reconnects']} reconnects" if nats.get("reconnects") else ""
    rows = [
        ["controller", f"{status['controller_id']} ({status['state']}, up {status['uptime_s']:.0f}s{mode})"],
        ["balancer", status["balancer"] + (" + sticky sessions" if status.get("sticky_sessions") else "")],
        [
            "workers",
            f"{workers['online']} online, {workers['degraded']} degraded, {workers['draining']} draining, "
            f"{workers['offline']} offline",
        ],
        ["capacity", f"{workers['capacity']} slots, {workers['active']} active, {workers['queued']} queued"],
        ["models", ", ".join(status["models"]) or "-"],
        [
            "requests",
            f"{requests['total']} total, {requests['in_flight']} in flight, {requests['retries']} retries, "
            f"{requests['failed']} failed{success}",
        ],
        [
            "nats",
            f"{'connected to ' + str(nats['server']) if nats['connected'] else 'DISCONNECTED'}, "
            f"{nats['invalid_messages_total']} invalid messages dropped{reconnects}",
        ],
    ]
    index = status.get("cache_index")
    if index:
        rows.append(
            [
                "cache index",
                f"{index['entries']:,} of {index['max_entries']:,} entries, {index['workers']} workers, "
                f"{index['evictions']:,} evicted",
            ]
        )
    return table(None, rows)
