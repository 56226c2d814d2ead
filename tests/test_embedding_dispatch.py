"""The controller's embedding dispatch against a fake bus (workers answer as each test says, no NATS): breakers
blame a worker, not our own bus outage, and every try ends a half-open trial; a failed part cancels its siblings
(their workers told) while the tokens of the parts computed are counted; malformed answers are retried elsewhere
and counted; a request refused before sending is not counted as dispatched; ``input`` shapes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mlxcluster.api import WorkerView
from mlxcluster.bus import BusConnectionError, BusNoRespondersError
from mlxcluster.config import ControllerSection
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.routes_embeddings import MAX_INPUTS, inputs
from mlxcluster.controller.routing.breaker import Breakers
from mlxcluster.controller.routing.embeddings import EmbeddingDispatcher
from mlxcluster.protocol import Cancel, EmbedRequest, EmbedResult, Error, InferenceRequest
from mlxcluster.subjects import Subjects
from mlxcluster.tracing_otel import OtelTracer

Answer = Callable[[str, EmbedRequest], Awaitable[EmbedResult]]


class FakeBus:
    """What embedding dispatch uses of the bus; ``answer(worker_id, part)`` plays the workers."""

    def __init__(self, answer: Answer, max_payload: int = 1 << 20) -> None:
        self.answer = answer
        self.max_payload = max_payload
        self.subjects = Subjects()
        self.epoch = 1
        self.invalid_messages: Counter[str] = Counter()
        self.published: list[tuple[str, Any]] = []
        self.headers: list[dict[str, str] | None] = []

    async def request(
        self, subject: str, message: EmbedRequest, _type: Any, *, timeout: float, headers: dict[str, str] | None = None
    ) -> EmbedResult:
        self.headers.append(headers)
        return await self.answer(subject.split(".")[-2], message)

    async def publish(self, subject: str, message: Any) -> None:
        self.published.append((subject, message))


class Registry:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def eligible(self, model: str, exclude: Collection[str] = ()) -> list[WorkerView]:
        return [WorkerView(id=i, status="online", models=(model,)) for i in self.ids if i not in exclude]

    def loaded_somewhere(self, model: str) -> bool:
        return True

    def loadable_somewhere(self, model: str) -> bool:
        return False

    def begin(self, worker_id: str) -> None: ...
    def end(self, worker_id: str) -> None: ...


class First:
    """Picks the first eligible worker (the registry's order)."""

    def pick(self, workers: Sequence[WorkerView], request: InferenceRequest) -> WorkerView | None:
        return workers[0] if workers else None


def dispatcher(bus: FakeBus, ids: list[str], attempts: int = 3, **kwargs: Any) -> EmbeddingDispatcher:
    return EmbeddingDispatcher(
        bus=bus,  # type: ignore[arg-type]
        registry=Registry(ids),
        balancer=First(),  # type: ignore[arg-type]
        config=ControllerSection(max_attempts=attempts, request_timeout_s=5),
        **kwargs,
    )


def answered(part: EmbedRequest, dimensions: int = 4, tokens: int = 5) -> EmbedResult:
    count = len(part.texts or part.tokens or [])
    return EmbedResult(vectors=[bytes(4 * dimensions)] * count, dimensions=dimensions, prompt_tokens=tokens)


async def test_breakers_blame_the_worker_not_our_bus_and_every_trial_ends() -> None:
    now = [0.0]
    breakers = Breakers(threshold=1, cooldown_s=5, clock=lambda: now[0])
    mode = ["outage"]

    async def answer(worker: str, part: EmbedRequest) -> EmbedResult:
        if mode[0] == "outage":  # our own connection drops during the request
            bus.epoch += 1
            raise BusConnectionError("connection closed")
        if mode[0] == "lost":
            raise BusNoRespondersError("no responders")
        return EmbedResult(error=Error(code="invalid_request", message="input: no", param="input"))

    bus = FakeBus(answer)
    embedder = dispatcher(bus, ["w"], attempts=1, breakers=breakers)
    request = EmbedRequest(request_id="r", model="m", texts=["a"])
    with pytest.raises(ApiError) as unavailable:
        await embedder.embed(request, 4)
    assert unavailable.value.status == 503 and breakers.state("w") == "closed"  # not the worker's fault
    mode[0] = "lost"
    with pytest.raises(ApiError):
        await embedder.embed(request, 4)
    assert breakers.state("w") == "open"  # the same connection throughout: the worker's
    now[0] = 6.0
    assert breakers.state("w") == "half_open" and breakers.allows("w")
    mode[0] = "refuse"
    with pytest.raises(ApiError) as refused:
        await embedder.embed(request, 4)
    assert refused.value.status == 400
    assert breakers.allows("w")  # the trial ended: the worker is not excluded (for chat too) for ever


async def test_a_failed_part_cancels_its_siblings_and_the_computed_tokens_count() -> None:
    computed, cancelled = asyncio.Event(), asyncio.Event()

    async def answer(worker: str, part: EmbedRequest) -> EmbedResult:
        index = part.request_id.rsplit(".", 1)[1]
        if index == "0":
            await computed.wait()
            return EmbedResult(error=Error(code="invalid_request", message="input[0]: too long", param="input"))
        if index == "1":
            computed.set()
            return answered(part, dimensions=1024, tokens=7)
        try:
            await asyncio.Event().wait()  # a long part, still running when part 0 fails
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    bus = FakeBus(answer, max_payload=8192)  # 1024-dim answers: one input per part
    events: list[Any] = []
    embedder = dispatcher(bus, ["w"], events=events.append)
    request = EmbedRequest(request_id="r", model="m", texts=["a", "b", "c"])
    assert len(embedder.parts(request, 1024)) == 3
    with pytest.raises(ApiError) as refused:
        await embedder.embed(request, 1024)
    assert (refused.value.status, refused.value.param) == (400, "input")  # the part's error, not an ExceptionGroup
    assert cancelled.is_set()
    assert [(s, m.request_id) for s, m in bus.published if isinstance(m, Cancel)] == [(bus.subjects.cancel("w"), "r.2")]
    finished = events[-1]
    assert (finished.status, finished.dispatched, finished.prompt_tokens) == ("error", True, 7)


@pytest.mark.parametrize(
    "bad",
    [
        lambda part: msgspec.structs.replace(answered(part), vectors=answered(part).vectors[:1]),  # a vector short
        lambda part: msgspec.structs.replace(answered(part), vectors=[b"\0" * 12] * 2),  # 3 floats, not 4
        lambda part: answered(part, dimensions=8),  # not the model's length
    ],
)
async def test_malformed_answers_are_retried_and_counted(bad: Callable[[EmbedRequest], EmbedResult]) -> None:
    async def answer(worker: str, part: EmbedRequest) -> EmbedResult:
        return bad(part) if worker == "bad" else msgspec.structs.replace(answered(part), worker_id="good")

    bus = FakeBus(answer)
    breakers = Breakers(threshold=1)
    result = await dispatcher(bus, ["bad", "good"], breakers=breakers).embed(
        EmbedRequest(request_id="r", model="m", texts=["a", "b"]), 4
    )
    assert result.workers == ["good"] and len(result.vectors) == 2
    assert bus.invalid_messages == Counter({bus.subjects.embed("bad"): 1})
    assert breakers.state("bad") == "open"


async def test_each_try_is_a_pick_and_an_attempt_span_and_the_attempt_travels_in_the_headers() -> None:
    async def answer(worker: str, part: EmbedRequest) -> EmbedResult:
        if worker == "bad":
            return EmbedResult(error=Error(code="engine_error", message="boom", retryable=True))
        return msgspec.structs.replace(answered(part), worker_id=worker)

    exporter = InMemorySpanExporter()
    tracer = OtelTracer(SimpleSpanProcessor(exporter), service_name="test", role="controller", instance="c")
    bus = FakeBus(answer)
    embedder = dispatcher(bus, ["bad", "good"], tracer=tracer, strategy="first")
    await embedder.embed(EmbedRequest(request_id="r", model="m", texts=["a", "b"]), 4)
    spans = exporter.get_finished_spans()
    (embed,) = [s for s in spans if s.name == "embed"]
    attempts = [s for s in spans if s.name == "attempt"]
    picks = [s for s in spans if s.name == "pick"]
    assert embed.parent is None and embed.attributes is not None  # no HTTP span here: the first of its trace
    assert (embed.attributes["mlxcluster.status"], embed.attributes["gen_ai.usage.input_tokens"]) == ("ok", 5)
    assert [a.attributes["mlxcluster.worker"] for a in attempts] == ["bad", "good"]  # type: ignore[index]
    assert [a.status.status_code for a in attempts] == [StatusCode.ERROR, StatusCode.UNSET]
    assert [p.attributes["mlxcluster.worker"] for p in picks] == ["bad", "good"]  # type: ignore[index]
    assert all(s.parent is not None and s.parent.span_id == embed.context.span_id for s in attempts + picks)  # type: ignore[union-attr]
    sent = [headers["traceparent"][:-3] for headers in bus.headers if headers is not None]  # less the flags
    assert sent == [f"00-{a.context.trace_id:032x}-{a.context.span_id:016x}" for a in attempts]  # type: ignore[union-attr]


async def test_a_request_refused_before_sending_is_not_dispatched() -> None:
    async def answer(worker: str, part: EmbedRequest) -> EmbedResult:
        raise AssertionError("nothing is sent")

    events: list[Any] = []
    embedder = dispatcher(FakeBus(answer, max_payload=4096), ["w"], events=events.append)
    with pytest.raises(ApiError) as too_big:
        await embedder.embed(EmbedRequest(request_id="r", model="m", texts=["x" * 9000]), 4)
    assert too_big.value.status == 413
    assert (events[-1].status, events[-1].dispatched) == ("error", False)


def test_input_shapes() -> None:
    """A flat list of token ids is one input, however long; the input count is checked once the shape is known."""
    assert inputs(list(range(MAX_INPUTS + 500))) == (None, [list(range(MAX_INPUTS + 500))])
    assert inputs("a") == (["a"], None)
    for too_many in (["a"] * (MAX_INPUTS + 1), [[1]] * (MAX_INPUTS + 1)):
        with pytest.raises(ApiError) as refused:
            inputs(too_many)
        assert (refused.value.param, refused.value.code) == ("input", "too_many_inputs")
