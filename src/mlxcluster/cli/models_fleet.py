"""``mlxcluster models ps|load|unload|placement``: the models a running cluster holds, asked of its controller.

Like ``ollama ps``: what is loaded where, its bytes, when it unloads. ``load`` and ``unload`` need an admin key
(``MLXCLUSTER_API_KEY`` or the first admin key the config holds).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Annotated, Any

import typer

from mlxcluster.cli.client import ask_controller
from mlxcluster.cli.common import ConfigOption, JsonOption, UrlOption
from mlxcluster.tables import table

ModelArg = Annotated[str, typer.Argument(help="The model's served name (as /v1/models lists it).")]
WorkerOption = Annotated[str | None, typer.Option("--worker", help="One worker's id (default: where placement says).")]
LOAD_TIMEOUT_S = 900.0


def _model_path(model: str, action: str) -> str:
    return f"/api/cluster/models/{urllib.parse.quote(model, safe='')}/{action}"


def _size(count: int | None) -> str:
    return "-" if not count else f"{count / 1024**3:.2f} GB" if count >= 1024**3 else f"{count / 1024**2:.0f} MB"


def _until(expires_at: float | None, now: float) -> str:
    if expires_at is None:
        return "never"
    left = max(0.0, expires_at - now)
    return f"in {left:.0f} s" if left < 120 else f"in {left / 60:.0f} min"


def format_ps(workers: list[dict[str, Any]], now: float | None = None) -> str:
    """The table of ``models ps``: one row per (worker, model) held, then each worker's memory budget."""
    now = time.time() if now is None else now
    rows = [
        [
            m["model"],
            w["worker"],
            m["state"] + (" pinned" if m["pinned"] else ""),
            _size(m["weights_bytes"]),
            str(m["in_flight"]),
            _until(m["expires_at"], now) if m["state"] == "loaded" else "-",
        ]
        for w in workers
        for m in w["models"]
    ]
    lines = [table(["MODEL", "WORKER", "STATE", "SIZE", "IN FLIGHT", "UNLOADS"], rows, align="llllrl")] if rows else []
    if not rows:
        lines.append("no model is loaded on any worker")
    budgets = [
        [
            w["worker"],
            _size(w["memory"]["budget_bytes"]),
            _size(w["memory"]["weights_bytes"]),
            _size(w["memory"]["prompt_cache_bytes"]),
            _size(w["memory"]["kv_bytes"]),
        ]
        for w in workers
        if w.get("memory")
    ]
    if budgets:
        lines += ["", table(["WORKER", "BUDGET", "WEIGHTS", "PROMPT CACHE", "RUNNING KV"], budgets, align="lrrrr")]
    return "\n".join(lines)


def register(models_app: typer.Typer) -> None:
    """Add the commands that ask a running controller to ``mlxcluster models``."""

    @models_app.command("ps")
    def ps_command(config_path: ConfigOption = None, url: UrlOption = None, as_json: JsonOption = False) -> None:
        """What is loaded on which worker, its size, requests in flight, when it unloads; each worker's budget."""
        data = ask_controller(config_path, url, "/api/cluster/models")
        typer.echo(json.dumps(data, indent=2) if as_json else format_ps(data["workers"]))

    @models_app.command("load")
    def load_command(
        model: ModelArg,
        worker: WorkerOption = None,
        keep_alive: Annotated[
            str | None, typer.Option("--keep-alive", help="Keep it loaded when idle: '10m', '1h', -1 (for ever).")
        ] = None,
        pin: Annotated[bool | None, typer.Option("--pin/--no-pin", help="Never unload it when idle.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Load even past the worker's memory budget.")] = False,
        config_path: ConfigOption = None,
        url: UrlOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Load a model now (where placement says, or on --worker); returns once it serves."""
        body: dict[str, Any] = {"force": force}
        if worker is not None:
            body["worker"] = worker
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if pin is not None:
            body["pin"] = pin
        data = ask_controller(
            config_path, url, _model_path(model, "load"), method="POST", body=body, timeout=LOAD_TIMEOUT_S
        )
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        evicted = f" (unloaded {', '.join(data['evicted'])})" if data.get("evicted") else ""
        typer.echo(f"{model}: loaded on {data['worker']}{evicted}")
        if data.get("warning"):
            typer.echo(f"warning: {data['warning']}", err=True)

    @models_app.command("unload")
    def unload_command(
        model: ModelArg,
        worker: WorkerOption = None,
        config_path: ConfigOption = None,
        url: UrlOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Unload a model from --worker or from every worker holding it (after their requests end)."""
        body = {"worker": worker} if worker is not None else {}
        data = ask_controller(
            config_path, url, _model_path(model, "unload"), method="POST", body=body, timeout=LOAD_TIMEOUT_S
        )
        if as_json:
            typer.echo(json.dumps(data, indent=2))
        else:
            typer.echo(f"{model}: unloaded from {', '.join(data['unloaded']) or 'no worker (not loaded)'}")

    @models_app.command("placement")
    def placement_command(
        model: ModelArg,
        worker: WorkerOption = None,
        config_path: ConfigOption = None,
        url: UrlOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Where the model would load, the bytes it needs against each worker's free budget, and why a worker is
        excluded."""
        query = {"model": model, **({"worker": worker} if worker else {})}
        data = ask_controller(config_path, url, "/api/cluster/placement?" + urllib.parse.urlencode(query))
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        typer.echo(f"{model}: {_size(data['weights_bytes'])} of weights; would load on {data['worker'] or 'no worker'}")
        rows = [
            [c["worker"], "yes" if c["fits"] else "no", _size(c["free_bytes"]), _size(c["budget_bytes"]), c["reason"]]
            for c in data["candidates"]
        ]
        if rows:
            typer.echo(table(["WORKER", "FITS", "FREE", "BUDGET", "WHY"], rows, align="llrrl"))
