"""A small HTTP/1.1 load generator for ``bench cluster``, run in its own process.

Each client is one keep-alive connection that POSTs the same pre-encoded request and reads the answer by
its ``Content-Length`` (non-streamed JSON only), on uvloop where installed: a few microseconds of Python
per request, so on a machine of few cores the generator takes little from the servers it measures, and
in its own process it never runs on the event loop of the server being measured.

``python -m mlxcluster.bench.loadgen SPEC_JSON`` runs the steps of a :class:`LoadPlan` in order (steps of
different targets interleaved, so each target sees the same machine conditions) and prints one
:class:`LoadReport` as JSON. Every step is bounded by a request count and a time limit.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import cast

import msgspec

from mlxcluster.bench.stats import percentile

CONNECT_TIMEOUT_S = 10.0
GRACE_S = 10.0
"""How long past its time limit a step waits for the answers in flight (then counts them as errors)."""


class LoadStep(msgspec.Struct, frozen=True):
    """``requests`` POSTs from ``concurrency`` connections to one target, stopping early at ``seconds``."""

    label: str
    port: int
    body: str
    concurrency: int
    requests: int
    seconds: float
    path: str = "/v1/chat/completions"
    host: str = "127.0.0.1"


class LoadPlan(msgspec.Struct, frozen=True):
    steps: list[LoadStep]


class TargetFigures(msgspec.Struct):
    """All the steps of one label together."""

    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


class LoadReport(msgspec.Struct):
    targets: dict[str, TargetFigures]
    loop: str


def encode_request(step: LoadStep) -> bytes:
    """The raw HTTP/1.1 request that every connection of ``step`` sends."""
    body = step.body.encode()
    head = (
        f"POST {step.path} HTTP/1.1\r\nHost: {step.host}:{step.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _StepRun:
    """The shared state of one step: requests left, the deadline, the figures."""

    def __init__(self, step: LoadStep) -> None:
        self.step = step
        self.request = encode_request(step)
        self.stop_at = time.monotonic() + step.seconds
        self.issued = 0
        self.ok = 0
        self.errors = 0
        self.latencies_ms: list[float] = []
        self.open = 0
        self.finished = asyncio.get_running_loop().create_future()

    def may_issue(self) -> bool:
        if self.issued < self.step.requests and time.monotonic() < self.stop_at:
            self.issued += 1
            return True
        return False

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.finished.done():
            self.finished.set_result(None)


class _Client(asyncio.Protocol):
    """One keep-alive connection: send, read one whole answer, send again."""

    def __init__(self, run: _StepRun) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.expected = -1  # bytes of the current answer (head + body); -1 while its head is incomplete
        self.status = 0
        self.sent_at = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.run.open += 1
        self._next()

    def _next(self) -> None:
        assert self.transport is not None
        if self.run.may_issue():
            self.busy = True
            self.sent_at = time.perf_counter()
            self.transport.write(self.run.request)
        else:
            self.busy = False
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.expected < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            marker = head.find(b"\r\ncontent-length:")
            if marker < 0:  # chunked or streamed: not what this generator reads
                self._fail()
                return
            start = marker + len(b"\r\ncontent-length:")
            stop = head.find(b"\r\n", start)
            length = int(head[start : stop if stop >= 0 else len(head)])
            self.status = int(head[9:12])
            self.expected = end + 4 + length
        if len(buffer) < self.expected:
            return
        latency = (time.perf_counter() - self.sent_at) * 1000
        del buffer[: self.expected]
        self.expected = -1
        run = self.run
        if self.status == 200:
            run.ok += 1
            run.latencies_ms.append(latency)
        else:
            run.errors += 1
        self._next()

    def _fail(self) -> None:
        self.busy = False
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.busy = False  # an answer it still waited for is counted as unanswered
        self.run.closed()


async def run_step(step: LoadStep) -> tuple[int, int, float, list[float]]:
    """Run one step; ``(ok, errors, seconds, latencies in ms)``."""
    loop = asyncio.get_running_loop()
    run = _StepRun(step)
    started = time.perf_counter()
    clients: list[_Client] = []
    for _ in range(step.concurrency):
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, client = await loop.create_connection(lambda: _Client(run), step.host, step.port)
        except (OSError, TimeoutError):
            run.errors += 1
            continue
        clients.append(client)
    if clients:
        try:
            async with asyncio.timeout(step.seconds + GRACE_S):
                await run.finished
        except TimeoutError:  # answers still missing: hang up (they are counted below)
            for client in clients:
                if client.transport is not None:
                    client.transport.abort()
    unanswered = run.issued - run.ok - run.errors
    return run.ok, run.errors + max(0, unanswered), time.perf_counter() - started, run.latencies_ms


async def run_plan(plan: LoadPlan) -> LoadReport:
    """Every step in order; the figures of the steps of each label together."""
    samples: dict[str, list[float]] = {}
    targets: dict[str, TargetFigures] = {}
    for step in plan.steps:
        ok, errors, seconds, latencies = await run_step(step)
        figures = targets.setdefault(step.label, TargetFigures())
        figures.ok += ok
        figures.errors += errors
        figures.seconds += seconds
        samples.setdefault(step.label, []).extend(latencies)
    for label, figures in targets.items():
        figures.p50_ms = percentile(samples[label], 50)
        figures.p90_ms = percentile(samples[label], 90)
        figures.p99_ms = percentile(samples[label], 99)
    return LoadReport(targets=targets, loop=type(asyncio.get_running_loop()).__module__.split(".")[0])


async def run_in_subprocess(plan: LoadPlan, *, timeout_s: float | None = None) -> LoadReport:
    """Run ``plan`` in a fresh ``python -m mlxcluster.bench.loadgen`` process (its own cores' share)."""
    budget = timeout_s or sum(step.seconds + GRACE_S + CONNECT_TIMEOUT_S for step in plan.steps) + 30
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mlxcluster.bench.loadgen",
        msgspec.json.encode(plan).decode(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(budget):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"the load generator did not finish within {budget:.0f} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed ({process.returncode}): {err.decode(errors='replace')[-800:]}")
    return msgspec.json.decode(out, type=LoadReport)


def main(argv: list[str], loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
    plan = msgspec.json.decode(argv[0], type=LoadPlan)
    if loop_factory is None:
        from mlxcluster.roles import fast_loop_factory

        loop_factory = fast_loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        report = runner.run(run_plan(plan))
    sys.stdout.write(msgspec.json.encode(report).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
