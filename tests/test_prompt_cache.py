"""The mlx engine's prompt cache: greedy output with a hit is token for token the output without one.

Two engines on the same tiny model, one with the cache and one without (``prompt_cache_bytes=0``),
answer the same requests; every answer must be identical, and the cached engine must report
``cached_tokens``. Cases: a conversation's next turn, hits and misses in one batch, a prefix that
diverges inside a message, a cache entry longer than the new prompt, and the same prompt twice.
The byte bound, eviction, the digests reported to the listener, Progress frames of a long prefill and
the context-window check are tested on the same model; one test runs the real demo model.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from tiny_model import build_tiny_model

from mlxcluster.prefix_digest import canonical_text, prefix_digests
from mlxcluster.protocol import ChatMessage, Done, Error, InferenceRequest, Progress, SamplingParams, Token
from mlxcluster.worker.engine import MlxEngine
from mlxcluster.worker.prompt_cache import default_cache_bytes

SYSTEM = "You are a careful assistant. " * 12  # ~80 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
async def engines(tiny_model: Path):
    """(cached, uncached) engines on the same model, both batching up to 4 requests."""
    cached = MlxEngine(str(tiny_model), max_concurrent=4, prompt_cache_bytes=256 << 20)
    plain = MlxEngine(str(tiny_model), max_concurrent=4, prompt_cache_bytes=0)
    await cached.start()
    await plain.start()
    yield cached, plain
    await cached.stop()
    await plain.stop()


def chat(*turns: str, system: str = SYSTEM, max_tokens: int = 12) -> InferenceRequest:
    """A chat request: the system prompt, then alternating user / assistant turns."""
    messages = [ChatMessage(role="system", content=system)]
    for i, text in enumerate(turns):
        messages.append(ChatMessage(role="user" if i % 2 == 0 else "assistant", content=text))
    return InferenceRequest(
        request_id=f"r{len(turns)}",
        model="tiny",
        messages=messages,
        sampling=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
    )


async def answer(engine: MlxEngine, request: InferenceRequest) -> tuple[str, Done, list[Progress]]:
    text, progress, last = [], [], None
    async for frame in engine.generate(request):
        if isinstance(frame, Token):
            text.append(frame.text)
        elif isinstance(frame, Progress):
            progress.append(frame)
        else:
            last = frame
    assert isinstance(last, Done), last
    return "".join(text), last, progress


async def both(engines: tuple[MlxEngine, MlxEngine], request: InferenceRequest) -> tuple[str, Done]:
    """Answer with both engines; the texts must be identical. Returns the cached engine's answer."""
    cached, plain = engines
    (text, done, _), (expected, plain_done, _) = await asyncio.gather(answer(cached, request), answer(plain, request))
    assert text == expected
    assert done.usage.prompt_tokens == plain_done.usage.prompt_tokens
    assert done.usage.completion_tokens == plain_done.usage.completion_tokens
    assert plain_done.usage.cached_tokens == 0
    return text, done


async def test_next_turn_reuses_the_conversation(engines) -> None:
    first, done1 = await both(engines, chat("Tell me about foxes."))
    assert done1.usage.cached_tokens == 0
    second, done2 = await both(engines, chat("Tell me about foxes.", first, "And dogs?"))
    # the whole first turn (system, user, the reply) came from the cache: only the new turn is prefilled
    assert done2.usage.cached_tokens > done1.usage.prompt_tokens
    assert done2.usage.cached_tokens < done2.usage.prompt_tokens
    stats = engines[0].prompt_cache_stats()
    assert stats is not None and stats.hits == 1 and stats.misses == 1
    assert stats.hit_tokens == done2.usage.cached_tokens
    assert engines[1].prompt_cache_stats() is None


