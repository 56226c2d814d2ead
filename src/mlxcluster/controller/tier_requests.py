"""The request monitor of a whole controller tier: ``/api/cluster/requests`` on any process shows every one's.

Each controller answers :class:`RequestsQuery` on ``cluster.controller.<id>.requests`` with its own listing
(the same filters, built the same way as the route's). The controller answering the route asks every online
peer at once (:class:`ControllerPeers`), waits at most :data:`PEER_TIMEOUT_S`, and merges: requests in flight
oldest first, finished ones newest first (by the time they ended), each naming its controller. A peer that
does not answer is listed in ``unreachable`` and its requests are missing, never waited for. Nothing here is
on a request's path: it costs only the route's callers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from nats.aio.msg import Msg

from mlxcluster.bus import BusError
from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.protocol import RequestRecord, RequestsListing, RequestsQuery

PEER_TIMEOUT_S = 1.0
"""How long the answering controller waits for a peer's listing."""


def _ended(record: RequestRecord) -> float:
    return record.started + (record.total_ms or 0.0) / 1000


def merge_listings(
    listings: list[RequestsListing], *, limit: int | None = None, unreachable: list[str] | None = None
) -> dict[str, Any]:
    """One listing of several controllers' (the first is the answering one's)."""
    in_flight = sorted((r for listing in listings for r in listing.in_flight), key=lambda r: r.started)
    recent = sorted((r for listing in listings for r in listing.recent), key=_ended, reverse=True)
    if limit is not None:
        recent = recent[:limit]
    return {
        "in_flight": in_flight,
        "recent": recent,
        "recent_capacity": sum(listing.recent_capacity for listing in listings),
        "controllers": [listing.controller_id for listing in listings],
        "unreachable": sorted(unreachable or []),
    }


async def tier_requests(
    ctx: ControllerContext, peers: list[str], *, key: str | None, limit: int | None, state: str | None
) -> dict[str, Any]:
    """This controller's requests and those of ``peers`` (controller ids), merged."""
    own = ctx.ops.requests.listing(ctx.dispatcher.live, key=key, limit=limit, state=state)
    query = RequestsQuery(key=key, state=state, limit=limit)

    async def ask(peer: str) -> RequestsListing | None:
        subject = ctx.bus.subjects.controller_requests(peer)
        try:
            return await ctx.bus.request(subject, query, RequestsListing, timeout=PEER_TIMEOUT_S)
        except BusError:
            return None

    others = [peer for peer in peers if peer != ctx.controller_id]
    answers = await asyncio.gather(*(ask(peer) for peer in others))
    listings = [own, *(answer for answer in answers if answer is not None)]
    missing = [peer for peer, answer in zip(others, answers, strict=True) if answer is None]
    return merge_listings(listings, limit=limit, unreachable=missing)


async def answer_requests_queries(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: answer peers' :class:`RequestsQuery` with this controller's requests."""
    ctx = app[CONTROLLER]

    async def on_query(query: RequestsQuery, msg: Msg) -> None:
        if msg.reply:
            listing = ctx.ops.requests.listing(ctx.dispatcher.live, key=query.key, limit=query.limit, state=query.state)
            await ctx.bus.publish(msg.reply, listing)

    subscription = await ctx.bus.subscribe(
        ctx.bus.subjects.controller_requests(ctx.controller_id), RequestsQuery, on_query
    )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
