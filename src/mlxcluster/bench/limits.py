"""``mlxcluster bench limits``: one key's ``rpm`` held across two controllers (issue 22's target).

nats-server with JetStream, two controller processes on their own ports (peers on the bus, leasing from one
``P_limits`` bucket) and an echo worker. A key made at runtime with ``rpm = 600``; 64 clients split between
the controllers send short requests for 60 s; a refused client waits a little and tries again. Figures: the
requests admitted in each minute window (placed by the ``x-ratelimit-reset-requests`` header of each 200, so a
request that straddles a minute's edge is counted in the window that admitted it), whether every 429 carries
OpenAI's rate-limit headers consistent with the window, and whether the usage the cluster kept for the key
equals the count of 200s. Every client loop is bounded by count and time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import msgspec

from mlxcluster.bench.nats import free_port
from mlxcluster.bench.procs import BenchCluster
from mlxcluster.bench.stats import machine_line
from mlxcluster.config import from_dict
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.tables import table

KEY_NAME = "bench-rpm"
WINDOW_S = 60
ALLOWED_OVER = 1.05
"""The target: admitted ≤ 1.05 × rpm in every minute window (630 for 600)."""
RETRY_PAUSE_S = 0.1
"""A refused client's pause before it tries again: the load stays bounded (≤ 10 requests/s per client)."""
MAX_REQUESTS_PER_CLIENT = 5_000


class WindowRow(msgspec.Struct):
    """One minute window: the requests admitted in it, by controller."""

    minute: int
    """Unix minute (seconds // 60)."""
    admitted: int
    by_controller: dict[str, int]
    seconds_covered: float
    """How much of the minute the load ran in."""


class LimitsBenchResult(msgspec.Struct):
    """What ``bench limits`` measured."""

    machine: str
    rpm: int
    controllers: int
    clients: int
    seconds: float
    requests: int
    admitted: int
    refused: int
    other: dict[str, int]
    """Answers other than 200 and 429, by status (and ``error`` for failed connections)."""
    windows: list[WindowRow]
    max_admitted: int
    allowed: int
    """``rpm`` × 1.05, the target's bound."""
    header_problems: int
    """429s whose rate-limit headers are missing or disagree with the window (see ``header_examples``)."""
    header_examples: list[str]
    usage_requests: int
    """``GET /api/cluster/usage`` for the key, read after the run: the requests it counts as answered 200."""
    usage_matches: bool
    unplaced: int = 0
    """200s without a usable ``x-ratelimit-reset-requests`` header (not placed in a window)."""
    quick: bool = False

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()


