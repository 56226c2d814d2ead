"""The mlx engine: sampling, stop strings, max_tokens, seeds, batching, cancellation, deadlines, shutdown.

Most tests run on a tiny random-weight llama built here in a second (byte-level BPE tokenizer made
with ``tokenizers``, a chat template, weights from ``mx.save_safetensors``). Its output is gibberish
but deterministic; the weights are shaped so it never samples special or non-ASCII tokens and, in
the ``eos_first`` variant, always ends at once. The Paris test uses the real demo model.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_harness import wait_until
from tiny_model import build_tiny_model

from mlxcluster.protocol import ChatMessage, Done, Error, InferenceRequest, SamplingParams, Token
from mlxcluster.worker import blas
from mlxcluster.worker.engine import MlxEngine
from mlxcluster.worker.sampling import StopTextFilter


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-eos", eos_first=True)


@pytest.fixture
async def engine(tiny_model: Path):
    started = MlxEngine(str(tiny_model), max_concurrent=4)
    await started.start()
    yield started
    await started.stop()


def request(
    *,
    prompt: str | None = "hello",
    temperature: float = 0.0,
    max_tokens: int = 24,
    **kwargs,
) -> InferenceRequest:
    return InferenceRequest(
        request_id="t",
        model="tiny",
        prompt=prompt,
        sampling=SamplingParams(temperature=temperature),
        max_tokens=max_tokens,
        **kwargs,
    )


async def run(engine: MlxEngine, req: InferenceRequest) -> tuple[str, Done | Error, list]:
    """All frames of one request: (joined text, last frame, frames)."""
    frames = [frame async for frame in engine.generate(req)]
    assert all(isinstance(f, Token) for f in frames[:-1])
    assert isinstance(frames[-1], Done | Error)
    return "".join(f.text for f in frames[:-1]), frames[-1], frames


# --- stop text filter (no model) -----------------------------------------------------------------


def test_stop_filter_holds_back_partial_stop_text() -> None:
    stop = StopTextFilter(["END", "\n\n"])
    assert stop.feed("hello E") == ("hello ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("x") == ("ENx", False)  # it was not a stop string after all
    assert stop.feed("ab\n") == ("ab", False)
    assert stop.feed("\nrest") == ("", True)
    assert stop.feed("more") == ("", True)
    assert stop.flush() == ""


def test_stop_filter_earliest_stop_wins_and_flush_releases_tail() -> None:
    stop = StopTextFilter(["cd", "b"])
    assert stop.feed("abcd") == ("a", True)
    assert stop.matched == "b"  # the stop string that ended the text (Done.stop_sequence)
    tail = StopTextFilter(["xyz"])
    assert tail.feed("ax") == ("a", False)
    assert tail.flush() == "x"


# --- engine on the tiny model ----------------------------------------------------------------------


async def test_info(engine: MlxEngine) -> None:
    info = engine.info()
    assert info.name == "mlx"
    assert info.models == ["tiny"]
    assert info.details["weights_dtype"] == "float32"
    assert info.details["quantization"] == "none"
    assert info.details["blas"]
    assert info.details["mlx_version"]


async def test_chat_template_and_usage(engine: MlxEngine, tiny_model: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    messages = [ChatMessage(role="user", content="What is the capital of France?")]
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": messages[0].content}], add_generation_prompt=True
    )
    text, done, frames = await run(engine, request(prompt=None, messages=messages, max_tokens=12))
    assert isinstance(done, Done)
    assert done.usage.prompt_tokens == len(expected)
    assert done.usage.completion_tokens == 12
    assert done.usage.total_tokens == len(expected) + 12
    assert text and sum(f.count for f in frames[:-1]) <= 12
    assert 0 <= done.timings.queue_ms <= done.timings.ttft_ms <= done.timings.total_ms
    raw_text, raw_done, _ = await run(engine, request(prompt="What is the capital of France?", max_tokens=12))
    assert raw_done.usage.prompt_tokens == len(tokenizer.encode("What is the capital of France?"))


async def test_max_tokens_finishes_with_length(engine: MlxEngine) -> None:
    for max_tokens in (1, 7):
        _, done, _ = await run(engine, request(max_tokens=max_tokens))
        assert isinstance(done, Done)
        assert done.finish_reason == "length"
        assert done.usage.completion_tokens == max_tokens


async def test_eos_finishes_with_stop_and_is_not_shown(eos_model: Path) -> None:
    engine = MlxEngine(str(eos_model), max_concurrent=2)
    await engine.start()
    try:
        text, done, _ = await run(engine, request(max_tokens=20))
    finally:
        await engine.stop()
    assert isinstance(done, Done)
    assert done.finish_reason == "stop"
    assert done.usage.completion_tokens == 1
    assert text == ""


async def test_stop_strings_do_not_leak(engine: MlxEngine) -> None:
    base = request(temperature=1.0, seed=11, max_tokens=40)
    full, done, _ = await run(engine, base)
    assert isinstance(done, Done) and done.finish_reason == "length" and len(full) > 20
    for stop in (full[12:15], full[20:21], full[5:9]):
        cut = full.index(stop)
        seeded = request(temperature=1.0, seed=11, max_tokens=40, stop=[stop, "never-generated"])
        text, done, frames = await run(engine, seeded)
        assert text == full[:cut], stop
        assert isinstance(done, Done) and done.finish_reason == "stop" and done.stop_sequence == stop
        assert done.usage.completion_tokens < 40
        assert all(stop not in f.text for f in frames[:-1])


async def test_stop_string_never_matched_releases_held_text(engine: MlxEngine) -> None:
    full, _, _ = await run(engine, request(max_tokens=16))
    # a stop string that starts with the last character of the output is held back, then released
    text, done, _ = await run(engine, request(max_tokens=16, stop=[full[-1] + "\x00zz"]))
    assert text == full
    assert done.finish_reason == "length" and done.stop_sequence is None


async def test_seed_determinism(engine: MlxEngine) -> None:
    sampled = request(temperature=1.0, seed=1234, max_tokens=24)
    first, _, _ = await run(engine, sampled)
    second, _, _ = await run(engine, sampled)
    other, _, _ = await run(engine, request(temperature=1.0, seed=99, max_tokens=24))
    assert first == second
    assert first != other
    # the same seed inside a batch of other sampled requests draws the same tokens
    batch = await asyncio.gather(
        run(engine, sampled),
        *(run(engine, request(prompt=f"prompt {i}", temperature=0.9, seed=i, max_tokens=24)) for i in range(3)),
    )
    assert batch[0][0] == first


async def test_sampling_params_are_applied(engine: MlxEngine) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.3)
    req = InferenceRequest(request_id="s", model="tiny", prompt="hello", sampling=params, max_tokens=16, seed=5)
    text, done, _ = await run(engine, req)
    again, _, _ = await run(engine, req)
    assert isinstance(done, Done) and done.usage.completion_tokens == 16
    assert text == again
    greedy, _, _ = await run(engine, request(max_tokens=16))
    penalized, _, _ = await run(
        engine,
        InferenceRequest(
            request_id="p", model="tiny", prompt="hello", max_tokens=16,
            sampling=SamplingParams(temperature=0.0, repetition_penalty=5.0),
        ),
    )  # fmt: skip
    assert penalized != greedy  # greedy output of the random model repeats itself; the penalty breaks that


async def test_concurrent_requests_complete_with_correct_usage(engine: MlxEngine) -> None:
    prompts = [f"request number {i} " * (1 + i % 3) for i in range(8)]
    alone = [await run(engine, request(prompt=p, max_tokens=10 + i)) for i, p in enumerate(prompts)]
    together = await asyncio.gather(*(run(engine, request(prompt=p, max_tokens=10 + i)) for i, p in enumerate(prompts)))
    for i, ((text, done, _), (solo_text, solo_done, _)) in enumerate(zip(together, alone, strict=True)):
        assert isinstance(done, Done)
        assert done.finish_reason == "length"
        assert done.usage.completion_tokens == 10 + i
        assert done.usage.prompt_tokens == solo_done.usage.prompt_tokens
        assert text == solo_text  # greedy output does not depend on the batch
    # max_concurrent is 4: the later half waited for a slot
    assert max(done.timings.queue_ms for _, done, _ in together) > 0
    assert engine.active_requests == 0 and engine.queued_requests == 0


async def test_cancellation_stops_generation_and_frees_the_slot(tiny_model: Path) -> None:
    engine = MlxEngine(str(tiny_model), max_concurrent=1)
    await engine.start()
    try:
        stream = engine.generate(request(max_tokens=2_000))
        received = 0
        async for frame in stream:
            assert isinstance(frame, Token)
            received += frame.count
            if received >= 5:
                break
        await stream.aclose()
        await wait_until(lambda: engine.active_requests == 0, what="the cancelled request to leave the batch")
        settled = engine.tokens_total
        assert settled < 2_000  # stopped long before its max_tokens
        # the only slot is free again: the next request runs to completion, and only its tokens are generated
        _, done, _ = await asyncio.wait_for(run(engine, request(max_tokens=5)), 10)
        assert isinstance(done, Done) and done.usage.completion_tokens == 5
        assert engine.tokens_total == settled + 5
    finally:
        await engine.stop()


async def test_task_cancellation_cancels_the_request(tiny_model: Path) -> None:
    engine = MlxEngine(str(tiny_model), max_concurrent=1)
    await engine.start()
    try:
        consumer = asyncio.create_task(run(engine, request(max_tokens=2_000)))
        await wait_until(lambda: engine.tokens_total >= 5, what="5 tokens")
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        _, done, _ = await asyncio.wait_for(run(engine, request(max_tokens=3)), 10)
        assert isinstance(done, Done)
        assert engine.active_requests == 0
    finally:
        await engine.stop()


async def test_deadline_exceeded(engine: MlxEngine) -> None:
    _, error, _ = await run(engine, request(max_tokens=2_000, deadline=time.time() + 0.3))
    assert isinstance(error, Error) and error.code == "deadline_exceeded"
    _, error, frames = await run(engine, request(max_tokens=5, deadline=time.time() - 1))
    assert isinstance(error, Error) and error.code == "deadline_exceeded" and len(frames) == 1
    await wait_until(lambda: engine.active_requests == 0, what="the expired requests to leave the batch")


async def test_invalid_requests(engine: MlxEngine) -> None:
    _, error, _ = await run(engine, request(prompt=None))
    assert isinstance(error, Error) and error.code == "invalid_request" and not error.retryable
    _, error, _ = await run(engine, request(max_tokens=0))
    assert isinstance(error, Error) and error.code == "invalid_request"
    _, error, _ = await run(engine, request(prompt=""))
    assert isinstance(error, Error) and error.code == "invalid_request"


async def test_stop_ends_pending_streams_with_shutting_down(tiny_model: Path) -> None:
    engine = MlxEngine(str(tiny_model), max_concurrent=1)
    await engine.start()
    running = asyncio.create_task(run(engine, request(max_tokens=2_000)))
    queued = asyncio.create_task(run(engine, request(max_tokens=2_000)))
    await wait_until(lambda: engine.tokens_total >= 3, what="3 tokens")
    await engine.stop()
    for task in (running, queued):
        _, error, _ = await asyncio.wait_for(task, 5)
        assert isinstance(error, Error) and error.code == "shutting_down" and error.retryable
    _, error, _ = await run(engine, request())
    assert isinstance(error, Error) and error.code == "shutting_down"


async def test_tokens_total_counts_generated_tokens(engine: MlxEngine) -> None:
    before = engine.tokens_total
    await run(engine, request(max_tokens=20))
    assert engine.tokens_total == before + 20


def test_detokenizer_never_splits_multibyte_characters(tiny_model: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    text = "héllo wörld 東京 🙂 ünïcödé"
    detokenizer = tokenizer.detokenizer
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


# --- BLAS fast path ----------------------------------------------------------------------------------


def test_preload_env() -> None:
    env = blas.preload_env({"PATH": "/bin", "LD_PRELOAD": "/lib/other.so"})
    path = blas.openblas_path()
    if path is None:
        assert env == {"PATH": "/bin", "LD_PRELOAD": "/lib/other.so"}
    else:
        assert env["LD_PRELOAD"] == f"{path}:/lib/other.so"
        assert blas.preload_env(env) == env  # idempotent
        assert "LD_PRELOAD" not in blas.preload_env({blas.DISABLE_ENV: "1"})


@pytest.mark.skipif(blas.openblas_path() is None, reason="no system OpenBLAS (apt-get install libopenblas0-pthread)")
def test_standalone_worker_reexecs_with_openblas(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(
        "import os\n"
        "from mlxcluster.worker.blas import maybe_reexec_with_openblas, blas_in_use\n"
        "print('start', flush=True)\n"
        "maybe_reexec_with_openblas()\n"
        "import mlx.core as mx\n"
        "mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))\n"
        "print(blas_in_use(), os.environ.get('MLXCLUSTER_OPENBLAS_REEXEC'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.REEXEC_GUARD, blas.DISABLE_ENV)}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines.count("start") == 2  # re-executed exactly once
    assert lines[-1].startswith("openblas") and lines[-1].endswith(" 1")
    plain = subprocess.run(
        [sys.executable, str(script)], env={**env, blas.DISABLE_ENV: "1"}, capture_output=True, text=True, timeout=60
    )
    assert plain.stdout.splitlines().count("start") == 1
    assert not plain.stdout.splitlines()[-1].startswith("openblas")


# --- the real demo model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> Path:
    try:
        from mlxcluster.models.demo import DemoModelError, ensure_demo_model
        from mlxcluster.models.registry import default_models_dir
    except ImportError as exc:  # pragma: no cover - the importer is not there
        pytest.skip(f"demo model importer unavailable: {exc}")
    models_dir = Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir())
    try:
        return ensure_demo_model(models_dir)
    except DemoModelError as exc:
        pytest.skip(f"demo model cannot be prepared: {exc}")


@pytest.mark.model
async def test_demo_model_answers_paris(demo_model: Path) -> None:
    engine = MlxEngine(str(demo_model), max_concurrent=2)
    await engine.start()
    try:
        messages = [ChatMessage(role="user", content="What is the capital of France?")]
        req = InferenceRequest(
            request_id="paris", model=engine.model_name, messages=messages,
            sampling=SamplingParams(temperature=0.0), max_tokens=16,
        )  # fmt: skip
        text, done, _ = await run(engine, req)
    finally:
        await engine.stop()
    assert isinstance(done, Done), done
    assert "Paris" in text
    assert done.usage.prompt_tokens > 10 and done.usage.completion_tokens >= 2