async def test_hits_and_misses_in_one_batch(engines) -> None:
    await both(engines, chat("Warm the cache."))
    batch = [
        chat("Warm the cache."),  # exact prompt again
        chat("Something else entirely."),  # same system prompt, new user turn
        chat("A different system prompt.", system="Be brief. " * 9),  # (almost) a miss
        chat("Warm the cache!"),  # diverges at the last character of the message
    ]
    results = await asyncio.gather(*(both(engines, r) for r in batch))
    cached = [done.usage.cached_tokens for _, done in results]
    assert cached[0] > 0 and cached[1] > 0 and cached[3] > 0
    assert cached[2] < 10  # only the chat template's opening tokens are shared
    assert cached[0] == results[0][1].usage.prompt_tokens - 1  # exact hit: the last token is recomputed


async def test_hit_inserted_while_the_batch_decodes(engines) -> None:
    """A cache hit joins a batch whose other request is already decoding."""
    await both(engines, chat("Remember this."))

    async def late_hit() -> tuple[str, Done]:
        await started.wait()
        return await both(engines, chat("Remember this.", max_tokens=8))

    started = asyncio.Event()

    async def long_running(engine: MlxEngine) -> str:
        parts = []
        async for frame in engine.generate(chat("Write a long story.", system="Other. ", max_tokens=40)):
            if isinstance(frame, Token):
                parts.append(frame.text)
                started.set()
        return "".join(parts)

    cached, plain = engines
    long_cached, long_plain, (_, hit) = await asyncio.gather(long_running(cached), long_running(plain), late_hit())
    assert long_cached == long_plain
    assert hit.usage.cached_tokens > 0


async def test_prefix_diverging_inside_a_message(engines) -> None:
    head = "The quick brown fox jumps over the lazy dog. " * 6
    await both(engines, chat(head + "Then it rests."))
    _, done = await both(engines, chat(head + "Then it runs away."))
    assert done.usage.cached_tokens > 0
    assert done.usage.cached_tokens < done.usage.prompt_tokens - 3


async def test_cache_entry_longer_than_the_new_prompt(engines) -> None:
    reply, _ = await both(engines, chat("Count to three."))
    await both(engines, chat("Count to three.", reply, "Now to four."))
    # a strict prefix of what is cached: the longer entry is copied and trimmed back
    _, done = await both(engines, chat("Count to three."))
    assert done.usage.cached_tokens == done.usage.prompt_tokens - 1


async def test_sampled_requests_are_served_from_the_cache_too(engines) -> None:
    cached, _ = engines
    request = chat("Pick a word.")
    request.sampling = SamplingParams(temperature=0.8)
    request.seed = 7
    await answer(cached, request)
    text, done, _ = await answer(cached, request)
    assert done.usage.cached_tokens > 0 and text


async def test_bytes_stay_under_the_limit_and_evictions_report_digests(tiny_model: Path) -> None:
    events: list[tuple[list[int], list[int]]] = []
    probe = MlxEngine(str(tiny_model), max_concurrent=1, prompt_cache_bytes=1 << 30)
    await probe.start()
    try:
        await answer(probe, chat("Conversation number 9.", system="System 9. " * 20))
        one_entry = probe.prompt_cache_stats().bytes
    finally:
        await probe.stop()
    limit = int(one_entry * 2.5)  # room for two entries of this size, not three
    engine = MlxEngine(str(tiny_model), max_concurrent=1, prompt_cache_bytes=limit)
    engine.set_cache_listener(lambda stored, removed: events.append((stored, removed)))
    await engine.start()
    try:
        requests = [chat(f"Conversation number {i}.", system=f"System {i}. " * 20) for i in range(5)]
        replies = []
        for request in requests:
            text, _, _ = await answer(engine, request)
            replies.append(text)
            stats = engine.prompt_cache_stats()
            assert stats.bytes <= limit
            assert stats.entries <= 2
        stats = engine.prompt_cache_stats()
        assert stats.evictions == 3 and stats.entries == 2
        # the digests of the two newest conversations are held, those of the evicted ones are gone
        expected = [
            prefix_digests(canonical_text(r.messages, None, reply=t)) for r, t in zip(requests, replies, strict=True)
        ]
        held = set(engine.cache_digests())
        assert set(expected[3]) | set(expected[4]) == held
        stored = {d for s, _ in events for d in s}
        removed = {d for _, r in events for d in r}
        assert stored == set().union(*map(set, expected))
        assert removed == set().union(*map(set, expected[:3])) - held
    finally:
        await engine.stop()


