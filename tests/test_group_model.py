"""A worker group of 3 serving the real demo model on loopback: same answers as one worker, kill -9, re-form.

Real processes (nats-server, a controller, mlx workers) from the fault harness. One test walks the whole
life of a group, because every group start loads three shards on two shared cores: answers equal one
worker's token for token (greedy) and the prompt cache is reused on every rank; a member killed with
SIGKILL under load ends the in-flight requests with explicit errors, takes the group out of service
within the offline timeout and is named in the deregistration; the survivors stay up (same pids) and
the group comes back when the member is restarted; a member stopped with SIGSTOP does the same, and
rejoins when resumed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
from cluster_harness import wait_until
from fault_harness import NatsNode, Processes
from loopback import free_port

from mlxcluster.bus import Bus
from mlxcluster.config import from_dict
from mlxcluster.protocol import Deregister

pytestmark = [pytest.mark.model, pytest.mark.timeout(1200)]

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["Name three colors.", "What is 2 + 2?"]
MAX_TOKENS = 6
OFFLINE_TIMEOUT_S = 10.0
MEMBERS = ["grp-r0", "grp-r1", "grp-r2"]
START_S = 300.0  # three shards loading on two busy cores


def mlx_env(**extra: str) -> dict[str, str]:
    return {
        "MLXCLUSTER_WORKER_ENGINE": "mlx",
        "MLXCLUSTER_DISCOVERY_HEARTBEAT_INTERVAL_MS": "1000",
        "MLXCLUSTER_DISCOVERY_OFFLINE_TIMEOUT_MS": str(int(OFFLINE_TIMEOUT_S * 1000)),
        "OPENBLAS_NUM_THREADS": "1",
        **extra,
    }


def member_env(rank: int) -> dict[str, str]:
    return mlx_env(
        MLXCLUSTER_WORKER_GROUP_NAME="grp",
        MLXCLUSTER_WORKER_GROUP_SIZE="3",
        MLXCLUSTER_WORKER_GROUP_RANK=str(rank),
        # a model step can take seconds on this loaded machine; a dead member is seen by its silent hellos
        MLXCLUSTER_WORKER_GROUP_STALL_TIMEOUT_S="20",
    )


async def ask(client: openai.AsyncOpenAI, prompt: str, **options: Any) -> tuple[str, int]:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=options.pop("max_tokens", MAX_TOKENS),
        temperature=0,
        **options,
    )
    details = reply.usage.prompt_tokens_details if reply.usage else None
    return reply.choices[0].message.content or "", (details.cached_tokens or 0) if details else 0


async def stream(client: openai.AsyncOpenAI, prompt: str, first: asyncio.Event) -> tuple[str, int]:
    """``("ok"|"error", tokens)``: how a streamed request ended."""
    tokens = 0
    try:
        response = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0, stream=True
        )
        async with response:
            async for chunk in response:
                if any(c.delta.content for c in chunk.choices):
                    tokens += 1
                    first.set()
    except openai.APIError as exc:
        return f"error: {exc}", tokens
    return "ok", tokens


async def test_group_of_three_serves_like_one_worker_and_survives_a_killed_member(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        nats = await procs.nats(NatsNode("n1", free_port()))
        controller = procs.controller(
            [nats.url],
            MLXCLUSTER_CONTROLLER_FIRST_TOKEN_TIMEOUT_S="120",
            MLXCLUSTER_CONTROLLER_MAX_ATTEMPTS="1",
            **{k: v for k, v in mlx_env().items() if k.startswith("MLXCLUSTER_DISCOVERY")},
        )
        client = openai.AsyncOpenAI(base_url=f"{controller.url}/v1", api_key="x", max_retries=0, timeout=240)

        # one worker's answers
        solo = procs.worker("solo", [nats.url], **mlx_env())
        await controller.wait_status(["solo"], "online", START_S, watch=[solo])
        expected = [(await ask(client, p))[0] for p in PROMPTS]
        fresh = [(await ask(client, f"{p} "))[0] for p in PROMPTS]  # the group sees these only in one batch
        stopped = (await ask(client, PROMPTS[0], stop=["\n"], max_tokens=12))[0]  # a stop string ends it early
        solo.signal(signal.SIGTERM)
        assert await solo.wait_exit(60) is not None
        await wait_until(lambda: _gone(controller, "solo"), 30, "solo gone")

        # the group's: the same, token for token; a repeated prompt reuses the cache on every rank
        members = [procs.worker(m, [nats.url], **member_env(i)) for i, m in enumerate(MEMBERS)]
        await controller.wait_status(["grp"], "online", START_S, watch=members)
        view = await controller.worker("grp")
        assert view is not None and view["group"]["size"] == 3 and view["group"]["parallel"] == "tensor"
        assert [(m["rank"], m["member_id"]) for m in view["group"]["members"]] == list(enumerate(MEMBERS))
        assert [(await ask(client, p))[0] for p in PROMPTS] == expected
        again, cached = await ask(client, PROMPTS[0])
        assert again == expected[0] and cached > 0
        both = await asyncio.gather(*(ask(client, f"{p} ") for p in PROMPTS))  # one batch, fresh prompts
        assert [text for text, _ in both] == fresh
        assert (await ask(client, PROMPTS[0], stop=["\n"], max_tokens=12))[0] == stopped
        # a stream closed after its first token is cancelled; the ranks stay in step
        first_token = asyncio.Event()
        cancelled = asyncio.create_task(stream(client, "Tell me a long story.", first_token))
        await asyncio.wait_for(first_token.wait(), 240)
        cancelled.cancel()
        assert (await ask(client, PROMPTS[1]))[0] == expected[1]

        # idle, the followers doze off the ring (waiting inside a collective, each burned ~0.9 of a core)
        await asyncio.sleep(1.5)
        shares = await cpu_shares([m.pid for m in members[1:]], 3.0)
        assert all(share < 0.25 for share in shares), shares

        # kill -9 a non-zero rank under load
        bus = await Bus.connect(from_dict({"nats": {"url": nats.url}}).nats, name="watch", attempts=5)
        reasons: list[str] = []
        await bus.subscribe(bus.subjects.deregister, Deregister, lambda m, _msg: _append(reasons, m))
        first = asyncio.Event()
        load = [asyncio.create_task(stream(client, f"Count to {n}.", first)) for n in (5, 6)]
        await asyncio.wait_for(first.wait(), 240)
        survivors = {m.name: m.pid for m in members[:2]}
        members[2].signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await wait_until(lambda: _gone(controller, "grp"), OFFLINE_TIMEOUT_S, "the group out of service")
        offline_after = time.monotonic() - killed_at
        outcomes = await asyncio.wait_for(asyncio.gather(*load), 120)  # no hang
        assert any(kind.startswith("error") and tokens > 0 for kind, tokens in outcomes), outcomes
        assert all(kind == "ok" or "group_member_lost" in kind or "lost a member" in kind for kind, _ in outcomes)
        await wait_until(lambda: reasons, 10, "the deregistration")
        assert "grp-r2" in reasons[0] and "broken" in reasons[0], reasons
        print(f"group offline {offline_after:.1f} s after kill -9; reason: {reasons[0]}")

        # the survivors stay up (re-executed in place); the group re-forms when the member is back
        assert all(m.alive for m in members[:2]) and {m.name: m.pid for m in members[:2]} == survivors
        members[2] = procs.worker(MEMBERS[2], [nats.url], **member_env(2))
        await controller.wait_status(["grp"], "online", START_S, watch=members)
        assert (await ask(client, PROMPTS[1]))[0] == expected[1]

        # a member that stalls (SIGSTOP) takes the group out of service too; resumed, it rejoins
        reasons.clear()
        members[1].signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await wait_until(lambda: _gone(controller, "grp"), OFFLINE_TIMEOUT_S, "the group out of service (stall)")
        print(f"group offline {time.monotonic() - stopped_at:.1f} s after SIGSTOP of rank 1")
        await wait_until(lambda: reasons, 10, "the deregistration")
        assert "grp-r1" in reasons[0], reasons
        members[1].signal(signal.SIGCONT)
        await controller.wait_status(["grp"], "online", START_S, watch=members)
        assert (await ask(client, PROMPTS[0]))[0] == expected[0]
        await bus.close()
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()


async def cpu_shares(pids: list[int], seconds: float) -> list[float]:
    """Each process's CPU (all threads) over ``seconds``, in cores."""
    processes = [psutil.Process(pid) for pid in pids]
    before = [sum(p.cpu_times()[:2]) for p in processes]
    await asyncio.sleep(seconds)
    return [round((sum(p.cpu_times()[:2]) - b) / seconds, 3) for p, b in zip(processes, before, strict=True)]


async def _gone(controller, worker_id: str) -> bool:  # type: ignore[no-untyped-def]
    return worker_id not in await controller.workers()


async def _append(items: list[str], message: Deregister) -> None:
    if message.worker_id == "grp":
        items.append(message.reason)
