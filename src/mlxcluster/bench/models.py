"""``mlxcluster bench models``: models as a fleet (issue 20's four targets) on the model-family fixtures.

An embedded nats-server, one controller (``create_app`` on a loopback port) and one mlx worker through the real
worker role (:func:`~mlxcluster.worker.worker_role.serve_worker`, a catalogue of fixture dirs, nothing loaded at
start), all in this process; a fresh controller and worker per part, each with the memory budget the part
needs. Every request goes through the controller's HTTP API (greedy, non-streamed); the worker's heartbeats
are read off the bus as the controller reads them. The four parts:

1. **Load on demand**: the first request for a catalogued model that is not loaded, against an admin load
   (timed) plus one request on the loaded model (timed), the model unloaded between repetitions; medians.
   Target: first ≤ 1.2 × (load + warm request).
2. **8 concurrent first requests**: one load (the controller's ``loads_started``, the worker host's ``loads``,
   the worker log's "loading model" lines), all answered.
3. **A budget that holds one of two models**: requests alternate between two models whose weights do not fit
   together; every heartbeat's weights + prompt cache + KV must stay within the budget, no request may fail.
4. **Admission by bytes**: 16 concurrent long-context requests on a budget that holds the weights and the
   projected KV of 4: all complete, the budget's peak stays within it, at most 4 run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from mlxcluster.bench.nats import bench_config, free_port
from mlxcluster.bench.stats import machine_line
from mlxcluster.config import Config, from_dict
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import MemoryParts, WorkerHeartbeat
from mlxcluster.tables import table

if TYPE_CHECKING:  # importing the worker pulls mlx in
    from mlxcluster.controller.http.context import ControllerContext
    from mlxcluster.worker.model_host import ModelHost

FIRST_TARGET = 1.2
"""Part 1's target: first request ≤ 1.2 × (load + warm request)."""
REQUEST_TIMEOUT_S = 180.0
PART_TIMEOUT_S = 600.0
POLL_S = 0.005
HEARTBEAT_MS = 250
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


class ModelsSettings(msgspec.Struct, frozen=True):
    """What ``bench models`` runs (fixture names under ``--families-dir``)."""

    load_model: str = "qwen3"
    """Parts 1 and 2: the model loaded on demand."""
    repetitions: int = 3
    first_tokens: int = 16
    concurrent_first: int = 8
    pair: tuple[str, str] = ("llama3", "mistral")
    """Part 3: the two models that do not fit the budget together."""
    alternations: int = 10
    pair_tokens: int = 16
    admission_model: str = "mistral"
    concurrent_long: int = 16
    fit: int = 4
    """Part 4: requests whose projected KV the budget holds beside the weights."""
    long_prompt_words: int = 200
    long_tokens: int = 128
    context_tokens: int = 512
    """Part 4: each request's prompt plus ``long_tokens`` stays within this (checked from usage)."""

    @classmethod
    def quick(cls) -> ModelsSettings:
        return cls(repetitions=2, alternations=4, concurrent_long=8, fit=2, long_tokens=64)

    def families(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.load_model, *self.pair, self.admission_model)))


class TargetRow(msgspec.Struct):
    """One of the issue's targets: what was measured, the target, and whether it was met."""

    part: str
    measured: str
    target: str
    met: bool
    detail: str = ""


class LoadSample(msgspec.Struct):
    """One repetition of part 1 (seconds): the on-demand first request; the admin load, the warm request (the
    second on the loaded model) and the first request after the admin load."""

    first_s: float
    load_s: float
    warm_s: float
    after_load_s: float = 0.0


class ModelsResult(msgspec.Struct):
    machine: str
    settings: ModelsSettings
    quick: bool = False
    rows: list[TargetRow] = []
    samples: list[LoadSample] = []
    notes: list[str] = []
    error: str = ""

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


# --- the cluster --------------------------------------------------------------------------------