async def test_disabled_cache_reports_nothing(engines) -> None:
    _, plain = engines
    _, done, _ = await answer(plain, chat("Hello there."))
    _, done, _ = await answer(plain, chat("Hello there."))
    assert done.usage.cached_tokens == 0
    assert plain.prompt_cache_stats() is None and plain.cache_digests() == []


async def test_long_prompt_sends_progress_while_it_prefills(tiny_model: Path) -> None:
    engine = MlxEngine(str(tiny_model), max_concurrent=2, prefill_step_size=32, prompt_cache_bytes=0)
    await engine.start()
    try:
        _, done, progress = await answer(engine, chat("Go.", system="A long instruction. " * 40))
        assert len(progress) >= 3
        assert [p.processed for p in progress] == sorted(p.processed for p in progress)
        assert all(p.total == done.usage.prompt_tokens and 0 < p.processed < p.total for p in progress)
        short_prompt = InferenceRequest(request_id="s", model="tiny", prompt="Go.", max_tokens=4)
        _, _, short = await answer(engine, short_prompt)
        assert short == []  # a prompt of one chunk sends no Progress frame
    finally:
        await engine.stop()


async def test_prompt_beyond_the_context_window_is_refused_at_once(engines) -> None:
    cached, _ = engines
    frames = [f async for f in cached.generate(chat("x " * 2500, max_tokens=16))]
    assert len(frames) == 1 and isinstance(frames[0], Error)
    assert frames[0].code == "context_length_exceeded" and not frames[0].retryable
    assert "2048" in frames[0].message
    fits = [f async for f in cached.generate(chat("hello", max_tokens=4))]
    assert isinstance(fits[-1], Done)


def test_default_cache_bytes_is_a_share_of_memory() -> None:
    assert default_cache_bytes(8 << 30) == 1 << 30
    assert default_cache_bytes(1 << 40) == 16 << 30


@pytest.fixture(scope="module")
def demo_model() -> Path:
    from mlxcluster.models.demo import ensure_demo_model
    from mlxcluster.models.registry import default_models_dir

    return ensure_demo_model(Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir()))


@pytest.mark.model
async def test_demo_model_second_turn_is_identical_with_the_cache(demo_model: Path) -> None:
    cached = MlxEngine(str(demo_model), max_concurrent=2, prompt_cache_bytes=256 << 20)
    plain = MlxEngine(str(demo_model), max_concurrent=2, prompt_cache_bytes=0)
    await cached.start()
    await plain.start()
    try:
        system = "You are a helpful geography tutor. Answer in one short sentence."
        first = chat("What is the capital of France?", system=system, max_tokens=12)
        reply, _ = await both((cached, plain), first)
        assert "Paris" in reply
        second = chat("What is the capital of France?", reply, "And of Italy?", system=system, max_tokens=12)
        _, done = await both((cached, plain), second)
        assert done.usage.cached_tokens > first.max_tokens
    finally:
        await cached.stop()
        await plain.stop()


def test_shrink_to_evicts_the_least_recently_used_down_to_a_target() -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlxcluster.worker.prompt_cache import PromptCache

    def layer() -> list[KVCache]:
        cache = KVCache()
        cache.update_and_fetch(mx.zeros((1, 1, 4, 4)), mx.zeros((1, 1, 4, 4)))
        return [cache]

    removed: list[int] = []
    cache = PromptCache("m", 1 << 20, lambda _stored, gone: removed.extend(gone))
    for n in range(3):
        cache.store([n, n + 10], layer(), [n])
    one = cache.nbytes // 3
    cache.fetch([0, 10, 99])  # the oldest entry is used again: it is kept
    cache.shrink_to(2 * one - 1)
    assert len(cache) == 1 and removed == [1, 2] and cache.nbytes == one
    assert cache.stats().evictions == 2
    cache.shrink_to(-5)
    assert len(cache) == 0 and cache.nbytes == 0
