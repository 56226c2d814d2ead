"""OpenTelemetry traces: one trace per request across the controller and the worker, joined over NATS headers.

End to end on the real nats-server with echo workers (its simulated prompt cache reports cached tokens through
the same ``Done`` frame the mlx engine fills), the controller app from its factory and the openai client. Spans
go to the SDK's in-memory exporter, or over OTLP/HTTP to a collector endpoint served here by aiohttp. With
``[tracing]`` off nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cluster_harness import Cluster, FakeWorker, start_worker, wait_until, with_sections
from loopback import free_port, make_config
from nats.aio.msg import Msg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mlxcluster import roles
from mlxcluster.bus import Bus, headers_size
from mlxcluster.config import (
    ApiKeyEntry,
    Config,
    ConfigError,
    ControllerSection,
    StaticWorker,
    TracingSection,
    from_dict,
    to_dict,
)
from mlxcluster.controller.controller_role import serve_controller
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.middleware import auth_middleware
from mlxcluster.controller.http.tracing_middleware import tracing_middleware
from mlxcluster.controller.metering.keys import KeyRing
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.errors import NodeError
from mlxcluster.protocol import Accepted, Error, InferenceRequest, Progress, Token
from mlxcluster.tracing import NoSpan, NoTracer, TracingUnavailable, build_tracer, check_tracing, stop_tracer
from mlxcluster.tracing_otel import OtelTracer, traces_url
from mlxcluster.worker.echo import EchoEngine, continued_words, echo_words
from mlxcluster.worker.engine_base import EngineFrame
from mlxcluster.worker.serve_trace import traced_frames, worker_tracer

SRC = Path(__file__).resolve().parent.parent / "src"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SYSTEM = "You are a meticulous assistant for the tracing project; answer briefly. " * 8


def memory_tracer(role: str) -> tuple[OtelTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = OtelTracer(SimpleSpanProcessor(exporter), service_name="test", role=role, instance=f"{role}-1")
    return tracer, exporter


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def in_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


# --- end to end, in memory --------------------------------------------------------------------


async def test_a_streamed_request_is_one_trace_from_the_callers_traceparent_to_the_workers_decode(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    config = with_sections(cluster_config, controller={"api_keys": ["k-trace"]})
    controller_tracer, controller_spans = memory_tracer("controller")
    worker_tracer_, worker_spans = memory_tracer("worker")
    async with Cluster(config) as cluster:
        engine = EchoEngine(models=["echo"], prompt_cache_entries=16)
        await cluster.start_worker("w1", engine=engine, tracer=worker_tracer_)
        controller = await cluster.start_controller(tracer=controller_tracer)
        registry = controller.ctx.registry
        await wait_until(lambda: registry.eligible("echo"), what="w1 online")  # the cluster API needs the key
        client = controller.client(api_key="k-trace")
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first question"}]
        first = await client.chat.completions.create(model="echo", messages=messages, max_tokens=8)  # type: ignore[arg-type]
        index = controller.ctx.cache_index
        assert index is not None
        await wait_until(lambda: len(index) > 0, what="the worker's cache events in the controller's index")
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "second question"},
        ]
        stream = await client.chat.completions.create(
            model="echo",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            stream=True,
            extra_headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text
        trace_id = int(CALLER_TRACE, 16)
        await wait_until(lambda: named(in_trace(worker_spans, trace_id), "worker.request"), what="the worker's span")

    ours = in_trace(controller_spans, trace_id)
    http = one(ours, "POST /v1/chat/completions")
    assert parent_id(http) == int(CALLER_SPAN, 16) and http.parent is not None and http.parent.is_remote
    assert http.attributes is not None and http.attributes["http.response.status_code"] == 200
    assert http.resource.attributes["service.name"] == "test-controller"
    admission, dispatch = one(ours, "admission"), one(ours, "dispatch")
    assert parent_id(admission) == parent_id(dispatch) == span_id(http)
    assert admission.attributes is not None and admission.attributes["mlxcluster.admission"] == "admitted"
    pick, attempt = one(ours, "pick"), one(ours, "attempt")
    assert parent_id(pick) == parent_id(attempt) == span_id(dispatch)
    assert pick.attributes is not None
    assert pick.attributes["mlxcluster.strategy"] == "cache_aware"
    assert pick.attributes["mlxcluster.candidates"] == 1
    assert pick.attributes["mlxcluster.worker"] == "w1"
    assert 0.0 < float(pick.attributes["mlxcluster.cache_share"]) <= 1.0  # type: ignore[arg-type]
    assert attempt.attributes is not None and attempt.attributes["mlxcluster.worker"] == "w1"
    assert [event.name for event in attempt.events] == ["accepted"]
    assert dispatch.attributes is not None and dispatch.attributes["mlxcluster.status"] == "ok"

    theirs = in_trace(worker_spans, trace_id)
    served = one(theirs, "worker.request")
    assert parent_id(served) == span_id(attempt)  # joined over the NATS message's traceparent header
    assert served.resource.attributes["service.name"] == "test-worker"
    queue, prefill, decode = one(theirs, "queue"), one(theirs, "prefill"), one(theirs, "decode")
    assert parent_id(queue) == parent_id(prefill) == parent_id(decode) == span_id(served)
    assert queue.start_time <= prefill.start_time <= prefill.end_time <= decode.start_time <= decode.end_time  # type: ignore[operator]
    assert prefill.attributes is not None and decode.attributes is not None
    cached = prefill.attributes["mlxcluster.cached_tokens"]
    assert 0 < cached <= prefill.attributes["gen_ai.usage.input_tokens"]  # type: ignore[operator]
    assert decode.attributes["gen_ai.usage.output_tokens"] == len(text.split())  # the echo of "second question"
    assert decode.attributes["mlxcluster.tokens_per_second"] > 0  # type: ignore[operator]
    # the first request, without a traceparent, was a trace of its own
    roots = [s for s in controller_spans.get_finished_spans() if s.parent is None]
    assert [s.name for s in roots] == ["POST /v1/chat/completions"]


async def test_failed_attempts_are_error_spans_under_a_503(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    controller_tracer, spans = memory_tracer("controller")
    async with Cluster(cluster_config) as cluster:
        await cluster.start_fake("f1", None)  # registered, but nobody listens on its inference subject
        controller = await cluster.start_controller(tracer=controller_tracer)
        await controller.wait_online("f1")
        with pytest.raises(openai.APIStatusError) as info:
            await controller.client().chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert info.value.status_code == 503
    finished = spans.get_finished_spans()
    http, dispatch = one(finished, "POST /v1/chat/completions"), one(finished, "dispatch")
    assert http.status.status_code == StatusCode.ERROR and dispatch.status.status_code == StatusCode.ERROR
    attempts = named(finished, "attempt")
    assert attempts and all(a.status.status_code == StatusCode.ERROR for a in attempts)
    assert "no responders" in (attempts[0].status.description or "")


async def two_words_then_a_retryable_error(fake: FakeWorker, request: InferenceRequest, msg: Msg) -> None:
    """A fake worker that loses the stream after two words (its engine reset the batch)."""
    await fake.send(msg, Accepted(worker_id=fake.id))
    words, _ = echo_words(request)
    for seq, word in enumerate(continued_words(words, request.continuation)[:2]):
        await fake.send(msg, Token(text=word, seq=seq))
    await fake.send(msg, Error(code="engine_error", message="the batch was reset", retryable=True))


async def test_a_migrated_stream_is_two_attempts_and_the_second_worker_continues_the_trace(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    config = with_sections(cluster_config, workers={"static": [StaticWorker(name="w-flaky", priority=20)]})
    controller_tracer, controller_spans = memory_tracer("controller")
    worker_tracer_, worker_spans = memory_tracer("worker")
    async with Cluster(config) as cluster:
        await cluster.start_fake("w-flaky", two_words_then_a_retryable_error)
        await cluster.start_worker("w-real", tracer=worker_tracer_)
        controller = await cluster.start_controller(tracer=controller_tracer)
        await controller.wait_online("w-flaky", "w-real")
        stream = await controller.client().chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hello brave new world"}], max_tokens=8, stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text == "hello brave new world"
        await wait_until(lambda: named(worker_spans.get_finished_spans(), "worker.request"), what="the worker's span")
    finished = controller_spans.get_finished_spans()
    dispatch = one(finished, "dispatch")
    first, second = sorted(named(finished, "attempt"), key=lambda span: span.start_time or 0)
    assert parent_id(first) == parent_id(second) == span_id(dispatch)
    assert first.status.status_code == StatusCode.ERROR and first.status.description == "engine_error"
    assert first.attributes is not None and second.attributes is not None
    assert (first.attributes["mlxcluster.continuation"], second.attributes["mlxcluster.continuation"]) == (False, True)
    (moved,) = [event for event in dispatch.events if event.name == "migrated"]
    assert moved.attributes is not None
    assert (moved.attributes["mlxcluster.from_worker"], moved.attributes["mlxcluster.to_worker"]) == (
        "w-flaky",
        "w-real",
    )
    assert dispatch.attributes is not None and dispatch.attributes["mlxcluster.migrations"] == 1
    served = one(worker_spans.get_finished_spans(), "worker.request")
    assert parent_id(served) == span_id(second)
    assert served.attributes is not None and served.attributes["mlxcluster.continuation"] is True


async def test_a_websocket_message_starts_a_trace_of_its_own(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    controller_tracer, controller_spans = memory_tracer("controller")
    worker_tracer_, worker_spans = memory_tracer("worker")
    async with Cluster(cluster_config) as cluster:
        await cluster.start_worker("w1", tracer=worker_tracer_)
        controller = await cluster.start_controller(tracer=controller_tracer)
        await controller.wait_online("w1")
        url = controller.url.replace("http://", "ws://") + "/v1/ws"
        async with controller.session().ws_connect(url) as ws:
            await ws.send_json(
                {"type": "chat", "id": "m1", "model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            )
            while (await ws.receive_json(timeout=10))["type"] not in ("done", "error"):
                pass
        await wait_until(lambda: named(worker_spans.get_finished_spans(), "worker.request"), what="the worker's span")
    dispatch = one(controller_spans.get_finished_spans(), "dispatch")
    assert dispatch.parent is None  # no HTTP request span: the WebSocket was opened by a GET, not traced
    served = one(worker_spans.get_finished_spans(), "worker.request")
    assert served.context is not None and dispatch.context is not None
    assert served.context.trace_id == dispatch.context.trace_id


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


async def test_the_mlx_engines_prefill_span_counts_the_prompt_tokens_its_cache_held(
    cluster_config: Config, nats_server: EmbeddedNatsServer, tiny_model: Path
) -> None:
    from mlxcluster.worker.engine import MlxEngine

    worker_tracer_, worker_spans = memory_tracer("worker")
    engine = MlxEngine(str(tiny_model), max_concurrent=2, prompt_cache_bytes=64 << 20)
    await engine.start()
    try:
        async with Cluster(cluster_config) as cluster:
            await cluster.start_worker("w-mlx", engine=engine, tracer=worker_tracer_)  # type: ignore[arg-type]
            controller = await cluster.start_controller(tracer=memory_tracer("controller")[0])
            await controller.wait_online("w-mlx")
            client = controller.client()
            messages = [{"role": "user", "content": "hello there " * 12}]
            first = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
            messages += [
                {"role": "assistant", "content": first.choices[0].message.content or ""},
                {"role": "user", "content": "and then?"},
            ]
            await client.chat.completions.create(
                model="tiny",
                messages=messages,  # type: ignore[arg-type]
                max_tokens=4,
                temperature=0,
                extra_headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
            )
            trace_id = int(CALLER_TRACE, 16)
            await wait_until(lambda: named(in_trace(worker_spans, trace_id), "prefill"), what="the prefill span")
    finally:
        await engine.stop()
    prefill = one(in_trace(worker_spans, trace_id), "prefill")
    assert prefill.attributes is not None
    cached, prompt = prefill.attributes["mlxcluster.cached_tokens"], prefill.attributes["gen_ai.usage.input_tokens"]
    assert 0 < cached < prompt  # type: ignore[operator]
    assert prefill.attributes["mlxcluster.computed_tokens"] == prompt - cached  # type: ignore[operator]


async def test_admission_refusals_and_a_client_gone_mid_stream_are_error_spans(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    key = ApiKeyEntry(name="small", key="k-small", rpm=2, models=["echo"])
    config = with_sections(cluster_config, controller={"keys": [key]})
    controller_tracer, spans = memory_tracer("controller")
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1", token_delay_ms=50)
        controller = await cluster.start_controller(tracer=controller_tracer)
        registry = controller.ctx.registry
        await wait_until(lambda: registry.eligible("echo"), what="w1 online")
        client = controller.client(api_key="k-small")
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
        body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "one two three four five"}]}
        headers = {"Authorization": "Bearer k-small"}
        async with controller.session().post(controller.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            await r.content.readline()  # the first event, then the client leaves
        await wait_until(lambda: len(named(spans.get_finished_spans(), "attempt")) == 1, what="the attempt's end")
        await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    finished = spans.get_finished_spans()
    outcomes = [(s.attributes or {}).get("mlxcluster.admission") for s in named(finished, "admission")]
    assert outcomes == ["model_not_allowed", "admitted", "admitted", "rate_limited:requests"]
    refused = [s for s in named(finished, "admission") if s.status.status_code == StatusCode.ERROR]
    assert [s.status.description for s in refused] == ["model_not_allowed", "rate_limited:requests"]
    statuses = [
        (s.attributes or {}).get("http.response.status_code") for s in named(finished, "POST /v1/chat/completions")
    ]
    gone = [s for s in named(finished, "POST /v1/chat/completions") if s.status.description == "client disconnected"]
    assert len(gone) == 1 and statuses.count(403) == statuses.count(429) == 1
    dispatches = named(finished, "dispatch")
    assert sorted((s.attributes or {}).get("mlxcluster.status") for s in dispatches) == ["cancelled", "ok"]


# --- OTLP over HTTP -----------------------------------------------------------------------------


class Collector:
    """An OTLP/HTTP trace receiver: ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest``."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.requests.append(message)
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def spans(self, service: str) -> list[str]:
        """Names of the spans received from ``service``."""
        names: list[str] = []
        for message in self.requests:
            for resource_spans in message.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                if attributes.get("service.name") == service:
                    names += [span.name for scope in resource_spans.scope_spans for span in scope.spans]
        return names


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield receiver, port
    await runner.cleanup()