@dataclass
class Fleet:
    """One controller and one worker (in this process) over one nats-server; what a part reads of them."""

    url: str
    ctx: ControllerContext
    host: ModelHost
    worker_id: str
    heartbeats: list[MemoryParts] = field(default_factory=list)
    """The worker's memory parts, one per heartbeat."""
    loading_lines: list[str] = field(default_factory=list)
    """The worker log's "loading model" lines (the model's name each)."""
    session: aiohttp.ClientSession | None = None

    async def chat(self, model: str, text: str, max_tokens: int) -> tuple[int, float, dict[str, Any]]:
        """One greedy chat completion: its status, seconds, body."""
        assert self.session is not None
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        started = time.perf_counter()
        async with self.session.post(f"{self.url}/v1/chat/completions", json=body) as response:
            answer = await response.json(content_type=None)
            return response.status, time.perf_counter() - started, answer

    async def admin(self, model: str, action: str) -> tuple[int, float, dict[str, Any]]:
        assert self.session is not None
        started = time.perf_counter()
        async with self.session.post(f"{self.url}/api/cluster/models/{model}/{action}", json={}) as response:
            answer = await response.json(content_type=None)
            return response.status, time.perf_counter() - started, answer

    async def loaded(self, model: str) -> list[str]:
        assert self.session is not None
        async with self.session.get(f"{self.url}/v1/models") as response:
            listing = await response.json()
        return next((m["loaded_on"] for m in listing["data"] if m["id"] == model), [])


class _LoadingLines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "loading model %s (%s)" and isinstance(record.args, tuple) and record.args:
            self.lines.append(str(record.args[0]))


def fleet_config(nats: Config, worker_id: str, dirs: list[Path], budget: int) -> Config:
    return from_dict(
        {
            "nats": {"url": nats.nats.url, "embedded": {"port": nats.nats.embedded.port, "http_port": 0}},
            "controller": {"port": free_port()},
            "discovery": {"heartbeat_interval_ms": HEARTBEAT_MS, "offline_timeout_ms": 10_000},
            "worker": {
                "id": worker_id,
                "models": [str(d) for d in dirs],
                "memory_budget_bytes": budget,
                "max_concurrent": 32,
                "keep_alive": "10m",
            },
        }
    )


@contextlib.asynccontextmanager
async def fleet(nats: Config, worker_id: str, dirs: list[Path], budget: int) -> AsyncIterator[Fleet]:
    """A controller and one mlx worker whose catalogue is ``dirs`` (none loaded) under ``budget`` bytes."""
    from aiohttp import web

    from mlxcluster.bus import Bus
    from mlxcluster.controller.app import create_app
    from mlxcluster.controller.http.context import CONTROLLER
    from mlxcluster.plugins import get_plugin_manager
    from mlxcluster.worker.worker_role import serve_worker

    config = fleet_config(nats, worker_id, dirs, budget)
    hosts: list[ModelHost] = []
    lines: list[str] = []
    handler = _LoadingLines(lines)
    host_log = logging.getLogger("mlxcluster.worker.model_host")
    level = host_log.level
    host_log.addHandler(handler)
    host_log.setLevel(logging.INFO)
    worker_bus = await Bus.connect(config.nats, name=f"bench-models-{worker_id}", attempts=5)
    controller_bus = await Bus.connect(config.nats, name="bench-models-controller", attempts=5)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve_worker(config, worker_bus, stop, on_host=hosts.append))
    app = create_app(config, controller_bus, get_plugin_manager(config.plugins))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2)
    heartbeats: list[MemoryParts] = []

    async def on_heartbeat(beat: WorkerHeartbeat, _msg: Any) -> None:
        if beat.worker_id == worker_id and beat.memory is not None:
            heartbeats.append(beat.memory)

    subscription = await controller_bus.subscribe(controller_bus.subjects.heartbeat, WorkerHeartbeat, on_heartbeat)
    try:
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            deadline = time.monotonic() + 60
            while True:  # until the controller lists the worker online
                if serving.done():
                    serving.result()
                    raise RuntimeError(f"worker {worker_id} stopped before it came online")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{url}/api/cluster/workers?status=online") as response:
                        if [w["id"] for w in (await response.json())["workers"]] == [worker_id]:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {worker_id} not online within 60 s")
                await asyncio.sleep(0.05)
            yield Fleet(url, app[CONTROLLER], hosts[0], worker_id, heartbeats, lines, session)
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 30)
        await runner.cleanup()
        await worker_bus.close()
        await controller_bus.close()
        host_log.removeHandler(handler)
        host_log.setLevel(level)


def prompt(index: int, words: int) -> str:
    """A distinct prompt of about ``words`` words (``index`` first, so no two share a cached prefix)."""
    return f"{index}: " + " ".join(WORDS[(index + i) % len(WORDS)] for i in range(words))


