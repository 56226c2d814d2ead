"""NATS identities per role, enforced by nats-server's own authorization (users with permissions).

``nats.embedded.users_file`` names a JSON file ``{"users": [{"user", "password", "role"}]}``; the embedded
server's config then lists each user with only the subjects its role needs:

- ``controller``: publishes requests, cancels and announces, reads registrations, heartbeats and frames; uses
  JetStream's API, its KV buckets and the usage stream (the shared state);
- ``worker``: reads requests, cancels and announces, publishes registrations, heartbeats and frames;
- ``client``: an observer (tools, dashboards): reads discovery messages, can neither register as a worker
  nor read or send inference subjects;
- ``dual``: controller and worker together (one machine running ``--mode dual``).

A role's limits come from the server, so a leaked worker or client password cannot be used for more than
that role. :func:`secure_setup` writes the users file and both machines' configs for
``mlxcluster config init --secure``.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any, Literal

import msgspec

from mlxcluster.config import ConfigError

Role = Literal["controller", "worker", "client", "dual"]
INBOX = "_INBOX.>"


class NatsUser(msgspec.Struct, forbid_unknown_fields=True):
    """One entry of the users file."""

    user: str
    password: str
    role: Role
    worker_id: str | None = None
    """For a ``worker``: the one worker id this user serves (it may read only that id's requests)."""


class UsersFile(msgspec.Struct, forbid_unknown_fields=True):
    users: list[NatsUser]


def jetstream_subjects(prefix: str) -> list[str]:
    """What a controller publishes for the shared state: JetStream's API (buckets, stream, consumers, flow
    control), its KV buckets' subjects and the usage stream's subjects (the names: ``controller/shared/state.py``)."""
    buckets = [f"$KV.{prefix.replace('.', '_')}_{name}.>" for name in ("keys", "usage", "settings", "limits")]
    return ["$JS.API.>", "$JS.FC.>", *buckets, f"{prefix}.usage.>"]


def permissions(role: Role, prefix: str, worker_id: str | None = None) -> dict[str, Any]:
    """nats-server ``permissions`` for ``role`` under the subject ``prefix`` (a worker pinned to
    ``worker_id`` reads only that worker's requests and cancels)."""
    p = prefix
    own = worker_id or "*"
    discovery = [f"{p}.worker.register", f"{p}.worker.heartbeat", f"{p}.worker.deregister", f"{p}.worker.cache"]
    if role == "controller":
        publish = [
            f"{p}.worker.*.inference",
            f"{p}.worker.*.cancel",
            f"{p}.cluster.announce",
            f"{p}.cluster.worker_settings",
            f"{p}.cluster.controller",
            f"{p}.cluster.controller.*.requests",
            INBOX,
            *jetstream_subjects(p),
        ]
        subscribe = [
            *discovery,
            f"{p}.response.>",
            f"{p}.cluster.announce",
            f"{p}.cluster.worker_settings",
            f"{p}.cluster.controller",
            f"{p}.cluster.controller.*.requests",
            INBOX,
        ]
    elif role == "worker":
        # group.*: a worker group's rendezvous and member heartbeats (worker/rendezvous.py)
        publish = [*discovery, f"{p}.response.>", f"{p}.group.*", INBOX]
        subscribe = [
            f"{p}.worker.{own}.inference",
            f"{p}.worker.{own}.cancel",
            f"{p}.cluster.announce",
            f"{p}.group.*",
            INBOX,
        ]
    elif role == "client":
        publish = [INBOX]
        subscribe = [f"{p}.worker.heartbeat", f"{p}.worker.register", f"{p}.worker.deregister", INBOX]
    else:
        controller, worker = permissions("controller", p), permissions("worker", p)
        publish = sorted({*controller["publish"]["allow"], *worker["publish"]["allow"]})
        subscribe = sorted({*controller["subscribe"]["allow"], *worker["subscribe"]["allow"]})
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def load_users(path: str | Path) -> list[NatsUser]:
    """Read and check the users file; errors name the file."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"nats.embedded.users_file: cannot read {path}: {exc.strerror or exc}") from None
    try:
        users = msgspec.json.decode(data, type=UsersFile).users
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"nats.embedded.users_file: {path}: {exc}") from None
    if not users:
        raise ConfigError(f"nats.embedded.users_file: {path}: lists no users")
    names = [u.user for u in users]
    if len(set(names)) != len(names):
        raise ConfigError(f"nats.embedded.users_file: {path}: a user is listed twice")
    return users


def authorization(users: list[NatsUser], prefix: str) -> dict[str, Any]:
    """The ``authorization`` block of the server config."""
    return {
        "users": [
            {"user": u.user, "password": u.password, "permissions": permissions(u.role, prefix, u.worker_id)}
            for u in users
        ]
    }


def _password() -> str:
    return secrets.token_urlsafe(24)


def secure_setup(
    directory: Path, controller_host: str, *, prefix: str = "mlxcluster", workers: list[str] | None = None
) -> dict[str, Path]:
    """Write credentials and configs for a controller machine and a worker machine; return the paths.

    ``controller.toml`` runs the controller with the embedded nats-server on all interfaces, NATS users per
    role and an admin API key stored as its SHA-256; ``worker.toml`` (for the other machine) connects to
    ``controller_host`` as the worker user. With ``workers`` (ids), each gets its own NATS user that may
    read only its own requests, and its own ``worker-<id>.toml``. Secret files are created mode 0600.
    """
    from mlxcluster.controller.metering.keys import key_digest

    for worker_id in workers or ():
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", worker_id):
            raise ValueError(f"--workers: {worker_id!r} is not a worker id (letters, digits, '-' and '_')")
    directory.mkdir(parents=True, exist_ok=True)
    users = [NatsUser(user=role, password=_password(), role=role) for role in ("controller", "worker", "client")]
    by_role = {u.role: u for u in users}
    pinned = [NatsUser(user=f"worker-{w}", password=_password(), role="worker", worker_id=w) for w in workers or ()]
    users += pinned
    api_key = "sk-" + secrets.token_urlsafe(32)
    users_path = directory / "nats-users.json"
    key_path = directory / "admin-api-key.txt"
    controller_path = directory / "controller.toml"
    worker_path = directory / "worker.toml"
    controller_toml = f"""# mlxcluster controller machine (written by `mlxcluster config init --secure`)
[cluster]
mode = "controller"

[controller]
bind = "0.0.0.0"

[[controller.keys]]
name = "admin"
key_sha256 = "{key_digest(api_key).hex()}"   # the key itself is in {key_path.name}
admin = true

[nats]
mode = "embedded"
user = "controller"
password = "{by_role["controller"].password}"
subject_prefix = "{prefix}"

[nats.embedded]
host = "0.0.0.0"
users_file = "{users_path.resolve()}"
"""
    worker_toml = f"""# mlxcluster worker machine (written by `mlxcluster config init --secure`); copy it there
[cluster]
mode = "worker"

[nats]
mode = "external"
url = "nats://{controller_host}:4222"
user = "worker"
password = "{by_role["worker"].password}"
subject_prefix = "{prefix}"
"""
    written = {"users": users_path, "api_key": key_path, "controller": controller_path, "worker": worker_path}
    for user in pinned:
        path = directory / f"{user.user}.toml"
        text = worker_toml.replace('user = "worker"', f'user = "{user.user}"').replace(
            by_role["worker"].password, user.password
        )
        _write_secret(path, text.replace("[nats]", f'[worker]\nid = "{user.worker_id}"\n\n[nats]', 1))
        written[user.user] = path
    _write_secret(users_path, json.dumps({"users": [msgspec.to_builtins(u) for u in users]}, indent=2) + "\n")
    _write_secret(key_path, api_key + "\n")
    _write_secret(controller_path, controller_toml)
    _write_secret(worker_path, worker_toml)
    return written


def _write_secret(path: Path, text: str) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another directory")
    path.touch(mode=0o600)
    path.write_text(text, encoding="utf-8")
