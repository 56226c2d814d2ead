"""The prompt cache through the API: cached_tokens in OpenAI usage, the context-window 400, and a
long prefill that reports progress instead of tripping the first-token timeout.

A controller and one mlx worker (the tiny test model) talk over the real nats-server; requests come
from the official ``openai`` client.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from cluster_harness import Cluster, FakeWorker, single_worker_cluster, wait_until, with_sections
from nats.aio.msg import Msg
from tiny_model import build_tiny_model

from mlxcluster.config import Config
from mlxcluster.protocol import Accepted, Done, InferenceRequest, Progress, Token, Usage
from mlxcluster.worker.engine import MlxEngine

SYSTEM = "You are a careful assistant who answers in full sentences. " * 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
async def mlx_cluster(cluster_config: Config, nats_server, tiny_model: Path):
    engine = MlxEngine(str(tiny_model), max_concurrent=2, prompt_cache_bytes=64 << 20)
    await engine.start()
    try:
        async with single_worker_cluster(cluster_config, engine=engine) as cluster:
            yield cluster
    finally:
        await engine.stop()


async def test_chat_usage_reports_cached_tokens(mlx_cluster: Cluster) -> None:
    client = mlx_cluster.controller.client()
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}]
    first = await client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Tell me more."},
    ]
    second = await client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens

    stream = await client.chat.completions.create(
        model="tiny",
        messages=history,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1

    workers = await mlx_cluster.controller.workers()
    assert workers[0]["id"] == "w1"


async def test_completions_usage_reports_cached_tokens(mlx_cluster: Cluster) -> None:
    client = mlx_cluster.controller.client()
    prompt = SYSTEM + "Once upon a time"
    await client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    again = await client.completions.create(model="tiny", prompt=prompt + " there", max_tokens=6, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


async def test_prompt_beyond_the_context_window_is_a_400(mlx_cluster: Cluster) -> None:
    client = mlx_cluster.controller.client()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x " * 2500}], max_tokens=16
        )
    assert caught.value.code == "context_length_exceeded"
    assert "context window is 2048 tokens" in caught.value.message
    # max_tokens counts too: a short prompt asking for more than the window is refused the same way
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4000
        )
    assert caught.value.code == "context_length_exceeded"


async def slow_prefill(fake: FakeWorker, request: InferenceRequest, msg: Msg) -> None:
    """Accept, then 'prefill' for 2.4 s with a Progress frame every 0.3 s, then answer."""
    await fake.send(msg, Accepted(worker_id=fake.id))
    for step in range(1, 9):
        await asyncio.sleep(0.3)
        await fake.send(msg, Progress(processed=step * 100, total=900))
    await fake.send(msg, Token(text="done", seq=0))
    await fake.send(msg, Done(usage=Usage(prompt_tokens=900, completion_tokens=1, total_tokens=901), seq=1))


async def silent_prefill(fake: FakeWorker, request: InferenceRequest, msg: Msg) -> None:
    """Accept, then stay silent for 2.4 s before answering."""
    await fake.send(msg, Accepted(worker_id=fake.id))
    await asyncio.sleep(2.4)
    await fake.send(msg, Token(text="late", seq=0))
    await fake.send(msg, Done(seq=1))


@pytest.mark.parametrize("handler", [slow_prefill, silent_prefill])
async def test_first_token_timer_measures_silence_not_prefill(cluster_config: Config, nats_server, handler) -> None:
    config = with_sections(cluster_config, controller={"first_token_timeout_s": 1.0, "max_attempts": 1})
    async with Cluster(config) as cluster:
        fake = await cluster.start_fake("slow", handler)
        controller = await cluster.start_controller()
        await controller.wait_online("slow")
        client = controller.client()
        call = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "long"}])
        if handler is slow_prefill:
            reply = await call
            assert reply.choices[0].message.content == "done"  # 2.4 s of prefill, never 1 s of silence
        else:
            with pytest.raises(openai.APIStatusError) as caught:
                await call
            assert caught.value.status_code == 503
            assert "no first token in time" in caught.value.message
        assert len(fake.received) == 1


async def test_cache_aware_routing_with_real_engines(cluster_config: Config, nats_server, tiny_model: Path) -> None:
    """Two mlx workers, conversations interleaved: every later turn goes to the worker that holds the
    conversation, as the digests the engine publishes say, and is served from its prompt cache."""
    from mlxcluster.prefix_digest import canonical_text, prefix_digests
    from mlxcluster.protocol import ChatMessage

    engines = [MlxEngine(str(tiny_model), max_concurrent=2, prompt_cache_bytes=64 << 20) for _ in range(2)]
    for engine in engines:
        await engine.start()
    try:
        async with Cluster(cluster_config) as cluster:
            for i, engine in enumerate(engines):
                await cluster.start_worker(f"m{i}", engine=engine)
            controller = await cluster.start_controller()
            await controller.wait_online("m0", "m1")
            assert controller.ctx.balancer_name == "cache_aware"
            client = controller.client()
            index = controller.ctx.cache_index
            histories = [[{"role": "system", "content": f"Conversation {c}. " + SYSTEM}] for c in range(4)]
            later_prompt = later_cached = 0
            for turn in range(3):
                for history in histories:
                    history.append({"role": "user", "content": f"Question {turn}?"})
                    reply = await client.chat.completions.create(
                        model="tiny", messages=history, max_tokens=6, temperature=0
                    )
                    usage = reply.usage
                    if turn > 0:
                        later_prompt += usage.prompt_tokens
                        later_cached += usage.prompt_tokens_details.cached_tokens
                    history.append({"role": "assistant", "content": reply.choices[0].message.content})
                    # the next turn is routed on what the worker published: wait until the index has it
                    messages = [ChatMessage(role=m["role"], content=m["content"]) for m in history]
                    last = prefix_digests(canonical_text(messages, None))[-1]
                    await wait_until(
                        lambda d=last: any(index.holds(w, "tiny", d) for w in ("m0", "m1")),
                        what="the worker's cache event in the index",
                    )
            # every later turn found its whole previous turn cached on the worker it was sent to
            assert later_cached / later_prompt > 0.8
            held = [index.worker_entries(w) for w in ("m0", "m1")]
            assert all(held), held  # the conversations were spread over both workers
    finally:
        for engine in engines:
            await engine.stop()
