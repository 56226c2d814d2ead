"""The embedding path's parts: sentence-transformers files read (and refused), the engine's pooling modes, the
encoder path through mlx-embeddings (and its refusal without the extra), the controller's split of a request into
parts that fit the bus, failover to another worker, and the worker service's refusals."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from embedding_model import build_embedding_model, build_encoder_model, reference_vectors
from nats.aio.msg import Msg
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mlxcluster.api import WorkerView
from mlxcluster.builtin.balancers import RoundRobin
from mlxcluster.bus import Bus
from mlxcluster.config import Config, ControllerSection
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.routing.embeddings import EmbeddingDispatcher, embed_error
from mlxcluster.errors import NodeError
from mlxcluster.protocol import Cancel, EmbedRequest, EmbedResult, Error, encode
from mlxcluster.tracing_otel import OtelTracer
from mlxcluster.worker.catalogue import model_facts
from mlxcluster.worker.echo import EchoEngine
from mlxcluster.worker.embedding_engine import EXTRA, EmbeddingEngine
from mlxcluster.worker.embedding_spec import NotAnEmbeddingModel, read_spec

TEXTS = ["hello world", "The capital of France is Paris.", "a"]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_embedding_model(tmp_path_factory.mktemp("decoder") / "tiny-embed", pooling="mean", normalize=False)
    except FileNotFoundError:
        pytest.skip("the demo model (whose tokenizer the fixture uses) has not been made")


def _pooling(path: Path, **modes: bool) -> None:
    config = {"word_embedding_dimension": 64, **{f"pooling_mode_{mode}": on for mode, on in modes.items()}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))


def _modules(path: Path, *types: str) -> None:
    modules = [
        {"idx": i, "name": str(i), "path": "1_Pooling" if t == "Pooling" else "", "type": t}
        for i, t in enumerate(types)
    ]
    (path / "modules.json").write_text(
        json.dumps([{**m, "type": f"sentence_transformers.models.{m['type']}"} for m in modules])
    )


def test_spec_and_catalogue_facts(decoder: Path, tmp_path: Path) -> None:
    spec = read_spec(decoder)
    assert (spec.pooling, spec.normalize, spec.dimensions, spec.encoder) == ("mean", False, 64, False)
    assert "query" in spec.prompts
    facts = model_facts(str(decoder), "tiny-embed", "local")
    assert (facts.kind, facts.dimensions, facts.context_length) == ("embedding", 64, 512)

    copy = tmp_path / "copy"
    shutil.copytree(decoder, copy)
    refusals = {
        "a Dense module": lambda: _modules(copy, "Transformer", "Pooling", "Dense"),
        "no Pooling module": lambda: _modules(copy, "Transformer"),
        "max pooling": lambda: _pooling(copy, max_tokens=True),
        "two modes": lambda: _pooling(copy, mean_tokens=True, cls_token=True),
        "include_prompt": lambda: (_pooling(copy, lasttoken=True), _add(copy, include_prompt=False)),
        "not a list": lambda: (copy / "modules.json").write_text("{}"),
        "missing pooling config": lambda: (copy / "1_Pooling" / "config.json").unlink(),
    }
    for what, damage in refusals.items():
        shutil.rmtree(copy)
        shutil.copytree(decoder, copy)
        _modules(copy, "Transformer", "Pooling")
        damage()
        with pytest.raises(NotAnEmbeddingModel):
            read_spec(copy)
        assert model_facts(str(copy), "copy", "local").kind == "embedding", what  # listed; its load says why
    (copy / "modules.json").unlink()
    assert model_facts(str(copy), "copy", "local").kind == "chat"


def _add(path: Path, **fields: Any) -> None:
    file = path / "1_Pooling" / "config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | fields))


async def test_decoder_pooling_modes(decoder: Path, tmp_path: Path) -> None:
    """Mean and CLS pooling without Normalize, padded in one batch, equal the unpadded in-process vectors."""
    for modes in ({"mean_tokens": True}, {"cls_token": True}):
        _pooling(decoder, **modes)
        expected, _ = reference_vectors(decoder, TEXTS)
        engine = EmbeddingEngine(str(decoder), served_name="m", batch_wait_ms=50)
        await engine.start()
        try:
            result = await engine.embed(EmbedRequest(request_id="r", model="m", texts=TEXTS))
            got = np.stack([np.frombuffer(v, "<f4") for v in result.vectors])
            np.testing.assert_allclose(got, expected, atol=1e-5)
            assert engine.batches == 1
            short = await engine.embed(EmbedRequest(request_id="r", model="m", texts=TEXTS, dimensions=8))
            np.testing.assert_allclose(np.frombuffer(short.vectors[0], "<f4"), expected[0, :8], atol=1e-5)  # no renorm
            refused = await engine.embed(EmbedRequest(request_id="r", model="m", tokens=[[1, 2]], prompt_name="query"))
            assert refused.error is not None and refused.error.param == "prompt_name"
        finally:
            await engine.stop()
    _pooling(decoder, mean_tokens=True)
    stopped = await engine.embed(EmbedRequest(request_id="r", model="m", texts=TEXTS))
    assert stopped.error is not None and stopped.error.code == "shutting_down" and stopped.error.retryable


async def test_small_batches_split_by_tokens(decoder: Path) -> None:
    """A batch bounded by tokens runs in several forwards; the vectors do not change."""
    expected, _ = reference_vectors(decoder, TEXTS)
    engine = EmbeddingEngine(str(decoder), served_name="m", batch_tokens=8, batch_wait_ms=50)
    await engine.start()
    try:
        result = await engine.embed(EmbedRequest(request_id="r", model="m", texts=TEXTS))
        np.testing.assert_allclose(np.stack([np.frombuffer(v, "<f4") for v in result.vectors]), expected, atol=1e-5)
        assert engine.batches >= 2
    finally:
        await engine.stop()


async def test_encoder_through_mlx_embeddings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlx_embeddings")
    import mlx.core as mx
    from mlx_embeddings.utils import load
    from transformers import AutoTokenizer

    try:
        path = build_encoder_model(tmp_path / "tiny-bert")
    except FileNotFoundError:
        pytest.skip("the demo model has not been made")
    assert read_spec(path).encoder
    model, _ = load(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    expected = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        states = np.array(model(mx.array([ids]), attention_mask=mx.ones((1, len(ids)))).last_hidden_state[0])
        expected.append(states.mean(axis=0) / np.linalg.norm(states.mean(axis=0)))
    engine = EmbeddingEngine(str(path), served_name="bert", batch_wait_ms=50)
    await engine.start()
    try:
        result = await engine.embed(EmbedRequest(request_id="r", model="bert", texts=TEXTS))
        got = np.stack([np.frombuffer(v, "<f4") for v in result.vectors])
        np.testing.assert_allclose(got, np.stack(expected), atol=1e-5)  # padded with a mask, batched
        assert engine.info().details["backend"] == "mlx-embeddings"
    finally:
        await engine.stop()

    monkeypatch.setitem(sys.modules, "mlx_embeddings.utils", None)  # as if the extra were not installed
    refused = EmbeddingEngine(str(path), served_name="bert")
    with pytest.raises(NodeError, match=r"mlx-embeddings.*" + EXTRA.replace("[", r"\[").replace("]", r"\]")):
        await refused.start()


class _Registry:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.load: dict[str, int] = {}

    def eligible(self, model: str, exclude: Collection[str] = ()) -> list[WorkerView]:
        return [WorkerView(id=i, status="online", models=(model,)) for i in self.ids if i not in exclude]

    def loaded_somewhere(self, model: str) -> bool:
        return True

    def loadable_somewhere(self, model: str) -> bool:
        return False

    def begin(self, worker_id: str) -> None:
        self.load[worker_id] = self.load.get(worker_id, 0) + 1

    def end(self, worker_id: str) -> None:
        self.load[worker_id] -= 1


def _dispatcher(bus: Any, ids: list[str], events: list[Any] | None = None) -> EmbeddingDispatcher:
    return EmbeddingDispatcher(
        bus=bus,
        registry=_Registry(ids),
        balancer=RoundRobin(),
        config=ControllerSection(max_attempts=3, request_timeout_s=2),
        events=(events.append if events is not None else lambda _e: None),
    )


class _Payload:
    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload


def test_parts_fit_the_bus() -> None:
    request = EmbedRequest(request_id="r", model="m", texts=[f"text {i} " * 20 for i in range(100)])
    dispatcher = _dispatcher(_Payload(8192), ["w"])
    parts = dispatcher.parts(request, dimensions=64)
    assert len(parts) > 1 and [t for p in parts for t in p.texts or []] == request.texts
    assert all(len(encode(p)) <= 8192 - 1024 for p in parts)
    assert len({p.request_id for p in parts}) == len(parts)
    # answers bound the parts too: 1024-dim vectors, ~5.5 KB each in base64
    many = EmbedRequest(request_id="r", model="m", tokens=[[1]] * 100)
    assert max(len(p.tokens or []) for p in _dispatcher(_Payload(64 * 1024), ["w"]).parts(many, 1024)) <= 12
    with pytest.raises(ApiError) as too_big:
        dispatcher.parts(EmbedRequest(request_id="r", model="m", texts=["x" * 9000]), 64)
    assert too_big.value.status == 413


@pytest.mark.usefixtures("nats_server")
async def test_failover_and_refusals(bus: Bus) -> None:
    """A worker that answers a retryable error or nothing is replaced by another; a refusal is the client's 400."""
    vector = np.ones(4, dtype="<f4").tobytes()

    async def flaky(msg: Msg) -> None:
        await msg.respond(encode(EmbedResult(error=Error(code="draining", message="bye", retryable=True))))

    async def good(msg: Msg) -> None:
        request = msgspec.json.decode(msg.data, type=EmbedRequest)
        if request.dimensions == 99:
            answer = EmbedResult(error=Error(code="invalid_request", message="dimensions: no", param="dimensions"))
        else:
            answer = EmbedResult(
                worker_id="good", vectors=[vector] * len(request.texts or []), dimensions=4, prompt_tokens=3
            )
        await msg.respond(encode(answer))

    subs = [
        await bus.nc.subscribe(bus.subjects.embed("flaky"), cb=flaky),
        await bus.nc.subscribe(bus.subjects.embed("good"), cb=good),
    ]
    await bus.nc.flush()
    events: list[Any] = []
    dispatcher = _dispatcher(bus, ["flaky", "gone", "good"], events)
    result = await dispatcher.embed(EmbedRequest(request_id="r", model="m", texts=["a", "b"]), 4)
    assert (result.vectors, result.workers, result.prompt_tokens) == ([vector, vector], ["good"], 3)
    assert events[-1].status == "ok" and events[-1].prompt_tokens == 3
    with pytest.raises(ApiError) as refused:
        await dispatcher.embed(EmbedRequest(request_id="r", model="m", texts=["a"], dimensions=99), 4)
    assert (refused.value.status, refused.value.param) == (400, "dimensions")
    assert events[-1].status == "error"
    lone = _dispatcher(bus, ["flaky"])
    with pytest.raises(ApiError) as unavailable:
        await lone.embed(EmbedRequest(request_id="r", model="m", texts=["a"]), 4)
    assert unavailable.value.status == 503 and "flaky: draining" in unavailable.value.message
    silent = _dispatcher(bus, ["silent"])  # nobody answers there: no responders until the deadline passes
    with pytest.raises(ApiError) as late:
        await silent.embed(EmbedRequest(request_id="r", model="m", texts=["a"], deadline=time.time() - 1), 4)
    assert late.value.status == 504
    for sub in subs:
        await sub.unsubscribe()


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("invalid_request", 400),
        ("model_load_failed", 503),
        ("deadline_exceeded", 504),
        ("payload_too_large", 413),
        ("x", 502),
    ],
)
def test_worker_errors_as_http(code: str, status: int) -> None:
    assert embed_error(Error(code=code, message="m", param="input")).status == status


