"""The mlx engine on every model-family fixture (``families.py``): the prompt cache, reasoning and defaults.

Prompt cache: a 3-turn conversation answered by two engines on the same fixture, one with the cache and one
without, must be token for token identical, and the later turns must reuse the earlier ones: through the
final cache of a turn (plain KV caches, trimmed back where the conversation diverges) or, for caches that
cannot be trimmed (Gemma 3's rolling window, Qwen3-Next's linear-attention state), through the checkpoint
kept while the turn prefilled (the conversation before its generation prompt).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from families import FAMILIES, FamilyModels

from mlxcluster.protocol import ChatMessage, Done, Error, InferenceRequest, ReasoningParams, SamplingParams, Token
from mlxcluster.worker.engine import MlxEngine

SYSTEM = "You are a careful assistant who answers in full sentences. " * 4  # rolls Gemma 3's 16-token window
CACHE_FAMILIES = ("qwen3", "gemma3", "qwen3_next", "mistral", "llama3")
TRIMMABLE = {"qwen3", "mistral", "llama3"}


async def started(path: Path, **options: Any) -> MlxEngine:
    engine = MlxEngine(str(path), max_concurrent=4, **options)
    await engine.start()
    return engine


async def answer(engine: MlxEngine, request: InferenceRequest) -> tuple[str, Done]:
    text: list[str] = []
    last: Any = None
    async for frame in engine.generate(request):
        if isinstance(frame, Token):
            text.append(frame.text)
        else:
            last = frame
    assert isinstance(last, Done), last
    return "".join(text), last


def chat(family: str, messages: list[ChatMessage], *, max_tokens: int = 8, **fields: Any) -> InferenceRequest:
    fields.setdefault("sampling", SamplingParams(temperature=0.0))
    if FAMILIES[family].thinking:
        fields.setdefault("chat_template_kwargs", {"enable_thinking": False})
    return InferenceRequest(
        request_id=f"{family}-{len(messages)}", model=family, messages=messages, max_tokens=max_tokens, **fields
    )


@pytest.fixture
async def engine_pair(family_models: FamilyModels, request: pytest.FixtureRequest) -> AsyncIterator[tuple]:
    """(cached, plain) engines on the family named by the test's ``family`` parameter."""
    path = family_models.path(request.node.callspec.params["family"])
    cached = await started(path, prompt_cache_bytes=64 << 20)
    plain = await started(path, prompt_cache_bytes=0)
    yield cached, plain
    await cached.stop()
    await plain.stop()


@pytest.mark.parametrize("family", CACHE_FAMILIES)
async def test_cached_turns_are_identical_and_reuse_the_conversation(family: str, engine_pair: tuple) -> None:
    cached, plain = engine_pair
    messages = [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content="Tell me about foxes.")]
    prompts: list[int] = []
    for turn in range(3):
        request = chat(family, messages)
        (text, done), (expected, plain_done) = await asyncio.gather(answer(cached, request), answer(plain, request))
        assert text == expected, f"turn {turn + 1}"
        assert done.usage.prompt_tokens == plain_done.usage.prompt_tokens
        assert plain_done.usage.cached_tokens == 0
        if turn:
            # the earlier turn's conversation (its prompt less the generation prompt, at least) was reused
            assert done.usage.cached_tokens >= prompts[-1] - 8, (turn, done.usage, prompts)
        prompts.append(done.usage.prompt_tokens)
        messages += [ChatMessage(role="assistant", content=text), ChatMessage(role="user", content=f"And {turn}?")]
    again = chat(family, messages[:2])  # the first turn again: an exact hit, or its checkpoint
    (text, done), (expected, _) = await asyncio.gather(answer(cached, again), answer(plain, again))
    assert text == expected and done.usage.cached_tokens > 0
    stats = cached.prompt_cache_stats()
    assert stats is not None and stats.hits >= 3
    details = cached.info().details
    assert ("RotatingKVCache" in details["cache"]) == (family == "gemma3")
    assert ("ArraysCache" in details["cache"]) == (family == "qwen3_next")


async def test_vocab_and_context_come_from_a_nested_text_config(family_models: FamilyModels) -> None:
    """The mistral fixture's config keeps vocab_size and the context length in ``text_config`` only."""
    engine = await started(family_models.path("mistral"), prompt_cache_bytes=0)
    try:
        loaded = engine._loaded
        assert loaded is not None
        assert loaded.vocab_size == 49152 and loaded.context_window == 262144
        assert engine.info().details["quantization"].startswith("4-bit")
        bias = SamplingParams(temperature=0.0, logit_bias={49151: 1.0})
        _, done = await answer(engine, chat("mistral", [ChatMessage(role="user", content="hi")], sampling=bias))
        assert done.finish_reason == "length"
        refused = chat("mistral", [ChatMessage(role="user", content="hi")])
        refused.sampling = SamplingParams(temperature=0.0, logit_bias={49152: 1.0})
        frames = [frame async for frame in engine.generate(refused)]
        assert isinstance(frames[-1], Error) and frames[-1].param == "logit_bias"
    finally:
        await engine.stop()


