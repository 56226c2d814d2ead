"""Secure by default beyond loopback: an API or a NATS server open to other machines needs credentials.

A controller bound to a non-loopback address without any API key, an embedded nats-server listening on a
non-loopback address without NATS auth, or its monitoring endpoint (no auth at all) on a non-loopback address,
refuses to start with an error naming the setting, unless
``controller.insecure`` / ``nats.embedded.insecure`` (or ``run --insecure``) says the user means it; then a
warning is logged at every start.
"""

from __future__ import annotations

import ipaddress
import logging

from mlxcluster.config import Config, ConfigError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches only this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a hostname or an interface name: assume it is reachable from outside


def exposure(config: Config, role: str) -> list[tuple[str, bool]]:
    """Each open exposure as (explanation, allowed by an insecure setting)."""
    found: list[tuple[str, bool]] = []
    controller = config.controller
    if role in ("controller", "dual") and not is_loopback(controller.bind):
        if not controller.api_keys and not controller.keys:
            found.append(
                (
                    f'controller.bind = "{controller.bind}" serves other machines without any API key: '
                    "add [[controller.keys]] (or controller.api_keys), or set controller.insecure = true "
                    "(run --insecure) if anyone who can reach it may use it",
                    controller.insecure,
                )
            )
    nats = config.nats
    embedded = nats.embedded
    if role in ("controller", "dual") and nats.mode == "embedded" and not is_loopback(embedded.host):
        if nats.user is None and nats.token is None and embedded.users_file is None:
            found.append(
                (
                    f'nats.embedded.host = "{embedded.host}" lets other machines connect to NATS without '
                    "credentials, register as workers and read prompts: set nats.embedded.users_file "
                    "(mlxcluster config init --secure writes one) or nats.user/nats.password, or set "
                    "nats.embedded.insecure = true (run --insecure) if you mean it",
                    embedded.insecure,
                )
            )
    if role in ("controller", "dual") and nats.mode == "embedded" and embedded.http_port:
        if not is_loopback(embedded.http_host):
            found.append(
                (
                    f'nats.embedded.http_host = "{embedded.http_host}" opens the NATS monitoring endpoint (/connz '
                    "lists every connection, without auth) to other machines: leave it on 127.0.0.1, set "
                    "nats.embedded.http_port = 0, or set nats.embedded.insecure = true (run --insecure) if you mean it",
                    embedded.insecure,
                )
            )
    return found


def check_exposure(config: Config, role: str) -> None:
    """Raise :class:`ConfigError` for an exposure not allowed; log a warning for each allowed one."""
    for message, allowed in exposure(config, role):
        if not allowed:
            raise ConfigError(message)
        log.warning("INSECURE: %s", message.split(":")[0] + " (allowed by the insecure setting)")