def _failed(status: int, body: dict[str, Any]) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message", "") if isinstance(error, dict) else str(body)[:200]
    return f"{status}: {message}"[:200]


async def _wait_unloaded(fleet: Fleet, model: str) -> None:
    deadline = time.monotonic() + 30
    while await fleet.loaded(model) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _controller_view(fleet: Fleet, model: str) -> str:
    """What the controller's registry holds of ``model`` on the fleet's worker: its state and requests in flight."""
    for worker in fleet.ctx.registry.fleet():
        if worker.id == fleet.worker_id:
            state = worker.states.get(model)
            if state is None:
                return f"{model} not loaded"
            return f"{model} {state.state} with {state.in_flight} request(s) in flight"
    return "no such worker"


def weights_of(path: Path) -> int:
    from mlxcluster.worker.catalogue import model_facts

    return model_facts(str(path), path.name, "local").weights_bytes


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


# --- the parts ----------------------------------------------------------------------------------


async def part_load(nats: Config, paths: dict[str, Path], s: ModelsSettings, result: ModelsResult) -> None:
    """Parts 1 and 2: on-demand load time against admin load + warm request; 8 concurrent first requests."""
    model = s.load_model
    path = paths[model]
    budget = 4 * weights_of(path) + (256 << 20)
    async with fleet(nats, "bench-load", [path], budget) as f:
        failures: list[str] = []
        text = prompt(0, 20)
        await f.admin(model, "load")  # warm-up, not timed: this process's one-time costs (imports, BLAS)
        await f.chat(model, text, s.first_tokens)
        await f.admin(model, "unload")
        await _wait_unloaded(f, model)
        for _ in range(s.repetitions):
            status, load_s, body = await f.admin(model, "load")
            if status != 200:
                failures.append("admin load " + _failed(status, body))
            status, after_s, body = await f.chat(model, text, s.first_tokens)
            if status != 200:
                failures.append("after load " + _failed(status, body))
            status, warm_s, body = await f.chat(model, text, s.first_tokens)
            if status != 200:
                failures.append("warm " + _failed(status, body))
            await f.admin(model, "unload")
            await _wait_unloaded(f, model)
            status, first_s, body = await f.chat(model, text, s.first_tokens)
            if status != 200:
                failures.append("first " + _failed(status, body))
            await f.admin(model, "unload")
            await _wait_unloaded(f, model)
            result.samples.append(LoadSample(round(first_s, 4), round(load_s, 4), round(warm_s, 4), round(after_s, 4)))
        first = statistics.median(x.first_s for x in result.samples)
        load = statistics.median(x.load_s for x in result.samples)
        warm = statistics.median(x.warm_s for x in result.samples)
        ratio = first / (load + warm) if load + warm > 0 else 0.0
        result.rows.append(
            TargetRow(
                "1. load on demand",
                f"first {first * 1000:.0f} ms = {ratio:.2f}× (load {load * 1000:.0f} + warm {warm * 1000:.0f} ms)",
                f"≤ {FIRST_TARGET}×",
                not failures and 0 < ratio <= FIRST_TARGET,
                f"{model} ({_gib(weights_of(path))}), {s.first_tokens} tokens, medians of {s.repetitions} after an "
                f"untimed warm-up; warm = the 2nd request after an admin load (the 1st: "
                f"{statistics.median(x.after_load_s for x in result.samples) * 1000:.0f} ms)"
                + (f"; failed: {failures[0]}" if failures else ""),
            )
        )

        loads_before, host_before, lines_before = f.ctx.loader.loads_started, f.host.loads, len(f.loading_lines)
        answers = await asyncio.gather(
            *(f.chat(model, prompt(100 + i, 20), s.first_tokens) for i in range(s.concurrent_first))
        )
        ok = sum(1 for status, _, _ in answers if status == 200)
        controller_loads = f.ctx.loader.loads_started - loads_before
        host_loads = f.host.loads - host_before
        log_loads = sum(1 for name in f.loading_lines[lines_before:] if name == model)
        result.rows.append(
            TargetRow(
                f"2. {s.concurrent_first} concurrent first requests",
                f"{controller_loads} load (controller), {host_loads} (worker), {log_loads} log line; "
                f"{ok}/{s.concurrent_first} answered 200",
                f"1 load, {s.concurrent_first}/{s.concurrent_first} 200",
                controller_loads == host_loads == log_loads == 1 and ok == s.concurrent_first,
                "slowest answer "
                f"{max(t for _, t, _ in answers) * 1000:.0f} ms"
                + "".join(f"; {_failed(st, b)}" for st, _, b in answers if st != 200)[:300],
            )
        )