class _EmbeddingEcho(EchoEngine):
    """An echo engine that embeds as told: fails, sleeps, or answers more bytes than NATS carries."""

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        text = (request.texts or [""])[0]
        if text == "boom":
            raise ValueError("boom")
        if text == "slow":
            await asyncio.sleep(5)
        if text == "hold":
            await asyncio.Event().wait()  # until cancelled
        if text == "huge":
            return EmbedResult(vectors=[bytes(7 * 1024 * 1024)], dimensions=1, prompt_tokens=1)  # 9.3 MB in base64
        return await super().embed(request)


@pytest.mark.usefixtures("nats_server")
async def test_worker_refusals(cluster_config: Config, bus: Bus) -> None:
    """Through the worker service: a model not in its catalogue (retryable elsewhere), a chat engine asked to embed,
    an engine that fails, a deadline passed, vectors past NATS max_payload, a draining worker, a request without a
    reply subject (dropped and counted), more embedding requests than the worker takes at once (``overloaded``), a
    request the controller cancels (answered ``shutting_down``, its work dropped)."""
    from cluster_harness import Cluster, wait_until

    async def ask(text: str, model: str = "echo", request_id: str = "r", **fields: Any) -> Error:
        request = EmbedRequest(request_id=request_id, model=model, texts=[text], **fields)
        answer = await bus.request(subject, request, EmbedResult, timeout=5)
        assert answer.error is not None and answer.worker_id == "w-echo"
        return answer.error

    async with Cluster(cluster_config) as cluster:
        spans = InMemorySpanExporter()
        tracer = OtelTracer(SimpleSpanProcessor(spans), service_name="test", role="worker", instance="w-echo")
        worker = await cluster.start_worker("w-echo", engine=_EmbeddingEcho(models=["echo"]), tracer=tracer)
        subject = bus.subjects.embed("w-echo")
        error = await ask("a", model="nope")
        assert error.code == "model_not_found" and error.retryable
        error = await ask("a")
        assert error.param == "model" and "chat model" in error.message
        error = await ask("boom")
        assert error.code == "engine_error" and error.retryable
        error = await ask("slow", deadline=time.time() + 0.2)
        assert error.code == "deadline_exceeded"
        error = await ask("huge")
        assert error.code == "payload_too_large"
        assert worker.service.errors_total == 5
        await bus.publish(subject, EmbedRequest(request_id="r", model="echo", texts=["a"]))
        await asyncio.sleep(0.1)
        assert worker.bus.invalid_messages[subject] == 1
        worker.service.status = "draining"
        error = await ask("a")
        assert error.code == "draining" and error.retryable
        worker.service.status = "online"

        admission = worker.service.admission
        admission.max_concurrent, admission.max_queue = 1, 0  # one embedding request at a time
        held = asyncio.create_task(ask("hold", request_id="held"))
        await wait_until(lambda: "held" in worker.service._embedding, what="the held request to arrive")
        assert worker.service.heartbeat().active == 1  # balancers see the embedding request as load
        error = await ask("a", request_id="next")
        assert error.code == "overloaded" and error.retryable
        refused = [
            s
            for s in spans.get_finished_spans()
            if s.attributes and s.attributes.get("mlxcluster.request_id") == "next"
        ]
        assert len(refused) == 1 and refused[0].name == "worker.embed"  # the refusal has its span, an error one
        assert refused[0].status.status_code == StatusCode.ERROR and refused[0].status.description == "overloaded"
        await bus.publish(bus.subjects.cancel("w-echo"), Cancel(request_id="held", reason="client gone"))
        error = await asyncio.wait_for(held, 5)
        assert error.code == "shutting_down" and error.retryable
        assert not worker.service._embedding


