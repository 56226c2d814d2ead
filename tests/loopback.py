"""Loopback helpers the tests share: a free TCP port and a config whose embedded NATS listens on one.

Test modules import these from here (never from ``conftest``, which pytest loads as a plugin, not as a module
of ours); the fixtures in ``conftest`` use them too.
"""

from __future__ import annotations

import socket
from typing import Any

from mlxcluster.config import Config, from_dict


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_config(**sections: dict[str, Any]) -> Config:
    """A config whose embedded NATS listens on a free port (no monitoring port), merged with ``sections``.

    JetStream and the controllers' shared state are off unless ``sections`` turn them on (:func:`shared_config`):
    most tests are about one controller's behaviour, and a JetStream store per test would cost them time.
    """
    return _config({"jetstream": False}, {"shared_state": False}, sections)


def shared_config(store_dir: str, **sections: dict[str, Any]) -> Config:
    """:func:`make_config` with JetStream on (its store in ``store_dir``) and the controllers' shared state."""
    return _config({"jetstream": True, "store_dir": store_dir}, {"shared_state": True}, sections)


def _config(embedded: dict[str, Any], controller: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Config:
    port = free_port()
    given = sections.pop("nats", {})
    nats = {
        "url": f"nats://127.0.0.1:{port}",
        "reconnect_time_wait_ms": 100,
        **given,
        "embedded": {"port": port, "http_port": 0, **embedded, **given.get("embedded", {})},
    }
    merged = {**controller, **sections.pop("controller", {})}
    return from_dict({"nats": nats, "controller": merged, **sections})
