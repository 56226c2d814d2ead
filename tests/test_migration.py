"""Mid-stream migration: a stream whose worker is lost after the first token continues on another worker.

Fake workers (real NATS, real registrations) lose the stream in each way a worker can; a real echo worker
continues it. The client must see one stream: the whole answer once, one finish reason, usage counted once.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest
from cluster_harness import (
    Cluster,
    FakeWorker,
    RunningController,
    barrier,
    chat_request,
    sse_events,
    wait_until,
    with_sections,
)
from nats.aio.msg import Msg

from mlxcluster.api import MetricsEvent, RequestFinished, RequestMigrated
from mlxcluster.bus import Bus
from mlxcluster.config import Config, StaticWorker
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import (
    Accepted,
    Done,
    Error,
    InferenceRequest,
    SaidPart,
    SamplingParams,
    Token,
    ToolCall,
    ToolCallDelta,
)
from mlxcluster.worker.echo import continued_words, echo_words

USER = [{"role": "user", "content": "hello brave new world"}]
ANSWER = "hello brave new world"


def migrating(config: Config, *fakes: str, **controller: Any) -> Config:
    """``config`` where the fakes are tried first (in the order given), with Prometheus metrics on."""
    static = [StaticWorker(name=name, priority=20 - i) for i, name in enumerate(fakes)]
    return with_sections(
        config, workers={"static": static}, controller=controller, metrics={"exporters": ["prometheus"]}
    )


def next_words(request: InferenceRequest, count: int) -> list[str]:
    """The echo engine's next ``count`` words for ``request`` (a continuation goes on after its text)."""
    words, _ = echo_words(request)
    return continued_words(words, request.continuation)[:count]


def words_then(count: int, then: str):  # type: ignore[no-untyped-def]
    """A fake handler: stream the next ``count`` echo words, then ``then``: ``vanish`` (stop heartbeating,
    go silent), ``stall`` (stay online, silent), ``skip`` (a frame lost on the bus), ``error`` (retryable),
    ``cancel`` (the worker cancelled it)."""

    async def handler(fake: FakeWorker, request: InferenceRequest, msg: Msg) -> None:
        await fake.send(msg, Accepted(worker_id=fake.id))
        for seq, word in enumerate(next_words(request, count)):
            await fake.send(msg, Token(text=word, seq=seq))
        if then == "vanish":
            fake.heartbeating = False
        elif then == "skip":
            await fake.send(msg, Token(text=" lost", seq=count + 1))  # #count never arrived
        elif then == "error":
            await fake.send(msg, Error(code="engine_error", message="the batch was reset", retryable=True))
        elif then == "cancel":  # what a draining worker sends when its drain timeout cancels the stream
            await fake.send(msg, Done(finish_reason="cancelled", seq=count))

    return handler


async def record_requests(bus: Bus, worker_id: str) -> list[InferenceRequest]:
    """Every request sent to ``worker_id`` (a second subscriber on its subject: NATS copies each message)."""
    seen: list[InferenceRequest] = []

    async def on_request(request: InferenceRequest, _msg: Msg) -> None:
        seen.append(request)

    await bus.subscribe(bus.subjects.inference(worker_id), InferenceRequest, on_request)
    await barrier(bus)
    return seen


async def copies(bus: Bus, seen: list[InferenceRequest]) -> list[InferenceRequest]:
    """``seen`` once the recorder on ``bus`` has its copies: they come over another connection than the worker's,
    so a stream can end before they are delivered (a round trip on that connection, then its callbacks)."""
    await barrier(bus)
    await wait_until(lambda: seen, what="the recorder's copy of the request")
    return seen


def record_events(controller: RunningController) -> list[MetricsEvent]:
    """The dispatcher's metrics events, as they are emitted (passed on to the exporters unchanged)."""
    events: list[MetricsEvent] = []
    dispatcher = controller.ctx.dispatcher
    sink = dispatcher.events

    def keep(event: MetricsEvent) -> None:
        events.append(event)
        sink(event)

    dispatcher.events = keep
    return events


