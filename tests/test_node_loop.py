"""Controllers and workers run on uvloop where it is installed (the supervisor keeps asyncio's loop), with their
start-up heap frozen out of the garbage collector's walks."""

from __future__ import annotations

import asyncio
import gc

import uvloop

from mlxcluster.heap import freeze_startup_heap
from mlxcluster.roles import fast_loop_factory


def test_controllers_and_workers_get_uvloop() -> None:
    factory = fast_loop_factory()
    assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        assert runner.run(asyncio.sleep(0, result="ran")) == "ran"


def test_the_start_up_heap_is_frozen_out_of_collections() -> None:
    started = [object() for _ in range(100)], {"config": [1, 2, 3]}
    gc.unfreeze()
    try:
        freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen >= 100  # at least what we allocated; a full collection no longer walks any of it
        assert gc.collect() == 0 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
    assert started
