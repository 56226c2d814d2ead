"""``mlxcluster keys [list|create|revoke|rotate|usage]``: API keys of a running cluster, through its admin API.

``keys`` alone (or ``keys list``) lists the keys with their limits and this controller's counters; ``create``
and ``rotate`` print the key's value once; ``usage`` prints a key's totals per day (or per day and model)
from the shared usage, which survives restarts. The API key sent is ``MLXCLUSTER_API_KEY`` or the first admin
key the config holds.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Annotated, Any

import typer

from mlxcluster.cli.client import ask_controller
from mlxcluster.cli.common import ConfigOption, JsonOption, UrlOption, fail
from mlxcluster.durations import parse_duration
from mlxcluster.tables import table

KeyName = Annotated[str, typer.Argument(help="The key's name.")]
Limit = Annotated[int | None, typer.Option(min=1)]

keys_app = typer.Typer(name="keys", help="API keys: list, create, revoke, rotate; usage.", invoke_without_command=True)


def _key_path(name: str, action: str = "") -> str:
    path = f"/api/cluster/keys/{urllib.parse.quote(name, safe='')}"
    return f"{path}/{action}" if action else path


def format_keys(keys: list[dict[str, Any]]) -> str:
    """The table of ``keys list``."""
    rows = []
    for k in keys:
        limits, usage = k["limits"], k["usage"]
        state = "revoked" if k.get("revoked") else k.get("source", "config")
        rows.append(
            [
                k["name"],
                "admin" if k["admin"] else "-",
                str(limits["rpm"] or "-"),
                str(limits["tpm"] or "-"),
                str(limits["max_concurrent"] or "-"),
                str(usage["requests"]),
                str(usage["prompt_tokens"]),
                str(usage["completion_tokens"]),
                str(usage["rate_limited"]),
                state,
            ]
        )
    headers = ["key", "role", "rpm", "tpm", "conc.", "requests", "prompt tok", "compl. tok", "429s", "source"]
    return table(headers, rows) if rows else "no API keys configured"


def _show(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    if "key" in record:
        typer.echo(f"key {record['name']}: {record['key']}")
        typer.echo("(shown this once: store it now)", err=True)
    else:
        state = "revoked" if record["revoked"] else "active"
        typer.echo(f"key {record['name']}: {state}, rpm={record['rpm']} tpm={record['tpm']}")


@keys_app.callback()
def keys_list_default(
    ctx: typer.Context, config_path: ConfigOption = None, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """API keys with their limits and usage (asks the controller; admin key); subcommands manage them."""
    if ctx.invoked_subcommand is None:
        keys_list(config_path, url, as_json)


@keys_app.command("list")
def keys_list(config_path: ConfigOption = None, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """API keys with their limits and this controller's counters."""
    data = ask_controller(config_path, url, "/api/cluster/keys")
    typer.echo(json.dumps(data, indent=2) if as_json else format_keys(data["keys"]))


@keys_app.command("create")
def keys_create(
    name: KeyName,
    models: Annotated[
        list[str] | None, typer.Option("--model", help="A model the key may use (repeat; none: all).")
    ] = None,
    rpm: Limit = None,
    tpm: Limit = None,
    max_concurrent: Limit = None,
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (manages the cluster).")] = False,
    expires_in: Annotated[
        str | None, typer.Option("--expires-in", help="Refused after this long, e.g. 30d, 12h.")
    ] = None,
    config_path: ConfigOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a key; its value is printed once."""
    import time

    body: dict[str, Any] = {"name": name, "models": models or [], "admin": admin}
    body.update({k: v for k, v in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)) if v is not None})
    if expires_in is not None:
        try:
            body["expires_at"] = time.time() + parse_duration(expires_in)
        except ValueError as exc:
            fail(f"--expires-in: {exc}")
    _show(ask_controller(config_path, url, "/api/cluster/keys", method="POST", body=body), as_json)


@keys_app.command("revoke")
def keys_revoke(
    name: KeyName, config_path: ConfigOption = None, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """Refuse the key from now on, on every controller."""
    _show(ask_controller(config_path, url, _key_path(name, "revoke"), method="POST"), as_json)


@keys_app.command("rotate")
def keys_rotate(
    name: KeyName, config_path: ConfigOption = None, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """Give the key a new value (printed once); the old one is refused from now on."""
    _show(ask_controller(config_path, url, _key_path(name, "rotate"), method="POST"), as_json)


@keys_app.command("usage")
def keys_usage(
    name: KeyName,
    since: Annotated[str | None, typer.Option(help="From this day (YYYY-MM-DD) or unix time.")] = None,
    by_model: Annotated[bool, typer.Option("--by-model", help="One row per day and model.")] = False,
    config_path: ConfigOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """A key's usage per day: requests answered, errors, tokens (kept in JetStream, across restarts)."""
    query = {"key": name, **({"since": since} if since else {}), **({"by": "model"} if by_model else {})}
    data = ask_controller(config_path, url, "/api/cluster/usage?" + urllib.parse.urlencode(query))
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(format_usage(data))


def format_usage(data: dict[str, Any]) -> str:
    """The table of ``keys usage``: one row per day (and model), then the total."""
    columns = ["requests", "errors", "cancelled", "prompt_tokens", "cached_tokens", "completion_tokens"]
    by_model = data.get("by") == "model"
    headers = ["day", *(["model"] if by_model else []), "requests", "errors", "cancelled", "prompt", "cached", "compl."]
    rows = [[r["day"], *([r["model"]] if by_model else []), *(str(r[c]) for c in columns)] for r in data["rows"]]
    rows.append(["total", *([""] if by_model else []), *(str(data[c]) for c in columns)])
    return table(headers, rows)
