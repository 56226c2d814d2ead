"""``bench cluster``'s parts: the raw HTTP load generator, the bare aiohttp baseline, and one small run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from aiohttp import web
from nats.aio.msg import Msg

from mlxcluster.bench.bare import FLOOR_REPLY, FLOOR_SUBJECT, create_bare_app
from mlxcluster.bench.cluster import (
    BenchSizes,
    alternating,
    bare_responder,
    bare_server,
    format_table,
    run_cluster_bench,
    short_answer_template,
)
from mlxcluster.bench.loadgen import LoadPlan, LoadStep, encode_request, run_in_subprocess, run_plan
from mlxcluster.bench.nats import free_port
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import Accepted, Done, Token, decode_frames

TEMPLATE = {
    "object": "chat.completion",
    "model": "echo",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ping"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
BODY = '{"model":"echo","messages":[{"role":"user","content":"ping"}]}'


@pytest.fixture
async def bare_port() -> AsyncIterator[int]:
    """The bare app (its own factory) on a free loopback port."""
    runner = web.AppRunner(create_bare_app(TEMPLATE), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


def step(port: int, label: str = "bare", **changes: object) -> LoadStep:
    fields: dict[str, object] = {"label": label, "port": port, "body": BODY, "concurrency": 4, "requests": 200}
    return LoadStep(**{"seconds": 20.0, **fields, **changes})  # type: ignore[arg-type]


def test_the_request_is_well_formed_http() -> None:
    raw = encode_request(step(8080))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Content-Length: {len(BODY)}".encode() in head
    assert body == BODY.encode()


async def test_bare_handler_answers_the_template_with_fresh_ids(bare_port: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        answers = []
        for _ in range(2):
            async with session.post(f"http://127.0.0.1:{bare_port}/v1/chat/completions", data=BODY) as response:
                assert response.status == 200
                answers.append(await response.json())
    assert short_answer_template(answers[0]) == TEMPLATE
    assert answers[0]["id"].startswith("chatcmpl-") and answers[0]["id"] != answers[1]["id"]
    assert isinstance(answers[0]["created"], int)


async def test_the_bare_nats_baseline_makes_one_round_trip_per_request(nats_server: EmbeddedNatsServer) -> None:
    """``bare+nats`` answers only once the bare responder answered its NATS request: one per HTTP request."""
    import aiohttp

    seen: list[bytes] = []

    async def count(msg: Msg) -> None:
        seen.append(msg.data)

    watcher = await nats.connect(nats_server.url)
    await watcher.subscribe(FLOOR_SUBJECT, cb=count)
    await watcher.flush()
    try:
        with bare_responder(nats_server.url):
            async with bare_server(TEMPLATE, nats_server.url) as url:  # answers 200 once the responder does
                seen.clear()
                async with aiohttp.ClientSession() as session:
                    for _ in range(3):
                        async with session.post(f"{url}/v1/chat/completions", data=BODY) as response:
                            assert response.status == 200
                            assert short_answer_template(await response.json()) == TEMPLATE
        await watcher.flush()
        assert seen == [BODY.encode()] * 3
    finally:
        await watcher.close()
    assert [type(f) for f in decode_frames(FLOOR_REPLY)] == [Accepted, Token, Done]  # a short answer, batched


async def test_load_generator_counts_every_answer(bare_port: int) -> None:
    report = await run_plan(LoadPlan(steps=[step(bare_port), step(bare_port, concurrency=1, requests=50)]))
    figures = report.targets["bare"]
    assert (figures.ok, figures.errors) == (250, 0)
    assert 0 < figures.p50_ms <= figures.p90_ms <= figures.p99_ms
    assert figures.requests_per_s > 0


async def test_load_generator_counts_errors_and_refused_connections(bare_port: int) -> None:
    closed = free_port()
    plan = LoadPlan(
        steps=[
            step(bare_port, label="missing", path="/nope", requests=20),  # 404: answered, not 200
            step(closed, label="refused", requests=20),  # nothing listens: every connection fails
        ]
    )
    report = await run_plan(plan)
    assert (report.targets["missing"].ok, report.targets["missing"].errors) == (0, 20)
    assert report.targets["refused"].ok == 0 and report.targets["refused"].errors == 4


async def test_steps_are_bounded_by_time(bare_port: int) -> None:
    report = await run_plan(LoadPlan(steps=[step(bare_port, requests=10**9, seconds=0.5)]))
    figures = report.targets["bare"]
    assert figures.ok > 0 and figures.errors == 0
    assert figures.seconds < 10


async def test_alternating_plan_interleaves_targets(bare_port: int) -> None:
    plan = alternating(
        {"a": f"http://127.0.0.1:{bare_port}", "b": f"http://127.0.0.1:{bare_port}"},
        concurrency=2,
        requests=90,
        seconds=30,
        rounds=3,
    )
    assert [s.label for s in plan.steps] == ["a", "b"] * 3
    assert {s.requests for s in plan.steps} == {30}
    assert msgspec.json.decode(plan.steps[0].body)["messages"][0]["content"] == "ping"
    report = await run_in_subprocess(plan)  # its own process, as the benchmark runs it
    assert {label: f.ok for label, f in report.targets.items()} == {"a": 90, "b": 90}


async def test_a_small_cluster_run_reports_both_paths() -> None:
    sizes = BenchSizes(
        latency_requests=40,
        throughput_requests=400,
        concurrency=4,
        time_limit_s=4,
        worker_counts=(1,),
        rounds=2,
        stream_requests=4,
    )
    result = await run_cluster_bench(sizes)
    assert result.bare_p50_ms > 0 and result.cluster_p50_ms > 0
    assert result.added_p50_ms == pytest.approx(result.cluster_p50_ms - result.bare_p50_ms, abs=0.002)
    assert result.bare_requests_per_s > 0 and result.cluster_requests_per_s > 0
    assert result.throughput_ratio == pytest.approx(result.cluster_requests_per_s / result.bare_requests_per_s, 0.01)
    assert result.bare_nats_p50_ms > 0 and result.bare_nats_requests_per_s > 0  # HTTP + NATS, none of our code
    assert result.bare_nats_ratio == pytest.approx(result.bare_nats_requests_per_s / result.bare_requests_per_s, 0.01)
    assert [row.workers for row in result.throughput] == [1] and result.throughput[0].errors == 0
    assert result.stream_tokens_per_s > 0
    text = format_table(result)
    assert "bare aiohttp handler, same JSON" in text and "target ≥ 0.6×" in text
    assert "bare handler + one NATS request/reply" in text
