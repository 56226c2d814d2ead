"""The embedding engine's life and queue: abandoned inputs skipped, the queue bounded (``overloaded``), a forward's
MLX error kept apart from a stop, a request racing ``stop()`` answered, a cancelled load joined, and the
sentence-transformers settings beside the pooling (``max_seq_length``, ``default_prompt_name``, ``do_lower_case``).

The batch thread's forwards are held by a gate (a ``threading.Event``) so that what is queued behind them is known
when the test acts: no timing."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embedding_model import build_embedding_model

from mlxcluster.protocol import EmbedRequest, EmbedResult
from mlxcluster.worker.catalogue import model_facts
from mlxcluster.worker.embedding_engine import EmbeddingEngine, EngineStopped
from mlxcluster.worker.embedding_spec import NotAnEmbeddingModel, read_spec


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_embedding_model(tmp_path_factory.mktemp("engine") / "tiny-embed")
    except FileNotFoundError:
        pytest.skip("the demo model (whose tokenizer the fixture uses) has not been made")


class Gated:
    """Stands in for the engine's model: each forward waits for ``gate``; the batches run are recorded."""

    def __init__(self, inner: Any, fail: BaseException | None = None) -> None:
        self.inner = inner
        self.fail = fail
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[list[int]]] = []

    def embed(self, batch: list[list[int]]) -> Any:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(batch)
        if self.fail is not None:
            raise self.fail
        return self.inner.embed(batch)


def ids(*rows: list[int]) -> EmbedRequest:
    return EmbedRequest(request_id="r", model="m", tokens=list(rows))


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (a state the engine reaches, not a duration)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


async def test_abandoned_inputs_are_skipped_and_the_queue_is_bounded(decoder: Path) -> None:
    engine = EmbeddingEngine(str(decoder), served_name="m", batch_tokens=16, batch_wait_ms=0)
    await engine.start()
    gated = Gated(engine._model)
    engine._model = gated  # type: ignore[assignment]
    try:
        assert engine.max_queued_tokens == 16 * 16
        # alone in an empty queue, a request past the bound is taken; the batch thread holds it in a forward
        running = asyncio.create_task(engine.embed(ids([1] * 300)))
        await asyncio.to_thread(gated.entered.wait, 10)
        abandoned = asyncio.create_task(engine.embed(ids([2] * 200)))
        await until(lambda: engine.queued_tokens == 200)
        refused = await engine.embed(ids([3] * 100))  # 300 tokens would wait: past 256
        assert refused.error is not None and (refused.error.code, refused.error.retryable) == ("overloaded", True)
        abandoned.cancel()  # its deadline passed, or the controller gave up on it
        later = asyncio.create_task(engine.embed(ids([4] * 50)))
        await until(lambda: engine.queued_tokens == 250)
        gated.gate.set()
        first, last = await running, await later
        assert first.error is None and last.error is None and len(last.vectors) == 1
        assert abandoned.cancelled()
        assert [len(row) for batch in gated.batches for row in batch] == [300, 50]  # the abandoned 200 never ran
        assert engine.skipped == 1 and engine.queued_tokens == 0
    finally:
        gated.gate.set()
        await engine.stop()


async def test_a_forward_error_is_not_a_stop(decoder: Path) -> None:
    """An MLX error (out of memory...) is raised to the service (``engine_error``), not taken for ``shutting_down``."""
    engine = EmbeddingEngine(str(decoder), served_name="m", batch_wait_ms=0)
    await engine.start()
    gated = Gated(engine._model, fail=RuntimeError("[metal::malloc] out of memory"))
    gated.gate.set()
    engine._model = gated  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            await engine.embed(ids([1, 2, 3], [4, 5]))
    finally:
        await engine.stop()


async def test_a_request_racing_stop_is_answered(decoder: Path) -> None:
    """A request whose tokenization the stop cancels gets a retryable ``shutting_down``; one that would queue after
    the batch thread left fails at once."""
    engine = EmbeddingEngine(str(decoder), served_name="m", batch_wait_ms=0)
    await engine.start()
    busy = threading.Event()
    engine._pool.submit(busy.wait, 10)  # the tokenizer pool is busy: the request's tokenization waits
    request = asyncio.create_task(engine.embed(ids([1, 2, 3])))
    await asyncio.sleep(0)  # it is submitted to the pool
    stopping = asyncio.create_task(engine.stop())
    await asyncio.sleep(0)  # the stop cancels the pending tokenization
    busy.set()
    result: EmbedResult = await asyncio.wait_for(request, 10)
    assert result.error is not None and (result.error.code, result.error.retryable) == ("shutting_down", True)
    await stopping
    with pytest.raises(EngineStopped):
        engine._submit([[1, 2, 3]])
    assert engine._thread is not None and not engine._thread.is_alive()


async def test_a_cancelled_load_is_joined(decoder: Path) -> None:
    """``start()`` cancelled while the model loads: ``stop()`` waits for the load, the thread ends, the weights go."""
    engine = EmbeddingEngine(str(decoder), served_name="m")
    loading, release = threading.Event(), threading.Event()
    load = engine._load

    def slow_load() -> None:
        loading.set()
        release.wait(10)
        load()

    engine._load = slow_load  # type: ignore[method-assign]
    starting = asyncio.create_task(engine.start())
    await asyncio.to_thread(loading.wait, 10)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    stopping = asyncio.create_task(engine.stop())
    await asyncio.sleep(0)
    assert not stopping.done()  # it joins the thread, still loading
    release.set()
    await asyncio.wait_for(stopping, 30)
    assert engine._thread is not None and not engine._thread.is_alive()
    assert engine._model is None


async def test_sentence_transformers_settings(decoder: Path, tmp_path: Path) -> None:
    """``max_seq_length`` is the context (catalogue and refusal), ``default_prompt_name`` applies when the request
    names no prompt, ``do_lower_case`` lower-cases the text; a default naming no prompt is refused at read."""
    model = tmp_path / "st"
    shutil.copytree(decoder, model)
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": True}))
    st = {"prompts": {"query": "query: ", "document": ""}, "default_prompt_name": "query"}
    (model / "config_sentence_transformers.json").write_text(json.dumps(st))
    spec = read_spec(model)
    assert (spec.max_seq_length, spec.default_prompt, spec.lower_case) == (16, "query", True)
    assert model_facts(str(model), "st", "local").context_length == 16

    engine = EmbeddingEngine(str(model), served_name="st", batch_wait_ms=0)
    await engine.start()
    try:
        assert engine.context_window == 16

        async def vector(text: str, prompt: str | None = None) -> Any:
            result = await engine.embed(EmbedRequest(request_id="r", model="st", texts=[text], prompt_name=prompt))
            assert result.error is None, result.error
            return np.frombuffer(result.vectors[0], "<f4")

        default, query, document = (
            await vector("hello"),
            await vector("hello", "query"),
            await vector("hello", "document"),
        )
        np.testing.assert_allclose(default, query, atol=1e-6)
        assert not np.allclose(default, document, atol=1e-3)
        np.testing.assert_allclose(await vector("HeLLo", "document"), document, atol=1e-6)
        refused = await engine.embed(EmbedRequest(request_id="r", model="st", texts=["word " * 30]))
        assert refused.error is not None and refused.error.param == "input" and "context of 16" in refused.error.message
    finally:
        await engine.stop()

    st["default_prompt_name"] = "passage"
    (model / "config_sentence_transformers.json").write_text(json.dumps(st))
    with pytest.raises(NotAnEmbeddingModel, match="default_prompt_name"):
        read_spec(model)
