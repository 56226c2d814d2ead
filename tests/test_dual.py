"""``mlxcluster run --mode dual`` end to end, as a user starts it: a supervisor process whose children are
nats-server, the controller and a worker. Echo engine for the supervision tests; the real demo model for
the "Paris" test (marked ``model``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import psutil
import pytest
from loopback import free_port

READY_TIMEOUT_S = 60.0  # CI has two slow cores and starts three Python processes
MODEL_READY_TIMEOUT_S = 180.0
DEMO_MODEL = "SmolLM2-135M-Instruct"


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


class Dual:
    """One ``run --mode dual`` supervisor on free ports, in its own directory, killed with all its children."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        nats_port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MLXCLUSTER_")}
        if "MLXCLUSTER_MODELS_DIR" in os.environ:
            environment["MLXCLUSTER_MODELS_DIR"] = os.environ["MLXCLUSTER_MODELS_DIR"]
        environment.update(
            PYTHONUNBUFFERED="1",
            MLXCLUSTER_NATS_EMBEDDED_PORT=str(nats_port),
            MLXCLUSTER_NATS_URL=f"nats://127.0.0.1:{nats_port}",
            MLXCLUSTER_NATS_EMBEDDED_HTTP_PORT="0",
            MLXCLUSTER_CONTROLLER_PORT=str(self.port),
            MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS="200",
            MLXCLUSTER_DISCOVERY_OFFLINE_TIMEOUT_MS="1500",
            **(env or {}),
        )
        self.log_path = tmp_path / "dual.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlxcluster", "run", "--mode", "dual", *args],
                cwd=tmp_path,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.seen: dict[int, psutil.Process] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        """The supervisor's descendants now (remembered, so orphans can be killed at clean-up)."""
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update((c.pid, c) for c in found)
        return found

    def role(self, name: str) -> list[psutil.Process]:
        return [c for c in self.children() if f"--mode {name}" in cmdline(c) and alive(c)]

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited ({self.proc.returncode}) waiting for {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def http(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}

    def ready(self) -> bool:
        return self.http("/ready")[0] == 200

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)

    def cleanup(self) -> None:
        self.children()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        leftovers = [c for c in self.seen.values() if alive(c)]
        for child in leftovers:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=5)


@pytest.fixture
def start_dual(tmp_path: Path) -> Iterator[Callable[..., Dual]]:
    started: list[Dual] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Dual:
        dual = Dual(tmp_path, *args, env=env)
        started.append(dual)
        return dual

    try:
        yield start
    finally:
        for dual in started:
            dual.cleanup()


def test_dual_echo_serves_restarts_a_killed_worker_and_stops_cleanly(start_dual: Callable[..., Dual]) -> None:
    dual = start_dual("--engine", "echo")
    dual.wait_for(dual.ready, READY_TIMEOUT_S, "/ready")
    client = dual.client()
    completion = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello from dual mode"}]
    )
    assert completion.choices[0].message.content == "hello from dual mode"
    status, workers = dual.http("/api/cluster/workers?status=online")
    assert status == 200 and len(workers["workers"]) == 1
    assert workers["workers"][0]["engine"] == "echo"

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
