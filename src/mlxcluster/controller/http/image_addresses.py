"""Which addresses the controller may fetch image URLs from: public ones only, unless configured otherwise.

An image URL is the client's: without a check, ``http://169.254.169.254/...`` (a cloud's instance metadata),
``http://127.0.0.1:4222`` (the cluster's own NATS) or any service on the controller's private network is one
request away (server-side request forgery). A host name is no safeguard, as an allowed name may resolve to such
an address (by mistake, or by its owner's DNS changing between a check and the connection). So the check is
made on the addresses the connection will use: :class:`PublicAddressResolver` is the fetcher's resolver, and
refuses a name any of whose addresses is not a global unicast one; a literal address in a URL is checked by
:func:`check_literal` (aiohttp does not resolve those). ``controller.image_fetch_private`` lifts it for an image
server on the LAN.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult


class NotPublicAddress(OSError):
    """A host is, or resolves to, an address that is not public (loopback, private, link-local, ...)."""

    def __init__(self, host: str, address: str) -> None:
        self.host = host
        self.address = address
        resolved = "is" if host == address else f"resolves to {address}, which is"
        super().__init__(f"'{host}' {resolved} not a public address")


def is_public(address: str) -> bool:
    """Whether ``address`` is a global unicast address (an IPv4-mapped IPv6 address judged as its IPv4 one)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is no part of the address
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_literal(host: str) -> None:
    """Refuse ``host`` when it is a literal address that is not public (a name passes: the resolver checks it).

    :raises NotPublicAddress: naming it.
    """
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return
    if not is_public(host):
        raise NotPublicAddress(host, host)


class PublicAddressResolver(AbstractResolver):
    """Resolves with ``inner`` and refuses a name any of whose addresses is not public."""

    def __init__(self, inner: AbstractResolver) -> None:
        self.inner = inner

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        results: list[ResolveResult] = await self.inner.resolve(host, port, family)
        for result in results:
            if not is_public(result["host"]):
                raise NotPublicAddress(host, result["host"])
        return results

    async def close(self) -> None:
        await self.inner.close()
