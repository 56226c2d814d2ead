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
    """A config whose embedded NATS listens on a free port (no monitoring port), merged with ``sections``."""
    port = free_port()
    nats = {
        "url": f"nats://127.0.0.1:{port}",
        "embedded": {"port": port, "http_port": 0},
        "reconnect_time_wait_ms": 100,
        **sections.pop("nats", {}),
    }
    return from_dict({"nats": nats, **sections})