async def test_a_controller_configured_with_an_endpoint_exports_its_spans_over_otlp_http(
    cluster_config: Config, nats_server: EmbeddedNatsServer, collector: tuple[Collector, int]
) -> None:
    receiver, port = collector
    config = with_sections(cluster_config, tracing={"endpoint": f"http://127.0.0.1:{port}", "service_name": "otlp"})
    async with Cluster(config) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller()  # builds its tracer from [tracing]
        await controller.wait_online("w1")
        assert controller.ctx.tracer.enabled
        for _ in range(2):
            await controller.client().chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hello there"}], max_tokens=4
            )
    # the app's cleanup flushed the batch processor to the collector
    names = receiver.spans("otlp-controller")
    assert sorted(names) == sorted(["POST /v1/chat/completions", "dispatch", "pick", "attempt"] * 2)


# --- off, missing, configured -------------------------------------------------------------------


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from mlxcluster.config import Config\n"
        "from mlxcluster.tracing import NoTracer, build_tracer\n"
        "import mlxcluster.controller.app, mlxcluster.worker.service, mlxcluster.worker.worker_role\n"
        "assert isinstance(build_tracer(Config().tracing, role='controller', instance='c'), NoTracer)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_no_op_tracer_does_nothing() -> None:
    tracer = NoTracer()
    span = tracer.start("x", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert isinstance(span, NoSpan) and not span.recording and not tracer.enabled
    assert span.child("y", start_ns=1) is span and span.headers() is None
    span.set("k", 1)
    span.event("e", {"k": 1})
    span.fail("why")
    span.end(2)
    tracer.shutdown()


async def test_an_endpoint_without_the_extra_is_a_startup_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxcluster.tracing_otel", None)  # as if OpenTelemetry were not installed
    config = from_dict({"tracing": {"endpoint": "http://user:secret@collector:4318"}})
    with pytest.raises(TracingUnavailable) as info:
        build_tracer(config.tracing, role="controller", instance="c")
    assert "pip install 'mlxcluster[otel]'" in str(info.value) and "secret" not in str(info.value)
    with pytest.raises(NodeError, match=r"mlxcluster\[otel\]"):
        worker_tracer(config, "w1")
    assert isinstance(worker_tracer(Config(), "w1"), NoTracer)
    with pytest.raises(NodeError, match=r"mlxcluster\[otel\]"):  # refused before the app touches the bus
        await serve_controller(config, None, asyncio.Event())  # type: ignore[arg-type]
    check_tracing(Config().tracing)
    with pytest.raises(NodeError, match=r"mlxcluster\[otel\]"):  # every role, before NATS or a model
        await roles._main(config, "worker", 1)


def test_tracing_settings_are_checked_and_the_endpoint_redacted() -> None:
    assert not TracingSection().enabled and TracingSection(endpoint="http://localhost:4318").enabled
    with pytest.raises(ConfigError, match="tracing.sample_ratio"):
        from_dict({"tracing": {"sample_ratio": 1.5}})
    with pytest.raises(ConfigError, match="tracing.endpoint"):
        from_dict({"tracing": {"endpoint": "localhost:4318"}})
    shown = to_dict(from_dict({"tracing": {"endpoint": "https://user:pw@otel.example:4318"}}))
    assert shown["tracing"]["endpoint"] == "https://***@otel.example:4318"


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://localhost:4318", "http://localhost:4318/v1/traces"),
        ("http://localhost:4318/", "http://localhost:4318/v1/traces"),
        ("https://otel.example/v1/traces", "https://otel.example/v1/traces"),
    ],
)
def test_traces_url(endpoint: str, url: str) -> None:
    assert traces_url(endpoint) == url


