"""The controller role's lifetime: started by ``mlxcluster run --mode controller``."""

from __future__ import annotations

import asyncio
import logging

from mlxcluster.bus import Bus
from mlxcluster.config import Config

log = logging.getLogger(__name__)


async def serve_controller(config: Config, bus: Bus, stop: asyncio.Event) -> None:
    """Join the bus and wait for the stop signal (the controller service is added by its own issue)."""
    log.info("controller joined NATS; waiting for SIGINT/SIGTERM")
    await stop.wait()