@dataclass
class _Tally:
    """What the clients saw, filled in as answers arrive."""

    window_admits: Counter[tuple[int, str]] = field(default_factory=Counter)
    window_spans: dict[int, list[float]] = field(default_factory=dict)
    admitted: int = 0
    refused: int = 0
    unplaced: int = 0
    other: Counter[str] = field(default_factory=Counter)
    header_problems: int = 0
    header_examples: list[str] = field(default_factory=list)

    def cover(self, at: float) -> None:
        span = self.window_spans.setdefault(int(at // WINDOW_S), [at, at])
        span[0], span[1] = min(span[0], at), max(span[1], at)

    def problem(self, text: str) -> None:
        self.header_problems += 1
        if len(self.header_examples) < 5:
            self.header_examples.append(text)


_DURATION = re.compile(r"^(?:(\d+)m)?(?:([\d.]+)s)?$|^(\d+)ms$")


def parse_reset(text: str) -> float | None:
    """Seconds in OpenAI's ``x-ratelimit-reset-*`` format (``20ms``, ``6s``, ``1m30s``); None if not one."""
    match = _DURATION.match(text.strip())
    if match is None or not text.strip():
        return None
    minutes, seconds, millis = match.groups()
    if millis is not None:
        return int(millis) / 1000
    return int(minutes or 0) * 60 + float(seconds or 0)


def admitted_minute(received_at: float, reset: float) -> int:
    """The minute window that admitted a request answered at ``received_at`` whose reset header said ``reset``
    seconds: the window ends at the multiple of 60 nearest to the two added (the header's rounding and the
    request's latency are far below half a minute)."""
    return round((received_at + reset) / WINDOW_S) - 1


def check_refusal(status: int, headers: dict[str, str], rpm: int, received_at: float) -> str | None:
    """What is wrong with a 429's rate-limit headers, or None: the limit is the key's ``rpm``, the remaining
    count lies within it, ``Retry-After`` and the reset both point at the end of the current minute."""
    limit = headers.get("x-ratelimit-limit-requests")
    remaining = headers.get("x-ratelimit-remaining-requests")
    reset_text = headers.get("x-ratelimit-reset-requests")
    retry_after = headers.get("retry-after")
    if status != 429:
        return None
    if limit != str(rpm):
        return f"x-ratelimit-limit-requests {limit!r}, expected {rpm}"
    if remaining is None or not remaining.isdigit() or int(remaining) > rpm:
        return f"x-ratelimit-remaining-requests {remaining!r}"
    reset = parse_reset(reset_text or "")
    if reset is None or not 0 <= reset <= WINDOW_S:
        return f"x-ratelimit-reset-requests {reset_text!r}"
    to_minute_end = WINDOW_S - received_at % WINDOW_S
    if abs(reset - to_minute_end) > 1.5 and abs(reset - to_minute_end) < WINDOW_S - 1.5:
        return f"x-ratelimit-reset-requests {reset_text!r} but the minute ends in {to_minute_end:.1f}s"
    if retry_after is None or not retry_after.isdigit() or not 1 <= int(retry_after) <= WINDOW_S:
        return f"retry-after {retry_after!r}"
    if abs(int(retry_after) - reset) > 1.5:
        return f"retry-after {retry_after} against x-ratelimit-reset-requests {reset_text}"
    return None


async def _client(
    session: aiohttp.ClientSession, url: str, label: str, secret: str, rpm: int, deadline: float, tally: _Tally
) -> None:
    body = {"model": "echo", "max_tokens": 4, "messages": [{"role": "user", "content": "ping"}]}
    headers = {"Authorization": f"Bearer {secret}"}
    for _ in range(MAX_REQUESTS_PER_CLIENT):
        if time.time() >= deadline:
            return
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                await response.read()
                status, answer_headers = response.status, {k.lower(): v for k, v in response.headers.items()}
        except (aiohttp.ClientError, OSError):
            tally.other["error"] += 1
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        received_at = time.time()
        tally.cover(received_at)
        if status == 200:
            tally.admitted += 1
            reset = parse_reset(answer_headers.get("x-ratelimit-reset-requests", ""))
            if reset is None:
                tally.unplaced += 1
            else:
                tally.window_admits[(admitted_minute(received_at, reset), label)] += 1
        elif status == 429:
            tally.refused += 1
            problem = check_refusal(status, answer_headers, rpm, received_at)
            if problem is not None:
                tally.problem(problem)
            await asyncio.sleep(RETRY_PAUSE_S)
        else:
            tally.other[str(status)] += 1
            await asyncio.sleep(RETRY_PAUSE_S)


async def _create_key(session: aiohttp.ClientSession, url: str, admin: str, rpm: int) -> str:
    async with session.post(
        f"{url}/api/cluster/keys",
        json={"name": KEY_NAME, "rpm": rpm},
        headers={"Authorization": f"Bearer {admin}"},
    ) as response:
        if response.status != 201:
            raise RuntimeError(f"creating the bench key answered {response.status}: {await response.text()}")
        secret: str = (await response.json())["key"]
        return secret


async def _wait_for_key(session: aiohttp.ClientSession, urls: list[str], secret: str, timeout: float = 10.0) -> None:
    """Until every controller knows the new key (``/v1/models`` is authenticated but not rate limited)."""
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            async with session.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not learn the key within {timeout:.0f}s")
            await asyncio.sleep(0.1)


async def _usage_requests(session: aiohttp.ClientSession, url: str, admin: str, expected: int) -> int:
    """The key's 200s as the cluster's usage counts them, read until it equals ``expected`` or stops moving
    (usage is appended to the stream as requests finish; give it up to 10 s)."""
    deadline = time.monotonic() + 10.0
    while True:
        async with session.get(
            f"{url}/api/cluster/usage", params={"key": KEY_NAME}, headers={"Authorization": f"Bearer {admin}"}
        ) as response:
            response.raise_for_status()
            requests: int = (await response.json())["requests"]
        if requests == expected or time.monotonic() > deadline:
            return requests
        await asyncio.sleep(0.5)


async def run_limits_bench(
    *, rpm: int = 600, clients: int = 64, seconds: float = 60.0, quick: bool = False
) -> LimitsBenchResult:
    """Start nats-server (JetStream), two controllers and an echo worker; hammer one key through both."""
    admin = "sk-bench-admin-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="mlxcluster-bench-limits-") as store:
        port = free_port()
        config = from_dict(
            {
                "nats": {
                    "url": f"nats://127.0.0.1:{port}",
                    "embedded": {"port": port, "http_port": 0, "jetstream": True, "store_dir": store},
                }
            }
        )
        server = EmbeddedNatsServer(config.nats)
        await server.start()
        env = {"MLXCLUSTER_WORKER_ENGINE": "echo", "MLXCLUSTER_CONTROLLER_API_KEYS": admin}
        cluster = BenchCluster(nats_url=server.url, env=env, api_key=admin)
        try:
            urls = [cluster.start_controller(), cluster.start_controller(port=free_port())]
            cluster.start_worker("bench-limits-w1")
            for url in urls:
                await cluster.wait_for_workers(1, base_url=url)
            tally = _Tally()
            timeout = aiohttp.ClientTimeout(total=30)
            connector = aiohttp.TCPConnector(limit=clients)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                secret = await _create_key(session, urls[0], admin, rpm)
                await _wait_for_key(session, urls, secret)
                started = time.time()
                deadline = started + seconds
                labels = [f"c{i + 1}" for i in range(len(urls))]
                await asyncio.gather(
                    *(
                        _client(session, urls[i % len(urls)], labels[i % len(urls)], secret, rpm, deadline, tally)
                        for i in range(clients)
                    )
                )
                elapsed = time.time() - started
                usage = await _usage_requests(session, urls[1], admin, tally.admitted)
        finally:
            cluster.stop()
            await server.stop()
    windows = _windows(tally, labels)
    other = dict(tally.other)
    return LimitsBenchResult(
        machine=machine_line(),
        rpm=rpm,
        controllers=len(urls),
        clients=clients,
        seconds=round(elapsed, 1),
        requests=tally.admitted + tally.refused + sum(other.values()),
        admitted=tally.admitted,
        refused=tally.refused,
        other=other,
        windows=windows,
        max_admitted=max((w.admitted for w in windows), default=0),
        allowed=int(rpm * ALLOWED_OVER),
        header_problems=tally.header_problems,
        header_examples=tally.header_examples,
        usage_requests=usage,
        usage_matches=usage == tally.admitted,
        unplaced=tally.unplaced,
        quick=quick,
    )


def _windows(tally: _Tally, labels: list[str]) -> list[WindowRow]:
    minutes = sorted({minute for minute, _ in tally.window_admits} | set(tally.window_spans))
    rows = []
    for minute in minutes:
        by = {label: tally.window_admits[(minute, label)] for label in labels}
        span = tally.window_spans.get(minute, [0.0, 0.0])
        rows.append(
            WindowRow(
                minute=minute, admitted=sum(by.values()), by_controller=by, seconds_covered=round(span[1] - span[0], 1)
            )
        )
    return rows


def format_table(result: LimitsBenchResult) -> str:
    """The windows, then the three checks against the issue's target."""
    rows = [
        [
            time.strftime("%H:%M", time.gmtime(w.minute * WINDOW_S)),
            f"{w.seconds_covered:.0f}",
            str(w.admitted),
            " / ".join(str(n) for n in w.by_controller.values()),
        ]
        for w in result.windows
    ]
    lines = [
        f"machine: {result.machine}",
        f"engine: echo (no model); {result.controllers} controller processes on their own ports, one nats-server "
        f"with JetStream; key rpm = {result.rpm}; {result.clients} clients for {result.seconds:.0f} s "
        f"(a refused client pauses {RETRY_PAUSE_S:.1f} s){' (quick)' if result.quick else ''}",
        "",
        table(["window (UTC)", "seconds of load", "admitted", "by controller"], rows),
        "",
        f"requests {result.requests}: 200 {result.admitted}, 429 {result.refused}"
        + "".join(f", {status} {count}" for status, count in sorted(result.other.items()))
        + (f"; {result.unplaced} 200s without a reset header" if result.unplaced else ""),
        f"most admitted in one window: {result.max_admitted} (target ≤ {result.allowed}: "
        f"{'met' if result.max_admitted <= result.allowed else 'NOT met'})",
        f"429 rate-limit headers: {result.refused - result.header_problems} of {result.refused} correct"
        + (f" (e.g. {'; '.join(result.header_examples)})" if result.header_examples else ""),
        f"usage kept for the key: {result.usage_requests} requests against {result.admitted} 200s "
        f"({'equal' if result.usage_matches else 'NOT equal'})",
    ]
    return "\n".join(lines)