async def part_pair(nats: Config, paths: dict[str, Path], s: ModelsSettings, result: ModelsResult) -> None:
    """Part 3: a budget that holds either model of the pair with some KV, never both; requests alternate, each
    sent as soon as the one before was answered, then again paced two heartbeats apart (a diagnostic: the
    controller places a load from the worker's last heartbeat)."""
    a, b = s.pair
    weights = {m: weights_of(paths[m]) for m in s.pair}
    kv_room = min(weights.values()) // 2
    budget = max(weights.values()) + kv_room
    assert sum(weights.values()) > budget
    async with fleet(nats, "bench-pair", [paths[a], paths[b]], budget) as f:
        for label, pause_s in (("back to back", 0.0), ("paced", 2 * HEARTBEAT_MS / 1000)):
            failures: list[str] = []
            stale: list[str] = []
            loads_before, unloads_before, beats_before = f.host.loads, f.host.unloads, len(f.heartbeats)
            for i in range(s.alternations):
                model = (a, b)[i % 2]
                status, _, body = await f.chat(model, prompt(200 + i, 20), s.pair_tokens)
                if status != 200:
                    failures.append(f"{model} " + _failed(status, body))
                    stale.append(_controller_view(f, (b, a)[i % 2]))
                await asyncio.sleep(pause_s)
            await asyncio.sleep(2 * HEARTBEAT_MS / 1000)  # the last heartbeats
            beats = f.heartbeats[beats_before:]
            sums = [p.weights_bytes + p.prompt_cache_bytes + p.kv_bytes for p in beats]
            over = sum(1 for total in sums if total > budget)
            top = max(sums, default=0)
            peak = f.host.budget.peak_bytes
            paced = f", {pause_s * 1000:.0f} ms apart (diagnostic)" if pause_s else ""
            result.rows.append(
                TargetRow(
                    f"3. budget holds one of two models{'' if not pause_s else ' (paced)'}",
                    f"max heartbeat sum {top / budget:.3f}× budget ({len(beats)} heartbeats, {over} over), "
                    f"peak {peak / budget:.3f}×; {s.alternations - len(failures)}/{s.alternations} answered 200",
                    "every heartbeat ≤ 1×, 0 failures",
                    bool(beats) and over == 0 and peak <= budget and not failures,
                    f"{s.alternations} requests alternating {label}{paced}: {a} {_gib(weights[a])} / "
                    f"{b} {_gib(weights[b])}, budget {_gib(budget)}; loads {f.host.loads - loads_before}, "
                    f"unloads {f.host.unloads - unloads_before}"
                    + (f"; {len(failures)} failed, e.g. {failures[0]}" if failures else ""),
                )
            )
            if failures:
                result.notes.append(
                    f"part 3 {label}: at {sum(' with 0 ' not in v for v in stale)} of the {len(failures)} refusals "
                    f"the controller's registry (the worker's last heartbeat) showed the other model busy (e.g. "
                    f"{stale[0]}), although the worker had answered that model's request: "
                    "placement found nothing idle to evict. The worker releases a request's model after its Done "
                    "frame and sends no heartbeat for that, so the controller learns the model is idle only at "
                    f"the next periodic heartbeat ({HEARTBEAT_MS} ms here, discovery.heartbeat_interval_ms, 2 s by "
                    "default)"
                )


