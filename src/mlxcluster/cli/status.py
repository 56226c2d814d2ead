"""``mlxcluster status`` and ``mlxcluster workers``: ask a running controller, print tables.

Uses only the standard library's HTTP client, so these commands start fast.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from mlxcluster.bench.stats import table
from mlxcluster.config import Config


class StatusError(Exception):
    """The controller could not be asked; the message says why."""


def controller_url(config: Config, url: str | None) -> str:
    """The explicit URL, else the configured bind address and port (0.0.0.0 → 127.0.0.1)."""
    if url:
        return url.rstrip("/")
    host = config.controller.bind
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{host}:{config.controller.port}"


def fetch(
    base_url: str, path: str, api_key: str | None, timeout: float = 5.0, *, method: str = "GET", body: Any = None
) -> Any:
    """Ask ``path`` (GET, or ``method`` with a JSON ``body``) and return the JSON answer, with the API key."""
    data = json.dumps(body).encode() if body is not None else (b"" if method != "GET" else None)
    request = urllib.request.Request(base_url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except Exception:
            message = exc.reason
        raise StatusError(f"{base_url}{path}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach the controller at {base_url}: {reason}") from None


def cli_api_key(config: Config, env: Mapping[str, str]) -> str | None:
    """The key the CLI sends: ``MLXCLUSTER_API_KEY``, else the first admin key whose value the config holds
    (``api_keys``, or a ``[[controller.keys]]`` entry's ``key`` / ``key_env``), else the first such key."""
    if env.get("MLXCLUSTER_API_KEY"):
        return env["MLXCLUSTER_API_KEY"]
    known: list[tuple[bool, str]] = [(True, key) for key in config.controller.api_keys]
    for entry in config.controller.keys:
        value = entry.key if entry.key is not None else env.get(entry.key_env or "", "") or None
        if value:
            known.append((entry.admin, value))
    known.sort(key=lambda item: not item[0])  # admin keys first, stable otherwise
    return known[0][1] if known else None


def format_status(status: dict[str, Any]) -> str:
    workers = status["workers"]
    requests = status["requests"]
    nats = status["nats"]
    rows = [
        ["controller", f"{status['controller_id']} ({status['state']}, up {status['uptime_s']:.0f}s)"],
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
            f"{requests['failed']} failed",
        ],
        [
            "nats",
            f"{'connected to ' + str(nats['server']) if nats['connected'] else 'DISCONNECTED'}, "
            f"{nats['invalid_messages_total']} invalid messages dropped",
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
    return "\n".join(f"{key:<12}{value}" for key, value in rows)


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