async def test_an_engine_error_fails_the_worker_span_and_stopping_flushes_it() -> None:
    tracer, exporter = memory_tracer("worker")

    async def frames() -> AsyncGenerator[EngineFrame, None]:
        yield Progress(processed=3, total=6)
        yield Token(text="a")
        yield Error(code="engine_error", message="the batch was reset", retryable=True)

    span = tracer.start("worker.request")
    seen = [frame async for frame in traced_frames(frames(), span, 0)]
    span.end()
    assert [type(frame) for frame in seen] == [Progress, Token, Error]
    await stop_tracer(tracer)
    (served,) = exporter.get_finished_spans()
    assert served.status.status_code == StatusCode.ERROR and served.status.description == "engine_error"
    assert not named(exporter.get_finished_spans(), "prefill")  # no Done: the phases are not known


def test_a_caller_that_does_not_sample_is_followed() -> None:
    tracer, exporter = memory_tracer("worker")
    span = tracer.start("worker.request", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
    assert not span.recording
    headers = span.headers()
    assert headers is not None
    traceparent = headers["traceparent"]
    assert traceparent.startswith(f"00-{CALLER_TRACE}-") and traceparent.endswith("-00")  # passed on, unsampled
    span.end()
    sampled = tracer.start("worker.request", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert sampled.recording and sampled.headers()["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    sampled.end()
    assert [s.name for s in exporter.get_finished_spans()] == ["worker.request"]
    tracer.shutdown()


# --- a caller's trace context on the bus ---------------------------------------------------------


@pytest.fixture
async def small_payload() -> AsyncIterator[Config]:
    """A nats-server whose max_payload is 64 KiB."""
    config = make_config(
        nats={"max_payload": 65536}, discovery={"heartbeat_interval_ms": 200, "offline_timeout_ms": 1000}
    )
    async with EmbeddedNatsServer(config.nats):
        yield config


LONG_TRACESTATE = ",".join(f"k{i}=" + "v" * 250 for i in range(30))  # ~7.7 KB: valid, 30 members of 256 max


async def test_a_callers_long_tracestate_cannot_push_a_request_past_max_payload(small_payload: Config) -> None:
    controller_tracer, spans = memory_tracer("controller")
    async with Cluster(small_payload) as cluster:
        await cluster.start_worker("w1")
        controller = await cluster.start_controller(tracer=controller_tracer)
        await controller.wait_online("w1")
        word = "x" * (65536 - 1024 - 400)  # the encoded request just fits the room check_size leaves for headers
        headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": LONG_TRACESTATE}
        completion = await controller.client().chat.completions.create(
            model="echo", messages=[{"role": "user", "content": word}], extra_headers=headers
        )
        assert completion.choices[0].message.content == word
        assert controller.bus.counters()["disconnects"] == 0  # the server did not close the connection
        dispatcher = controller.ctx.dispatcher
        with pytest.raises(ApiError) as caught:  # headers past the room left: refused, never sent
            dispatcher.check_message(b"x" * 65000, {"tracestate": "a" * 600})
        assert caught.value.status == 413 and caught.value.code == "payload_too_large"
    (attempt,) = named(spans.get_finished_spans(), "attempt")
    assert attempt.status.status_code != StatusCode.ERROR


def test_a_span_passes_on_a_short_tracestate_and_drops_a_long_one() -> None:
    tracer, _ = memory_tracer("controller")
    parent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    short = tracer.start("http", headers={"traceparent": parent, "tracestate": "vendor=abc"})
    assert short.headers()["tracestate"] == "vendor=abc"
    long = tracer.start("http", headers={"traceparent": parent, "tracestate": LONG_TRACESTATE})
    passed = long.headers()
    assert passed["traceparent"].startswith(f"00-{CALLER_TRACE}-") and "tracestate" not in passed
    tracer.shutdown()


def test_headers_size_is_what_nats_py_sends() -> None:
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "a=b"}
    encoded = b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
    assert headers_size(headers) == len(encoded)
    assert headers_size(None) == headers_size({}) == 0


async def test_an_admission_that_errors_ends_its_span_as_an_error() -> None:
    """A body over client_max_size (read for the key's TPM) is a 413 out of admission: its span still ends."""
    tracer, spans = memory_tracer("controller")
    ring = KeyRing.from_config(ControllerSection(keys=[ApiKeyEntry(name="tpm", key="k-tpm", tpm=1000)]))
    app = web.Application(middlewares=[tracing_middleware(tracer), auth_middleware(ring)], client_max_size=64)

    async def never(_request: web.Request) -> web.Response:
        raise AssertionError("admission let the request through")

    app.router.add_post("/v1/chat/completions", never)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        body = {"model": "echo", "messages": [{"role": "user", "content": "x" * 200}]}
        response = await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k-tpm"})
        assert response.status == 413
    admission = one(spans.get_finished_spans(), "admission")
    assert admission.status.status_code == StatusCode.ERROR and admission.status.description == "http_413"
    assert admission.attributes is not None and admission.attributes["mlxcluster.admission"] == "http_413"


async def test_a_request_cancelled_before_its_first_step_still_ends_the_workers_span(
    cluster_config: Config, bus: Bus
) -> None:
    tracer, spans = memory_tracer("worker")
    worker = await start_worker(cluster_config, "w1", tracer=tracer)
    try:
        msg = Msg(_client=bus.nc, subject="inference", reply="_INBOX.cancelled-early")
        await worker.service._on_request(InferenceRequest(request_id="r-early", model="echo"), msg)
        task = worker.service.in_flight["r-early"]
        task.cancel()  # before _serve ran a single step
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)  # the done callbacks run on the next loop turn
    finally:
        await worker.stop()
    assert [s.name for s in named(spans.get_finished_spans(), "worker.request")] == ["worker.request"]
