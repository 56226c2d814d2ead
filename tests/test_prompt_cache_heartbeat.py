"""A worker's heartbeat carries its engine's prompt-cache stats (what ``bench multiturn`` and the
controller read), on the real nats-server with the mlx engine on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_harness import start_worker, wait_until
from tiny_model import build_tiny_model

from mlxcluster.bus import Bus
from mlxcluster.config import Config
from mlxcluster.protocol import ChatMessage, Done, InferenceRequest, SamplingParams, WorkerHeartbeat
from mlxcluster.worker.engine import MlxEngine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


async def test_heartbeat_reports_prompt_cache_stats(cluster_config: Config, bus: Bus, tiny_model: Path) -> None:
    heartbeats: list[WorkerHeartbeat] = []

    async def seen(beat: WorkerHeartbeat, _msg: object) -> None:
        heartbeats.append(beat)

    await bus.subscribe(bus.subjects.heartbeat, WorkerHeartbeat, seen)
    engine = MlxEngine(str(tiny_model), max_concurrent=2, prompt_cache_bytes=64 << 20)
    await engine.start()
    running = await start_worker(cluster_config, "w-cache", engine=engine)  # type: ignore[arg-type]
    try:
        request = InferenceRequest(
            request_id="r1",
            model="tiny",
            messages=[ChatMessage(role="user", content="hello there " * 10)],
            sampling=SamplingParams(temperature=0.0),
            max_tokens=4,
        )
        frames = [frame async for frame in engine.generate(request)]
        assert isinstance(frames[-1], Done)

        def stored() -> list[WorkerHeartbeat]:
            return [
                h
                for h in heartbeats
                if h.worker_id == "w-cache" and h.prompt_cache is not None and h.prompt_cache.entries == 1
            ]

        beat = (await wait_until(stored, timeout=30))[-1]
        assert beat.prompt_cache is not None
        assert beat.prompt_cache.limit_bytes == 64 << 20
        assert 0 < beat.prompt_cache.bytes <= 64 << 20
        assert beat.prompt_cache.misses == 1 and beat.prompt_cache.prompt_tokens == frames[-1].usage.prompt_tokens
    finally:
        await running.stop()
        await engine.stop()
