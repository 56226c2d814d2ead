"""One bad request never stops the mlx engine: each fault path with an injected fault, on the tiny model.

- A request's logits processor or sampler raises inside a batch step: that request alone ends with a
  non-retryable error; the request decoding beside it finishes with exactly its solo output.
- A step fails for no known reason (an exception out of the batch step itself, injected for one request):
  the running requests go on in a fresh batch with exactly their solo output, the new requests are tried one
  at a time, and only the culprit fails (not retryable).
- ``logit_bias`` naming a token outside the logits width is refused, naming the field.
- The generation thread dies anyway: the engine says why (``on_fatal``); a worker then deregisters with the
  reason and exits non-zero (:class:`~mlxcluster.errors.NodeFailed`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import wait_until
from tiny_model import build_tiny_model

from mlxcluster.protocol import Done, Error, InferenceRequest, SamplingParams, Token
from mlxcluster.worker import generation_loop, sampling
from mlxcluster.worker.engine import MlxEngine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
async def engine(tiny_model: Path):
    started = MlxEngine(str(tiny_model), max_concurrent=4, prompt_cache_bytes=0)
    await started.start()
    yield started
    await started.stop()


def request(request_id: str, prompt: str = "hello there", *, max_tokens: int = 20, **kwargs: Any) -> InferenceRequest:
    sampling_params = kwargs.pop("sampling", SamplingParams(temperature=0.0))
    return InferenceRequest(
        request_id=request_id, model="tiny", prompt=prompt, sampling=sampling_params, max_tokens=max_tokens, **kwargs
    )


async def run(engine: MlxEngine, req: InferenceRequest, started: asyncio.Event | None = None) -> tuple[str, Any]:
    text = []
    last: Any = None
    async for frame in engine.generate(req):
        if isinstance(frame, Token):
            text.append(frame.text)
            if started is not None:
                started.set()
        else:
            last = frame
    return "".join(text), last


async def beside(engine: MlxEngine, bad: InferenceRequest, good: InferenceRequest) -> tuple[Any, str, Any]:
    """Run ``good``; once it decodes, ``bad`` joins the batch. Returns bad's last frame, good's text and last."""
    decoding = asyncio.Event()
    good_task = asyncio.create_task(run(engine, good, decoding))
    await asyncio.wait_for(decoding.wait(), 60)
    _, bad_last = await run(engine, bad)
    good_text, good_last = await good_task
    return bad_last, good_text, good_last


def raising(message: str) -> Callable[..., Any]:
    def fail(*_args: Any) -> Any:
        raise RuntimeError(message)

    return fail


async def test_a_raising_logits_processor_fails_only_its_request(engine: MlxEngine, monkeypatch) -> None:
    solo, _ = await run(engine, request("solo", max_tokens=40))
    real = sampling.make_request_processors

    def processors(params: SamplingParams) -> sampling.RequestProcessors:
        made = real(params)
        if params.presence_penalty == 0.5:  # the marked request
            made.append(raising("processor exploded"))
        return made

    monkeypatch.setattr(sampling, "make_request_processors", processors)
    bad = request("bad", sampling=SamplingParams(temperature=0.0, presence_penalty=0.5))
    bad_last, good_text, good_last = await beside(engine, bad, request("good", max_tokens=40))
    assert isinstance(bad_last, Error) and bad_last.code == "engine_error" and not bad_last.retryable
    assert "processor exploded" in bad_last.message
    assert isinstance(good_last, Done) and good_text == solo
    text, done = await run(engine, request("after"))  # the engine still serves
    assert isinstance(done, Done) and text == solo[: len(text)]


async def test_a_raising_sampler_fails_only_its_request(engine: MlxEngine, monkeypatch) -> None:
    solo, _ = await run(engine, request("solo", max_tokens=40))
    real = sampling.make_request_sampler

    def sampler(params: SamplingParams, seed: int | None, vocab: int) -> Any:
        return raising("sampler exploded") if seed == 666 else real(params, seed, vocab)

    monkeypatch.setattr(sampling, "make_request_sampler", sampler)
    bad = request("bad", sampling=SamplingParams(temperature=0.7), seed=666)
    bad_last, good_text, good_last = await beside(engine, bad, request("good", max_tokens=40))
    assert isinstance(bad_last, Error) and not bad_last.retryable and "sampler exploded" in bad_last.message
    assert isinstance(good_last, Done) and good_text == solo


class PoisonedGenerator:
    """A BatchGenerator whose step fails whenever a request named ``poison`` is in the batch."""

    def __init__(self, inner: Any, loop: generation_loop.GenerationLoop) -> None:
        self.inner = inner
        self.loop = loop
        self.failures = 0

    def next(self) -> Any:
        if any(job.request.request_id.startswith("poison") for job in self.loop.active.values()):
            self.failures += 1
            raise RuntimeError("the model choked")
        return self.inner.next()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def poison(engine: MlxEngine, *, together: tuple[str, ...] = ()) -> None:
    """Make steps fail while ``poison`` is in the batch; the requests named in ``together`` are admitted in
    one step (the generation thread waits for all of them before it admits any)."""
    loop = engine._loop
    assert loop is not None
    make = loop.make_generator
    loop.make_generator = lambda: PoisonedGenerator(make(), loop)  # type: ignore[method-assign]
    loop.generator = PoisonedGenerator(loop.generator, loop)
    admit = loop.admit
    pending = set(together)

    def admit_together() -> None:
        names = {job.request.request_id for job in loop.waiting}
        if pending and names & pending:
            pending.clear()
            deadline = time.monotonic() + 30
            while not set(together) <= names and time.monotonic() < deadline:
                loop.take_inbox(block=True)
                names = {job.request.request_id for job in loop.waiting}
        admit()

    loop.admit = admit_together  # type: ignore[method-assign]


async def test_a_failed_step_goes_on_without_the_request_that_caused_it(
    engine: MlxEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlxcluster.worker.generation_loop")
    long = 300  # the running request is still decoding when the new ones join, even on a loaded machine
    solo_running, _ = await run(engine, request("solo1", "a running request", max_tokens=long))
    solo_new, _ = await run(engine, request("solo2", "an innocent newcomer", max_tokens=10))
    poison(engine, together=("poison", "innocent"))
    decoding = asyncio.Event()
    running = asyncio.create_task(run(engine, request("running", "a running request", max_tokens=long), decoding))
    await asyncio.wait_for(decoding.wait(), 60)
    # two new requests join in the same step: one of them poisons it
    (_, culprit), (new_text, new_last) = await asyncio.gather(
        run(engine, request("poison", "a poisoned prompt")),
        run(engine, request("innocent", "an innocent newcomer", max_tokens=10)),
    )
    running_text, running_last = await running
    assert isinstance(culprit, Error) and culprit.code == "engine_error" and not culprit.retryable
    assert "the model choked" in culprit.message
    assert isinstance(running_last, Done) and running_text == solo_running  # resumed in a fresh batch
    assert isinstance(new_last, Done) and new_text == solo_new
    assert running_last.usage.completion_tokens == long
    # the first failure suspects both new requests (all three go on, the suspects one at a time); the second,
    # with the poisoned one alone on trial, names it (the others may have finished by then)
    batches = fresh_batches(caplog)
    assert len(batches) == 2 and batches[0] == (3, 0) and batches[1][1] == 1


def fresh_batches(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int]]:
    """(went on, ended) of every fresh batch the loop started."""
    found = []
    for record in caplog.records:
        if record.msg.startswith("started a fresh batch"):
            found.append(record.args)
    return [tuple(args) for args in found]  # type: ignore[misc]


async def test_logit_bias_outside_the_vocabulary_is_refused(engine: MlxEngine) -> None:
    vocab = engine._loaded.vocab_size if engine._loaded is not None else 0
    bad = request("bias", sampling=SamplingParams(temperature=0.0, logit_bias={vocab: 5.0}))
    _, last = await run(engine, bad)
    assert isinstance(last, Error) and last.code == "invalid_request" and last.param == "logit_bias"
    assert str(vocab) in last.message
    ok = request("bias-ok", sampling=SamplingParams(temperature=0.0, logit_bias={vocab - 1: 5.0}))
    _, done = await run(engine, ok)
    assert isinstance(done, Done)


async def test_a_dead_generation_thread_is_reported(tiny_model: Path) -> None:
    reasons: list[str] = []
    engine = MlxEngine(str(tiny_model), max_concurrent=2, prompt_cache_bytes=0, on_fatal=reasons.append)
    await engine.start()
    try:
        loop = engine._loop
        assert loop is not None

        def broken_admit() -> None:
            raise RuntimeError("bug in the loop")

        loop.admit = broken_admit  # type: ignore[method-assign]
        _, last = await run(engine, request("victim"))
        assert isinstance(last, Error) and last.retryable  # another worker can serve it
        await wait_until(lambda: reasons)
        assert "bug in the loop" in reasons[0] and engine.failure == reasons[0]
        _, refused = await run(engine, request("late"))
        assert isinstance(refused, Error) and refused.code == "shutting_down"
    finally:
        await engine.stop()