async def part_admission(nats: Config, paths: dict[str, Path], s: ModelsSettings, result: ModelsResult) -> None:
    """Part 4: concurrent long requests on a budget that holds the weights and ``fit`` of them."""
    from mlxcluster.worker.kv_size import kv_size

    model = s.admission_model
    path = paths[model]
    size = kv_size(path)
    assert size is not None
    each = size.projected(s.context_tokens)
    weights = weights_of(path)
    budget = weights + s.fit * each + each // 2
    async with fleet(nats, "bench-admission", [path], budget) as f:
        status, _, body = await f.admin(model, "load")
        if status != 200:
            raise RuntimeError("admin load " + _failed(status, body))
        budget_bytes = f.host.budget
        most = 0
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal most
            while not done.is_set():
                most = max(most, budget_bytes.kv_bytes() // each)
                await asyncio.sleep(POLL_S)

        watcher = asyncio.create_task(watch())
        beats_before = len(f.heartbeats)
        started = time.perf_counter()
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        f.chat(model, prompt(300 + i, s.long_prompt_words), s.long_tokens)
                        for i in range(s.concurrent_long)
                    )
                ),
                PART_TIMEOUT_S,
            )
        finally:
            done.set()
            await watcher
        took = time.perf_counter() - started
        await asyncio.sleep(2 * HEARTBEAT_MS / 1000)
        failures = [_failed(st, b) for st, _, b in answers if st != 200]
        usages = [b.get("usage", {}) for st, _, b in answers if st == 200]
        complete = sum(1 for u in usages if u.get("completion_tokens") == s.long_tokens)
        lengths = [u.get("prompt_tokens", 0) + u.get("completion_tokens", 0) for u in usages]
        beats = f.heartbeats[beats_before:]
        top = max((p.weights_bytes + p.prompt_cache_bytes + p.kv_bytes for p in beats), default=0)
        beat_most = max((p.kv_bytes // each for p in beats), default=0)
        peak = budget_bytes.peak_bytes
        result.rows.append(
            TargetRow(
                f"4. admission by bytes ({s.concurrent_long} long requests)",
                f"{len(answers) - len(failures)}/{s.concurrent_long} answered, {complete} complete; peak "
                f"{peak / budget:.3f}× budget (heartbeats {top / budget:.3f}×); at most {most} at once",
                f"0 failures, peak ≤ 1×, ~{s.fit} at once",
                not failures and complete == s.concurrent_long and peak <= budget and top <= budget and most <= s.fit,
                f"{model}: prompt+output {min(lengths, default=0)}-{max(lengths, default=0)} tokens, "
                f"{_gib(each)} projected KV each, budget {_gib(budget)} = weights {_gib(weights)} + "
                f"{s.fit}.5 requests; {most} at once in the budget ({beat_most} in heartbeats); {took:.1f} s"
                + (f"; failed: {failures[0]}" if failures else ""),
            )
        )
        if max(lengths, default=0) > s.context_tokens:
            result.notes.append(
                f"part 4: a request held {max(lengths)} tokens, more than the {s.context_tokens} its projection "
                "assumed; the 'at once' count is then an estimate"
            )


PARTS: list[tuple[str, Callable[..., Any]]] = [("load", part_load), ("pair", part_pair), ("admission", part_admission)]


async def run_models(
    paths: dict[str, Path], settings: ModelsSettings | None = None, *, quick: bool = False, parts: str = ""
) -> ModelsResult:
    """Every part (or those named in ``parts``: load, pair, admission), each on its own controller and worker."""
    s = settings or (ModelsSettings.quick() if quick else ModelsSettings())
    result = ModelsResult(machine=machine_line(), settings=s, quick=quick)
    wanted = {p.strip() for p in parts.split(",") if p.strip()} or {name for name, _ in PARTS}
    nats = bench_config()
    server = EmbeddedNatsServer(nats.nats)
    await server.start()
    try:
        for name, part in PARTS:
            if name in wanted:
                try:
                    await asyncio.wait_for(part(nats, paths, s, result), PART_TIMEOUT_S)
                except Exception as exc:  # one part that fails does not hide the others
                    result.notes.append(f"part {name} failed: {type(exc).__name__}: {exc}"[:400])
    finally:
        await server.stop()
    return result


def format_models(result: ModelsResult) -> str:
    s = result.settings
    rows = [[r.part, r.measured, r.target, "met" if r.met else "NOT met"] for r in result.rows]
    notes = {i: r.detail for i, r in enumerate(result.rows) if r.detail}
    lines = [
        f"bench models — models as a fleet, controller + 1 mlx worker in-process over NATS — {result.machine}",
        f"fixtures: {', '.join(s.families())}; greedy, non-streamed, through the controller's HTTP API"
        + (" (quick)" if result.quick else ""),
        "",
        table(["target", "measured", "target value", "result"], rows, notes=notes),
    ]
    if result.samples:
        lines += [
            "",
            "part 1 repetitions (s): "
            + "; ".join(f"first {x.first_s:.3f} / load {x.load_s:.3f} + warm {x.warm_s:.3f}" for x in result.samples),
        ]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
