"""The fault harness itself: a worker process that dies while a test waits for it fails the wait at once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fault_harness import Controller, Processes, base_env
from loopback import free_port

pytestmark = pytest.mark.timeout(120)


async def test_a_watched_process_that_exits_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        # a stand-in controller process (its API answers nothing) and a member that dies at import
        standin = procs.spawn("controller", [sys.executable, "-c", "import time; time.sleep(120)"], base_env())
        controller = Controller(standin, free_port())
        member = procs.spawn("grp-r0", [sys.executable, "-c", "import mlxcluster_no_such_module"], base_env())
        with pytest.raises(AssertionError) as info:
            await controller.wait_status(["grp"], "online", 600, watch=[member])
        message = str(info.value)
        assert message.startswith("grp-r0 exited (1)") and "ModuleNotFoundError" in message  # not the timeout
        # unwatched, the same wait runs to its (here short) timeout
        with pytest.raises(AssertionError, match="timed out"):
            await controller.wait_status(["grp"], "online", 0.5)
    finally:
        procs.close()
