"""Dual mode's supervisor: a controller that cannot start with its settings stops the cluster, not a restart loop
(a worker that cannot start: tests/test_start_stop.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from loopback import free_port


def test_dual_stops_with_exit_2_when_the_controller_cannot_start(tmp_path) -> None:
    env = {
        **os.environ,
        "MLXCLUSTER_LOAD_BALANCING_STRATEGY": "no-such-balancer",
        "MLXCLUSTER_NATS_EMBEDDED_PORT": str(free_port()),
        "MLXCLUSTER_NATS_EMBEDDED_HTTP_PORT": "0",
        "MLXCLUSTER_CONTROLLER_PORT": str(free_port()),
        "MLXCLUSTER_WORKER_ENGINE": "echo",
    }
    env.pop("MLXCLUSTER_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "mlxcluster", "run", "--mode", "dual"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 2
    assert "load_balancing.strategy: unknown balancer 'no-such-balancer'" in done.stderr
    assert "restarting" not in done.stderr  # stopped at once, no backoff loop
