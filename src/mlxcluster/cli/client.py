"""Asking a running controller: its URL, the API key the CLI sends, one JSON call over HTTP.

Standard library HTTP only, so the commands that ask a controller start fast.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlxcluster.cli.common import fail, get_config
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


def ask_controller(
    config_path: Path | None,
    url: str | None,
    path: str,
    *,
    method: str = "GET",
    body: Any = None,
    timeout: float = 5.0,
) -> Any:
    """One call to the controller named by ``--url`` or the config; exit 1 with the reason on failure."""
    config = get_config(config_path)
    key = cli_api_key(config, os.environ)
    try:
        return fetch(controller_url(config, url), path, key, timeout, method=method, body=body)
    except StatusError as exc:
        fail(str(exc), 1)