async def test_the_default_max_tokens_is_the_room_the_context_leaves(
    tmp_path: Path, family_models: FamilyModels
) -> None:
    """With ``max_tokens_auto`` the worker answers within the context window: at most the cap, at most the room."""
    import json
    import shutil

    small = tmp_path / "llama3-small"
    shutil.copytree(family_models.path("llama3"), small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 80
    (small / "config.json").write_text(json.dumps(config))
    engine = await started(small, prompt_cache_bytes=0)
    try:
        messages = [ChatMessage(role="user", content="hello there")]
        _, done = await answer(engine, chat("llama3", messages, max_tokens=1000, max_tokens_auto=True))
        assert done.finish_reason == "length" and done.usage.total_tokens == 80  # the room, not the cap
        _, capped = await answer(engine, chat("llama3", messages, max_tokens=5, max_tokens_auto=True))
        assert capped.usage.completion_tokens == 5  # the cap, when it is the smaller
        long = [ChatMessage(role="user", content="word " * 100)]
        frames = [frame async for frame in engine.generate(chat("llama3", long, max_tokens=10, max_tokens_auto=True))]
        assert isinstance(frames[-1], Error) and frames[-1].code == "context_length_exceeded"
    finally:
        await engine.stop()


async def test_a_thinking_budget_forces_the_answer(family_models: FamilyModels) -> None:
    """The qwen3 fixture's template opens a think block its random weights never close: the budget closes it,
    the answer then comes as content, and usage counts the reasoning tokens."""
    engine = await started(family_models.path("qwen3"), prompt_cache_bytes=0)
    try:
        messages = [ChatMessage(role="user", content="Think about it.")]
        reasoning, content, done = await split(engine, chat("qwen3", messages, max_tokens=24))  # thinking off
        assert reasoning == "" and content and done.usage.reasoning_tokens == 0
        budget = ReasoningParams(enabled=True, budget_tokens=6)
        budgeted = chat("qwen3", messages, max_tokens=24, reasoning=budget, chat_template_kwargs=None)
        reasoning, content, done = await split(engine, budgeted)
        assert reasoning and content
        assert done.usage.reasoning_tokens == 6 + 1  # the budget, then the forced </think>
        on = ReasoningParams(enabled=True)
        unbounded = chat("qwen3", messages, max_tokens=12, reasoning=on, chat_template_kwargs=None)
        reasoning, content, done = await split(engine, unbounded)
        assert reasoning and not content and done.usage.reasoning_tokens == 12
    finally:
        await engine.stop()


async def test_a_model_without_thinking_refuses_reasoning_naming_the_field(family_models: FamilyModels) -> None:
    engine = await started(family_models.path("gemma3"), prompt_cache_bytes=0)
    try:
        messages = [ChatMessage(role="user", content="hi")]
        asked = ReasoningParams(enabled=True, effort="high", param="reasoning_effort")
        error = await split_error(engine, chat("gemma3", messages, reasoning=asked))
        assert error is not None and error.code == "invalid_request" and error.param == "reasoning_effort"
        off = ReasoningParams(enabled=False, effort="none", param="reasoning_effort")
        assert await split_error(engine, chat("gemma3", messages, reasoning=off)) is None  # nothing to switch off
    finally:
        await engine.stop()


async def split(engine: MlxEngine, request: InferenceRequest) -> tuple[str, str, Done]:
    reasoning, content, last = [], [], None
    async for frame in engine.generate(request):
        if isinstance(frame, Token):
            reasoning.append(frame.reasoning)
            content.append(frame.text)
        else:
            last = frame
    assert isinstance(last, Done), last
    return "".join(reasoning), "".join(content), last


async def split_error(engine: MlxEngine, request: InferenceRequest) -> Error | None:
    frames = [frame async for frame in engine.generate(request)]
    return frames[-1] if isinstance(frames[-1], Error) else None


async def test_preparation_is_thread_safe(family_models: FamilyModels) -> None:
    """RequestPreparer says it is thread-safe (the engine prepares on a pool): requests prepared from 8 threads at
    once get exactly the prompts and grammars they get one by one, and each schema is compiled once."""
    from concurrent.futures import ThreadPoolExecutor

    from mlxcluster.protocol import ResponseFormat, ToolSpec

    engine = await started(family_models.path("qwen3"), prompt_cache_bytes=0)
    try:
        preparer = engine._preparer
        assert preparer is not None
        requests = []
        for i in range(24):
            schema = {"type": "object", "properties": {f"k{i % 6}": {"type": "integer"}}}
            fields: dict[str, Any] = (
                {"response_format": ResponseFormat(type="json_schema", schema=schema)}
                if i % 2
                else {"tools": [ToolSpec(name=f"tool_{i % 6}")], "tool_choice": "required"}
            )
            messages = [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=f"q{i}")]
            requests.append(chat("qwen3", messages, **fields))
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(preparer.prepare, requests))
        compiled = preparer.features.grammars.compiled
        alone = [preparer.prepare(request) for request in requests]
        assert [p.prompt for p in together] == [p.prompt for p in alone]
        assert all(p.features.grammar is not None for p in together)
        assert compiled == 6 and preparer.features.grammars.compiled == 6  # 3 schemas and 3 forced tools, once each
    finally:
        await engine.stop()
