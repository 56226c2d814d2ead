"""``mlxcluster run --mode dual`` end to end, as a user starts it: a supervisor process whose children are
nats-server, the controller and a worker. Echo engine for the supervision tests; the real demo model for
the "Paris" test (marked ``model``)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import psutil
import pytest
from dual_harness import READY_TIMEOUT_S, Dual, alive, cmdline, dual_runs

MODEL_READY_TIMEOUT_S = 180.0
DEMO_MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
def start_dual(tmp_path: Path) -> Iterator[Callable[..., Dual]]:
    with dual_runs(tmp_path) as start:
        yield start


def test_dual_echo_serves_restarts_a_killed_worker_and_stops_cleanly(start_dual: Callable[..., Dual]) -> None:
    # the environment names another mode than the flag: the flag wins, for the children too
    dual = start_dual("--engine", "echo", env={"MLXCLUSTER_CLUSTER_MODE": "worker"})
    dual.wait_for(dual.ready, READY_TIMEOUT_S, "/ready")
    client = dual.client()
    completion = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello from dual mode"}]
    )
    assert completion.choices[0].message.content == "hello from dual mode"
    status, workers = dual.http("/api/cluster/workers?status=online")
    assert status == 200 and len(workers["workers"]) == 1
    assert workers["workers"][0]["engine"] == "echo"
    assert dual.http("/api/cluster/status")[1]["mode"] == "dual"  # its controller runs with `--mode controller`

    # A crashed worker is restarted by the supervisor and the cluster serves again.
    [worker] = dual.role("worker")
    old_pid = worker.pid
    worker.kill()
    worker.wait(timeout=10)
    dual.wait_for(lambda: [w for w in dual.role("worker") if w.pid != old_pid], READY_TIMEOUT_S, "a new worker")

    def serves() -> bool:
        if not dual.ready():
            return False
        try:
            answer = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "again"}])
        except openai.APIError:
            return False  # still routed to the dead worker's registration, or no worker yet
        return answer.choices[0].message.content == "again"

    dual.wait_for(serves, READY_TIMEOUT_S, "the restarted worker to serve")
    assert "restarting" in dual.output()

    # SIGTERM: everything stops, in order, exit code 0, no child left behind.
    children = dual.children()
    assert {"controller", "worker"} <= {r for r in ("controller", "worker") if dual.role(r)}
    assert any("nats-server" in cmdline(c) for c in children)
    dual.proc.send_signal(signal.SIGTERM)
    try:
        code = dual.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("run --mode dual did not exit within 30 s of SIGTERM\n" + dual.output()[-4000:])
    assert code == 0, dual.output()[-4000:]
    _, still_alive = psutil.wait_procs(children, timeout=5)
    assert not [cmdline(c) for c in still_alive if alive(c)], "children outlived the supervisor"
    assert "Traceback" not in dual.output()


def demo_model_available() -> bool:
    models_dir = Path(os.environ.get("MLXCLUSTER_MODELS_DIR", "~/.cache/mlxcluster/models")).expanduser()
    return models_dir.is_dir() and any(p.name.startswith(DEMO_MODEL) for p in models_dir.iterdir())


@pytest.mark.model
@pytest.mark.timeout(300)
def test_dual_with_the_demo_model_knows_paris(start_dual: Callable[..., Dual]) -> None:
    if not demo_model_available():
        pytest.skip("demo model not prepared (run `mlxcluster models demo`)")
    dual = start_dual()
    dual.wait_for(dual.ready, MODEL_READY_TIMEOUT_S, "/ready with the demo model loaded")
    client = dual.client()
    assert [m.id for m in client.models.list().data] == [DEMO_MODEL]
    completion = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
    )
    content = completion.choices[0].message.content or ""
    assert "Paris" in content, content
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 20
    assert completion.usage.prompt_tokens > 5  # counted by the model's tokenizer, chat template included
    dual.proc.send_signal(signal.SIGTERM)
    assert dual.proc.wait(timeout=60) == 0, dual.output()[-4000:]