def test_backbone_is_the_final_norm_before_the_head(decoder: Path, tmp_path: Path) -> None:
    """For qwen3 (tied head) and llama (its own head), ``model.model(ids)`` is what the LM head reads: the final
    hidden states after the last norm, so the engine pools what the model's last layer gives."""
    import mlx.core as mx
    from mlx_lm.utils import load_model
    from tiny_model import build_tiny_model

    ids = mx.array([[5, 17, 300, 42, 8]])
    qwen3, _ = load_model(decoder)
    states = qwen3.model(ids)
    np.testing.assert_allclose(np.array(qwen3.model.embed_tokens.as_linear(states)), np.array(qwen3(ids)), atol=1e-4)
    llama, _ = load_model(build_tiny_model(tmp_path / "llama"))
    states = llama.model(ids)
    np.testing.assert_allclose(np.array(llama.lm_head(states)), np.array(llama(ids)), atol=1e-4)


async def test_weights_saved_from_the_bare_backbone(decoder: Path, tmp_path: Path) -> None:
    """Hugging Face's Qwen3-Embedding saves the backbone alone (``layers.0...``, no ``model.`` prefix, no head): the
    engine loads such weights into mlx-lm's class all the same."""
    import mlx.core as mx

    bare = tmp_path / "bare"
    shutil.copytree(decoder, bare)
    weights = mx.load(str(bare / "model.safetensors"))
    mx.save_safetensors(str(bare / "model.safetensors"), {k.removeprefix("model."): v for k, v in weights.items()})
    index = bare / "model.safetensors.index.json"
    index.unlink(missing_ok=True)
    expected, _ = reference_vectors(decoder, TEXTS)
    engine = EmbeddingEngine(str(bare), served_name="bare")
    await engine.start()
    try:
        result = await engine.embed(EmbedRequest(request_id="r", model="bare", texts=TEXTS))
        np.testing.assert_allclose(np.stack([np.frombuffer(v, "<f4") for v in result.vectors]), expected, atol=1e-5)
    finally:
        await engine.stop()
