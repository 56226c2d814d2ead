"""The worker role's lifetime: started by ``mlxcluster run --mode worker``."""

from __future__ import annotations

import asyncio
import logging

from mlxcluster.bus import Bus
from mlxcluster.config import Config

log = logging.getLogger(__name__)


async def serve_worker(config: Config, bus: Bus, stop: asyncio.Event) -> None:
    """Join the bus and wait for the stop signal (the worker service is added by its own issue)."""
    log.info("worker joined NATS; waiting for SIGINT/SIGTERM")
    await stop.wait()
