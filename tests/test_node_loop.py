"""Controllers and workers run on uvloop where it is installed; the supervisor keeps asyncio's loop."""

from __future__ import annotations

import asyncio

import uvloop

from mlxcluster.roles import fast_loop_factory


def test_controllers_and_workers_get_uvloop() -> None:
    factory = fast_loop_factory()
    assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        assert runner.run(asyncio.sleep(0, result="ran")) == "ran"
