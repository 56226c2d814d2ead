"""``/v1/embeddings`` end to end: the real controller and the real worker role serving a tiny Qwen3-Embedding-style
model (``embedding_model.py``) beside a chat model of its catalogue, over the real nats-server.

The vectors equal an in-process computation (one input at a time, no padding) to 1e-5, whether the inputs come
alone, in one request, or in concurrent requests that the worker batches together; the ``openai`` client (float
and base64) and langchain-openai's ``OpenAIEmbeddings`` read them; every refusal is OpenAI's error shape naming
the field; the tokens count in the key's usage.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import openai
import pytest
from cluster_harness import Cluster, RunningController, wait_until, with_sections
from embedding_model import QUERY_PROMPT, build_embedding_model, reference_vectors
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tiny_model import build_tiny_model

from mlxcluster.bus import Bus
from mlxcluster.config import ApiKeyEntry, Config
from mlxcluster.tracing import Tracer
from mlxcluster.tracing_otel import OtelTracer
from mlxcluster.worker.embedding_engine import EmbeddingEngine
from mlxcluster.worker.model_host import ModelHost
from mlxcluster.worker.worker_role import serve_worker

pytestmark = pytest.mark.usefixtures("nats_server")

EMBED, CHAT = "tiny-embed", "tiny-chat"
KEY, SMALL_KEY = "embed-secret", "small-secret"
TEXTS = ["hello world", "The capital of France is Paris.", "a", "def f(x):\n    return x + 1\n" * 4, "東京 🙂"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("embedding-models")
    try:
        embed = build_embedding_model(root / EMBED)
    except FileNotFoundError:
        pytest.skip("the demo model (whose tokenizer the fixture uses) has not been made")
    return embed, build_tiny_model(root / CHAT)


@contextlib.asynccontextmanager
async def cluster(
    config: Config, models: tuple[Path, Path], tracers: tuple[Tracer, Tracer] | None = None
) -> AsyncIterator[tuple[RunningController, ModelHost]]:
    """A controller and one mlx worker whose catalogue holds the embedding model and a chat model (not loaded);
    ``tracers``: the controller's and the worker's."""
    controller_tracer, worker_tracer = tracers or (None, None)
    keys = [
        msgspec.convert({"name": "app", "key": KEY}, ApiKeyEntry),
        msgspec.convert({"name": "small", "key": SMALL_KEY, "tpm": 30}, ApiKeyEntry),
    ]
    config = with_sections(
        config,
        worker={
            "engine": "mlx",
            "id": "w1",
            "models": [str(m) for m in models],
            "prompt_cache_bytes": 0,
            "embedding_batch_wait_ms": 1.0,
            "embedding_batch_tokens": 4096,
        },
        controller={"keys": keys},
    )
    worker_bus = await Bus.connect(config.nats, name="test-embed-worker", attempts=5)
    stop = asyncio.Event()
    hosts: list[ModelHost] = []
    serving = asyncio.create_task(serve_worker(config, worker_bus, stop, on_host=hosts.append, tracer=worker_tracer))
    try:
        async with Cluster(config) as running:
            controller = await running.start_controller(tracer=controller_tracer)
            await wait_until(lambda: controller.ctx.registry.catalogue_entry(EMBED) is not None, what="catalogue")
            yield controller, hosts[0]
    finally:
        stop.set()
        await asyncio.wait_for(serving, 20)
        await worker_bus.close()


async def post(controller: RunningController, body: dict[str, Any], key: str = KEY) -> tuple[int, dict[str, Any]]:
    session = controller.session()
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(f"{controller.url}/v1/embeddings", json=body, headers=headers) as response:
        return response.status, await response.json()


def floats(body: dict[str, Any]) -> np.ndarray:
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float32)


async def test_embeddings_through_the_cluster(cluster_config: Config, models: tuple[Path, Path]) -> None:
    embed_dir, _ = models
    expected, counts = reference_vectors(embed_dir, TEXTS)
    queries, query_counts = reference_vectors(embed_dir, TEXTS[:2], prompt=QUERY_PROMPT)
    async with cluster(cluster_config, models) as (controller, host):
        # /v1/models says which is which
        client = controller.client(KEY)
        listed = {m.id: m.model_dump() for m in (await client.models.list()).data}
        assert listed[EMBED]["kind"] == "embedding" and listed[CHAT]["kind"] == "chat"

        # asked to chat, the embedding model is refused before anything loads it, in each API's error shape
        await _chat_refused_before_loading(controller, host)

        # one request: every input, in order, equal to the in-process vectors; usage counts their tokens
        status, body = await post(controller, {"model": EMBED, "input": TEXTS})
        assert status == 200, body
        assert [item["index"] for item in body["data"]] == list(range(len(TEXTS)))
        assert body["object"] == "list" and body["model"] == EMBED and body["data"][0]["object"] == "embedding"
        np.testing.assert_allclose(floats(body), expected, atol=1e-5)
        assert body["usage"] == {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}

        # concurrent requests, one input each, share the worker's forwards and give the same vectors
        engine = host.engines()[EMBED]
        assert isinstance(engine, EmbeddingEngine)
        assert (engine.batch_wait_s, engine.batch_tokens) == (0.001, 4096)  # worker.embedding_batch_*
        engine.batch_wait_s = 0.2  # long enough that the requests below land in one batch
        before = engine.batches
        answers = await asyncio.gather(*(post(controller, {"model": EMBED, "input": text}) for text in TEXTS))
        assert engine.batches - before < len(TEXTS)
        engine.batch_wait_s = 0.001
        np.testing.assert_allclose(np.concatenate([floats(b) for _, b in answers]), expected, atol=1e-5)

        # token ids (one list, and a list of lists) give the vectors of the texts they encode
        tokens = [list(map(int, row)) for row in _token_ids(embed_dir, TEXTS[:2])]
        status, body = await post(controller, {"model": EMBED, "input": tokens})
        np.testing.assert_allclose(floats(body), expected[:2], atol=1e-5)
        status, body = await post(controller, {"model": EMBED, "input": tokens[0]})
        np.testing.assert_allclose(floats(body), expected[:1], atol=1e-5)

        # base64: little-endian float32, as OpenAI sends it
        status, body = await post(controller, {"model": EMBED, "input": TEXTS[:2], "encoding_format": "base64"})
        decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]])
        np.testing.assert_allclose(decoded, expected[:2], atol=1e-5)

        # dimensions: the first n values, renormalised
        status, body = await post(controller, {"model": EMBED, "input": TEXTS[:2], "dimensions": 16})
        cut = expected[:2, :16] / np.linalg.norm(expected[:2, :16], axis=1, keepdims=True)
        np.testing.assert_allclose(floats(body), cut, atol=1e-5)

        # the model's query prompt (sentence-transformers config)
        status, body = await post(controller, {"model": EMBED, "input": TEXTS[:2], "prompt_name": "query"})
        np.testing.assert_allclose(floats(body), queries, atol=1e-5)
        assert body["usage"]["prompt_tokens"] == sum(query_counts)

        # the openai client: base64 by default (decoded by the client), and float
        result = await client.embeddings.create(model=EMBED, input=TEXTS)
        np.testing.assert_allclose(np.array([d.embedding for d in result.data]), expected, atol=1e-5)
        assert result.usage.prompt_tokens == sum(counts)
        result = await client.embeddings.create(model=EMBED, input=TEXTS[0], encoding_format="float", dimensions=8)
        assert len(result.data[0].embedding) == 8

        # langchain-openai, as RAG pipelines call it
        langchain = pytest.importorskip("langchain_openai")
        lc = langchain.OpenAIEmbeddings(
            model=EMBED, base_url=f"{controller.url}/v1", api_key=KEY, check_embedding_ctx_length=False
        )
        documents = await lc.aembed_documents(TEXTS[:3])
        np.testing.assert_allclose(np.array(documents), expected[:3], atol=1e-5)
        np.testing.assert_allclose(np.array(await lc.aembed_query(TEXTS[1])), expected[1], atol=1e-5)

        # the key's usage counts the embedding tokens
        usage = controller.ctx.ops.keys.usage.get("app")
        assert usage is not None and usage.prompt_tokens >= 3 * sum(counts)

        # tpm counts embedding tokens: the first request spends the small key's 30 tokens, the next one waits
        status, body = await post(controller, {"model": EMBED, "input": TEXTS}, SMALL_KEY)
        assert status == 200 and body["usage"]["prompt_tokens"] > 30
        status, body = await post(controller, {"model": EMBED, "input": "a"}, SMALL_KEY)
        assert status == 429 and "TPM" in body["error"]["message"]

        await _refusals(controller, client)


async def test_an_embedding_request_is_one_trace_across_the_controller_and_the_worker(
    cluster_config: Config, models: tuple[Path, Path]
) -> None:
    exporters = [InMemorySpanExporter(), InMemorySpanExporter()]
    tracers = [
        OtelTracer(SimpleSpanProcessor(exporter), service_name="test", role=role, instance=role)
        for exporter, role in zip(exporters, ("controller", "worker"), strict=True)
    ]
    trace, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with cluster(cluster_config, models, (tracers[0], tracers[1])) as (controller, _host):
        session, headers = (
            controller.session(),
            {"Authorization": f"Bearer {KEY}", "traceparent": f"00-{trace}-{parent}-01"},
        )
        async with session.post(
            f"{controller.url}/v1/embeddings", json={"model": EMBED, "input": TEXTS[:2]}, headers=headers
        ) as response:
            assert response.status == 200, await response.text()
        await wait_until(lambda: exporters[1].get_finished_spans(), what="the worker's span")
    ours = {span.name: span for span in exporters[0].get_finished_spans()}
    assert {"POST /v1/embeddings", "admission", "embed", "pick", "attempt"} <= set(ours)
    assert all(span.context is not None and span.context.trace_id == int(trace, 16) for span in ours.values())
    embed, pick, attempt = ours["embed"], ours["pick"], ours["attempt"]
    assert embed.parent is not None and embed.parent.span_id == ours["POST /v1/embeddings"].context.span_id  # type: ignore[union-attr]
    assert pick.parent is not None and attempt.parent is not None
    assert pick.parent.span_id == attempt.parent.span_id == embed.context.span_id  # type: ignore[union-attr]
    assert embed.attributes is not None and embed.attributes["mlxcluster.inputs"] == 2
    assert embed.attributes["mlxcluster.status"] == "ok" and embed.attributes["gen_ai.usage.input_tokens"] > 0  # type: ignore[operator]
    assert attempt.attributes is not None and attempt.attributes["mlxcluster.worker"] == "w1"
    (served,) = exporters[1].get_finished_spans()
    assert served.name == "worker.embed" and served.context is not None and served.context.trace_id == int(trace, 16)
    assert served.parent is not None and served.parent.span_id == attempt.context.span_id  # type: ignore[union-attr]
    assert served.attributes is not None and served.attributes["mlxcluster.dimensions"] == 64
    assert served.attributes["gen_ai.usage.input_tokens"] == embed.attributes["gen_ai.usage.input_tokens"]


async def _chat_refused_before_loading(controller: RunningController, host: ModelHost) -> None:
    session, headers = controller.session(), {"Authorization": f"Bearer {KEY}"}
    messages = [{"role": "user", "content": "hi"}]
    asks = {
        "/v1/chat/completions": {"model": EMBED, "messages": messages},
        "/v1/responses": {"model": EMBED, "input": "hi"},
        "/v1/messages": {"model": EMBED, "messages": messages, "max_tokens": 8},
    }
    for path, body in asks.items():
        async with session.post(f"{controller.url}{path}", json=body, headers=headers) as response:
            answer = await response.json()
        assert response.status == 400, (path, answer)
        error = answer["error"]
        assert (error["param"], error["code"]) == ("model", "model_not_chat") and "/v1/embeddings" in error["message"]
        if path == "/v1/messages":
            assert answer["type"] == "error" and error["type"] == "invalid_request_error"
    assert EMBED not in host.loaded()


def _token_ids(path: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))(texts)["input_ids"]  # type: ignore[no-any-return]


async def _refusals(controller: RunningController, client: openai.AsyncOpenAI) -> None:
    """Each refusal: OpenAI's error shape, the field named."""
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"model": EMBED, "input": []}, 400, "input"),
        ({"model": EMBED, "input": ""}, 400, "input"),
        ({"model": EMBED, "input": ["a"] * 2049}, 400, "input"),
        ({"model": EMBED, "input": [1, "a"]}, 400, "input"),
        ({"model": EMBED, "input": {"text": "a"}}, 400, "input"),
        ({"model": EMBED, "input": "word " * 600}, 400, "input"),  # past the model's context of 512
        ({"model": EMBED, "input": [[1, 2, 10**6]]}, 400, "input"),  # outside the vocabulary
        ({"model": EMBED, "input": "a", "dimensions": 65}, 400, "dimensions"),
        ({"model": EMBED, "input": "a", "dimensions": 0}, 400, "dimensions"),
        ({"model": EMBED, "input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": EMBED, "input": "a", "prompt_name": "nope"}, 400, "prompt_name"),
        ({"model": EMBED, "input": "a", "extra": 1}, 400, "extra"),
        ({"model": CHAT, "input": "a"}, 400, "model"),
        ({"model": "nope", "input": "a"}, 404, "model"),
    ]
    for body, status, param in cases:
        got, answer = await post(controller, body)
        assert (got, answer["error"]["param"]) == (status, param), (body, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    _, answer = await post(controller, {"model": EMBED, "input": ["a"] * 2049})
    assert "2048" in answer["error"]["message"]
    # an embedding model asked to chat
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["param"] == "model" and "/v1/embeddings" in refused.value.body["message"]  # type: ignore[index]