async def stream_chat(controller: RunningController, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streamed request; every SSE payload up to ``[DONE]`` (which must come)."""
    async with controller.session().post(controller.url + body.pop("path", "/v1/chat/completions"), json=body) as r:
        assert r.status == 200
        events = [e async for e in sse_events(r)]
    assert events[-1] == "[DONE]", events
    return [json.loads(e) for e in events[:-1]]


def chat_text(payloads: list[dict[str, Any]]) -> str:
    return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p.get("choices"))


def finish_reasons(payloads: list[dict[str, Any]]) -> list[str]:
    return [c["finish_reason"] for p in payloads for c in p.get("choices", []) if c["finish_reason"]]


LOSSES = [("vanish", "offline"), ("skip", "frames_lost"), ("error", "worker_error"), ("cancel", "worker_error")]


@pytest.mark.parametrize(("then", "reason"), LOSSES)
async def test_a_lost_stream_continues_on_another_worker_with_no_seam(
    cluster_config: Config, bus: Bus, then: str, reason: str
) -> None:
    seen = await record_requests(bus, "w-real")
    async with Cluster(migrating(cluster_config, "w-flaky")) as cluster:
        flaky = await cluster.start_fake("w-flaky", words_then(2, then))
        await cluster.start_worker("w-real", token_delay_ms=5)
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky", "w-real")
        events = record_events(controller)
        body = {"model": "echo", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
        started = time.monotonic()
        payloads = await stream_chat(controller, body)
        assert time.monotonic() - started < 8  # offline timeout 1 s + sweep + poll, not a stall or request timeout
        assert chat_text(payloads) == ANSWER  # nothing repeated, nothing missing
        assert finish_reasons(payloads) == ["stop"]
        assert not any("error" in p for p in payloads)
        usage = [p["usage"] for p in payloads if p.get("usage")]
        assert usage == [
            {
                "prompt_tokens": 4,
                "completion_tokens": 4,
                "total_tokens": 8,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            }
        ]
        (continued,) = await copies(bus, seen)
        assert continued.continuation == "hello brave" and continued.max_tokens == flaky.received[0].max_tokens - 2
        assert continued.request_id == flaky.received[0].request_id
        stats = controller.ctx.dispatcher.stats
        assert (stats.migrations, stats.completed, stats.errors) == (1, 1, 0)
        async with controller.session().get(controller.url + "/api/cluster/status") as resp:
            assert (await resp.json())["requests"]["migrations"] == 1
        await wait_until(lambda: any(isinstance(e, RequestFinished) for e in events))
        (moved,) = [e for e in events if isinstance(e, RequestMigrated)]
        assert (moved.worker, moved.to_worker, moved.reason, moved.tokens, moved.migration) == (
            "w-flaky",
            "w-real",
            reason,
            2,
            1,
        )
        (finished,) = [e for e in events if isinstance(e, RequestFinished)]
        assert (finished.status, finished.migrations, finished.worker) == ("ok", 1, "w-real")
        assert (finished.prompt_tokens, finished.completion_tokens) == (4, 4)
        async with controller.session().get(controller.url + "/metrics") as resp:
            metrics = await resp.text()
        assert f'mlxcluster_migrations_total{{reason="{reason}"}} 1.0' in metrics
        if then in ("vanish", "skip"):  # the abandoned generation is cancelled (a worker that ended it needs none)
            await wait_until(lambda: flaky.cancels, what="a cancel to the lost worker")


async def test_a_stalled_stream_moves_after_the_stall_timeout(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    """Online, heartbeating, but silent mid-stream (no frames, no liveness probes): moved after the stall timeout."""
    config = migrating(cluster_config, "w-frozen", stall_timeout_s=0.8)
    async with Cluster(config) as cluster:
        await cluster.start_fake("w-frozen", words_then(1, "stall"))
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-frozen", "w-real")
        events = record_events(controller)
        payloads = await stream_chat(controller, {"model": "echo", "messages": USER, "stream": True})
        assert chat_text(payloads) == ANSWER and finish_reasons(payloads) == ["stop"]
        (moved,) = [e for e in events if isinstance(e, RequestMigrated)]
        assert moved.reason == "stalled" and moved.gap_s >= 0.8
        assert controller.ctx.registry.get("w-frozen").status == "online"  # type: ignore[union-attr]


async def test_non_stream_chat_and_text_completions_are_continued(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    async with Cluster(migrating(cluster_config, "w-flaky")) as cluster:
        await cluster.start_fake("w-flaky", words_then(1, "skip"))
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky", "w-real")
        client = controller.client()
        chat = await client.chat.completions.create(model="echo", messages=USER)  # type: ignore[arg-type]
        assert chat.choices[0].message.content == ANSWER and chat.choices[0].finish_reason == "stop"
        assert chat.usage is not None and (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (4, 4)
        text = await client.completions.create(model="echo", prompt="one two three four five six")
        assert text.choices[0].text == "one two three four five six" and text.choices[0].finish_reason == "stop"
        assert text.usage is not None and (text.usage.prompt_tokens, text.usage.completion_tokens) == (6, 6)
        streamed = await stream_chat(
            controller, {"path": "/v1/completions", "model": "echo", "prompt": "a b c d", "stream": True}
        )
        assert "".join(c["text"] for p in streamed for c in p["choices"]) == "a b c d"
        assert controller.ctx.dispatcher.stats.migrations == 3


async def test_max_tokens_is_the_budget_of_the_whole_stream(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    async with Cluster(migrating(cluster_config, "w-flaky")) as cluster:
        await cluster.start_fake("w-flaky", words_then(2, "vanish"))
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky", "w-real")
        body = {"model": "echo", "messages": USER, "max_tokens": 3, "stream": True}
        body["stream_options"] = {"include_usage": True}
        payloads = await stream_chat(controller, body)
        assert chat_text(payloads) == "hello brave new" and finish_reasons(payloads) == ["length"]
        assert [p["usage"]["completion_tokens"] for p in payloads if p.get("usage")] == [3]


@pytest.mark.parametrize(("limit", "expected"), [(1, "hello brave"), (2, ANSWER)])
async def test_at_most_migration_limit_moves(
    cluster_config: Config, nats_server: EmbeddedNatsServer, limit: int, expected: str
) -> None:
    """Two workers lose the stream one after the other: with a limit of 1 the second loss ends it with an error."""
    async with Cluster(migrating(cluster_config, "w-f1", "w-f2", migration_limit=limit)) as cluster:
        await cluster.start_fake("w-f1", words_then(1, "vanish"))
        f2 = await cluster.start_fake("w-f2", words_then(1, "skip"))
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-f1", "w-f2", "w-real")
        payloads = await stream_chat(controller, {"model": "echo", "messages": USER, "stream": True})
        assert chat_text(payloads) == expected
        assert f2.received[0].continuation == "hello"
        stats = controller.ctx.dispatcher.stats
        if limit == 1:
            error = payloads[-1]["error"]
            assert error["code"] == "frames_lost" and "migration limit (1) reached" in error["message"]
            assert finish_reasons(payloads) == [] and (stats.migrations, stats.migrations_failed) == (1, 1)
        else:
            assert finish_reasons(payloads) == ["stop"] and stats.migrations == 2


async def test_with_no_worker_left_the_stream_ends_with_the_loss(
    cluster_config: Config, nats_server: EmbeddedNatsServer
) -> None:
    async with Cluster(migrating(cluster_config, "w-flaky")) as cluster:
        await cluster.start_fake("w-flaky", words_then(1, "vanish"))
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky")
        payloads = await stream_chat(controller, {"model": "echo", "messages": USER, "stream": True})
        assert chat_text(payloads) == "hello"
        error = payloads[-1]["error"]
        assert error["code"] == "worker_lost" and "no worker could continue it" in error["message"]


async def test_a_stream_whose_client_has_gone_is_not_moved(cluster_config: Config, bus: Bus) -> None:
    seen = await record_requests(bus, "w-real")
    async with Cluster(migrating(cluster_config, "w-flaky")) as cluster:
        await cluster.start_fake("w-flaky", words_then(1, "vanish"))
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky", "w-real")
        request = chat_request(ANSWER)
        stream = controller.ctx.dispatcher.stream(request, disconnected=lambda: True)
        frames = [frame async for frame in stream]
        assert [type(f) for f in frames] == [Token, Error]
        assert "client has gone" in frames[-1].message  # type: ignore[union-attr]
        assert seen == [] and controller.ctx.dispatcher.stats.migrations == 0


async def test_seeded_continuation_skips_the_draws_already_made(cluster_config: Config, bus: Bus) -> None:
    seen = await record_requests(bus, "w-real")
    async with Cluster(migrating(cluster_config, "w-flaky")) as cluster:
        await cluster.start_fake("w-flaky", words_then(3, "vanish"))
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky", "w-real")
        request = chat_request(ANSWER, seed=7, sampling=SamplingParams(temperature=0.7))
        frames = [frame async for frame in controller.ctx.dispatcher.stream(request)]
        assert isinstance(frames[-1], Done) and "".join(f.text for f in frames if isinstance(f, Token)) == ANSWER
        (continued,) = await copies(bus, seen)
        assert (continued.seed, continued.sampling.seed_offset, continued.sampling.temperature) == (7, 3, 0.7)


CALL = ToolCall(id="call_1", name="weather", arguments='{"city": "Paris"}')
SAID = {
    "mid-reasoning": (
        [Token(text="", reasoning="let me ", count=2), Token(text="", reasoning="think")],
        [SaidPart(kind="reasoning", text="let me think")],
    ),
    "after-a-tool-call": (
        [
            Token(text="", reasoning="plan", count=2),
            Token(text="hello"),
            Token(text="", tool_calls=[CALL]),
            Token(text=" brave"),
        ],
        [
            SaidPart(kind="reasoning", text="plan"),
            SaidPart(kind="content", text="hello"),
            SaidPart(kind="tool_call", call=CALL),
            SaidPart(kind="content", text=" brave"),
        ],
    ),
}


@pytest.mark.parametrize("case", list(SAID))
async def test_a_moved_stream_carries_what_was_said_in_order(cluster_config: Config, bus: Bus, case: str) -> None:
    """Reasoning, content and complete tool calls reach the continuing worker in order (``said``), the content
    alone in ``continuation``; reasoning tokens count in the budget and the usage."""
    frames, said = SAID[case]

    async def say_then_vanish(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
        await fake.send(msg, Accepted(worker_id=fake.id))
        for seq, frame in enumerate(frames):
            await fake.send(msg, msgspec.structs.replace(frame, seq=seq))
        fake.heartbeating = False

    seen = await record_requests(bus, "w-real")
    async with Cluster(migrating(cluster_config, "w-flaky")) as cluster:
        flaky = await cluster.start_fake("w-flaky", say_then_vanish)
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky", "w-real")
        body = {"model": "echo", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
        payloads = await stream_chat(controller, body)
        (continued,) = await copies(bus, seen)
        tokens = sum(frame.count for frame in frames)
        assert continued.said == said
        content = "".join(part.text for part in said if part.kind == "content")
        assert continued.continuation == content and continued.max_tokens == flaky.received[0].max_tokens - tokens
        deltas = [p["choices"][0]["delta"] for p in payloads if p.get("choices")]
        reasoning = "".join(part.text for part in said if part.kind == "reasoning")
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == reasoning
        assert chat_text(payloads) == ANSWER  # the echo worker went on after the content said
        calls = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", []) if "id" in c]
        assert calls == [p.call.name for p in said if p.call is not None]
        (usage,) = [p["usage"] for p in payloads if p.get("usage")]
        assert usage["completion_tokens_details"]["reasoning_tokens"] == sum(f.count for f in frames if f.reasoning)


async def test_a_stream_lost_inside_a_streamed_tool_call_is_not_moved(cluster_config: Config, bus: Bus) -> None:
    """Another worker would start the call again: the stream ends with the loss instead."""

    async def half_a_call(fake: FakeWorker, _request: InferenceRequest, msg: Msg) -> None:
        await fake.send(msg, Accepted(worker_id=fake.id))
        await fake.send(msg, Token(text="", tool_call_deltas=[ToolCallDelta(id="call_1", name="weather")]))
        await fake.send(msg, Token(text="", tool_call_deltas=[ToolCallDelta(id="call_1", arguments='{"ci')], seq=1))
        fake.heartbeating = False

    seen = await record_requests(bus, "w-real")
    async with Cluster(migrating(cluster_config, "w-flaky")) as cluster:
        await cluster.start_fake("w-flaky", half_a_call)
        await cluster.start_worker("w-real")
        controller = await cluster.start_controller()
        await controller.wait_online("w-flaky", "w-real")
        payloads = await stream_chat(controller, {"model": "echo", "messages": USER, "stream": True})
        error = payloads[-1]["error"]
        assert error["code"] == "worker_lost" and "inside a tool call being streamed" in error["message"]
        assert seen == [] and controller.ctx.dispatcher.stats.migrations == 0
