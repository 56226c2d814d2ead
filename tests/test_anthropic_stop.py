"""Anthropic ``stop_reason: "stop_sequence"``: which stop string ended the output, from the worker's Done frame
to the message (non-streamed) and the streamed ``message_delta``, through the real ``anthropic`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import pytest
from cluster_harness import Cluster, RunningController

from mlxcluster.config import Config
from mlxcluster.worker.sampling import StopTextFilter

pytestmark = pytest.mark.timeout(120)

ASK = [{"role": "user", "content": "alpha beta gamma delta epsilon"}]


@pytest.fixture
async def controller(cluster_config: Config, nats_server: object) -> AsyncIterator[RunningController]:
    async with Cluster(cluster_config) as cluster:
        await cluster.start_worker("w1", models=["echo"])
        running = await cluster.start_controller()
        await running.wait_online("w1")
        yield running


def test_stop_filter_names_the_earliest_stop() -> None:
    stops = StopTextFilter(["delta", "ga", "gamma"])
    assert stops.feed("alpha beta g") == ("alpha beta ", False)
    assert stops.feed("amma delta") == ("", True)
    assert stops.matched == "ga"  # "ga" and "gamma" start at the same place: the first listed wins
    assert StopTextFilter(["x"]).matched is None


async def test_stop_sequence_in_message_and_stream(controller: RunningController) -> None:
    client = anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{controller.port}", api_key="none", max_retries=0)
    stops = ["epsilon", " gamma"]
    message = await client.messages.create(model="echo", max_tokens=16, messages=ASK, stop_sequences=stops)
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == " gamma"  # the earliest in the text, not the first listed
    assert "".join(b.text for b in message.content if b.type == "text") == "alpha beta"

    async with client.messages.stream(model="echo", max_tokens=16, messages=ASK, stop_sequences=stops) as stream:
        deltas = [event for event in [e async for e in stream] if event.type == "message_delta"]
        final = await stream.get_final_message()
    assert [(d.delta.stop_reason, d.delta.stop_sequence) for d in deltas] == [("stop_sequence", " gamma")]
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == " gamma"

    plain = await client.messages.create(model="echo", max_tokens=16, messages=ASK, stop_sequences=["zeta"])
    assert (plain.stop_reason, plain.stop_sequence) == ("end_turn", None)
    cut = await client.messages.create(model="echo", max_tokens=2, messages=ASK, stop_sequences=["zeta"])
    assert (cut.stop_reason, cut.stop_sequence) == ("max_tokens", None)
