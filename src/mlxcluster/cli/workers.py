"""``mlxcluster workers ...`` and ``mlxcluster requests``: ask a running controller (keys: ``cli/keys.py``).

``workers`` alone lists the workers; ``workers drain|resume|set|forget|show ID`` manages one (admin key).
The API key sent is ``MLXCLUSTER_API_KEY`` or the first admin key the config holds. Standard library HTTP
only, so these commands start fast.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Annotated, Any

import typer

from mlxcluster.cli.client import ask_controller
from mlxcluster.cli.common import ConfigOption, JsonOption, UrlOption, fail
from mlxcluster.tables import table

WorkerId = Annotated[str, typer.Argument(help="The worker's id.")]

workers_app = typer.Typer(
    name="workers", help="List and manage a running cluster's workers.", invoke_without_command=True
)


def _worker_path(worker_id: str, action: str) -> str:
    return f"/api/cluster/workers/{urllib.parse.quote(worker_id, safe='')}/{action}"


def _print_change(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    settings = data.get("settings") or {}
    tags = ",".join(settings.get("tags") or []) or "-"
    typer.echo(
        f"{data['id']}: {data['status']}, {data.get('inflight', 0)} request(s) in flight, "
        f"priority {settings.get('priority')}, tags {tags}"
    )


@workers_app.callback()
def workers_list(
    ctx: typer.Context,
    config_path: ConfigOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
    status_filter: Annotated[
        str | None, typer.Option("--status", help="online | degraded | draining | offline")
    ] = None,
) -> None:
    """List a running cluster's workers (asks the controller); subcommands manage one."""
    if ctx.invoked_subcommand is not None:
        return
    path = "/api/cluster/workers" + (f"?status={status_filter}" if status_filter else "")
    data = ask_controller(config_path, url, path)
    typer.echo(json.dumps(data, indent=2) if as_json else format_workers(data["workers"]))


@workers_app.command("show")
def workers_show(worker_id: WorkerId, config_path: ConfigOption = None, url: UrlOption = None) -> None:
    """Everything the controller knows of one worker (JSON)."""
    path = f"/api/cluster/workers/{urllib.parse.quote(worker_id, safe='')}"
    typer.echo(json.dumps(ask_controller(config_path, url, path), indent=2))


@workers_app.command("drain")
def workers_drain(
    worker_id: WorkerId, config_path: ConfigOption = None, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """Send the worker no new work; its running streams finish."""
    _print_change(ask_controller(config_path, url, _worker_path(worker_id, "drain"), method="POST"), as_json)


@workers_app.command("resume")
def workers_resume(
    worker_id: WorkerId, config_path: ConfigOption = None, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """Undo a drain."""
    _print_change(ask_controller(config_path, url, _worker_path(worker_id, "resume"), method="POST"), as_json)


@workers_app.command("set")
def workers_set(
    worker_id: WorkerId,
    priority: Annotated[int | None, typer.Option("--priority", help="Higher is picked first.")] = None,
    tags: Annotated[str | None, typer.Option("--tags", help="Comma-separated tags (empty: none).")] = None,
    config_path: ConfigOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set the worker's priority and/or tags."""
    body: dict[str, Any] = {}
    if priority is not None:
        body["priority"] = priority
    if tags is not None:
        body["tags"] = [tag.strip() for tag in tags.split(",") if tag.strip()]
    if not body:
        fail("give --priority and/or --tags")
    data = ask_controller(config_path, url, _worker_path(worker_id, "settings"), method="POST", body=body)
    _print_change(data, as_json)


@workers_app.command("forget")
def workers_forget(worker_id: WorkerId, config_path: ConfigOption = None, url: UrlOption = None) -> None:
    """Remove an offline worker (and its settings) from the controller."""
    ask_controller(config_path, url, _worker_path(worker_id, "forget"), method="POST")
    typer.echo(f"{worker_id}: forgotten")


def requests_command(
    config_path: ConfigOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", help="Finished requests to show.")] = 20,
) -> None:
    """Requests in flight and the latest finished ones (asks the controller)."""
    data = ask_controller(config_path, url, f"/api/cluster/requests?limit={limit}")
    typer.echo(json.dumps(data, indent=2) if as_json else format_requests(data))


def format_requests(data: dict[str, Any]) -> str:
    """``/api/cluster/requests`` as a table; with a controller tier, which process served each request."""
    records = [*data["in_flight"], *data["recent"]]
    tier = len(data.get("controllers", [])) > 1
    rows = [
        [
            r["id"][:24],
            r.get("key") or "-",
            r["model"],
            r.get("worker") or "-",
            *([r.get("controller") or "-"] if tier else []),
            r["state"],
            _ms(r.get("ttft_ms")),
            _ms(r.get("total_ms")),
            f"{r.get('prompt_tokens', 0)}/{r.get('completion_tokens', 0)}",
            r.get("finish_reason") or r.get("error") or "-",
        ]
        for r in records
    ]
    headers = ["request", "key", "model", "worker", *(["controller"] if tier else []), "state", "ttft ms"]
    headers += ["total ms", "tokens in/out", "end"]
    text = table(headers, rows) if rows else "no requests yet"
    if data.get("unreachable"):
        text += f"\nnot answering (their requests are missing): {', '.join(data['unreachable'])}"
    return text


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_workers(workers: list[dict[str, Any]]) -> str:
    if not workers:
        return "no workers known"
    rows = []
    for w in workers:
        seen = w.get("seen_ago_s")
        rows.append(
            [
                w["id"],
                w["status"],
                ",".join(w["models"]) or "-",
                f"{w['active']}/{w['max_concurrent']}",
                str(w["queued"]),
                f"{w['tokens_per_second']:.1f}",
                f"{w['available_memory_gb']:.1f}",
                "-" if seen is None else f"{seen:.1f}s",
                w.get("breaker", "closed"),
                w["engine"] or "-",
            ]
        )
        group = w.get("group")
        if group:  # a worker group: one line per member under its face
            for member in group.get("members", []):
                where = member.get("hostname") or member.get("address") or ""
                rows.append(
                    [
                        f"  r{member['rank']} {member['member_id']}",
                        f"{group['parallel']} {group['backend']}",
                        where,
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                    ]
                )
    return table(
        ["worker", "status", "models", "active", "queued", "tok/s", "free GB", "last seen", "breaker", "engine"], rows
    )
