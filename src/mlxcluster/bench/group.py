"""``mlxcluster bench group``: a worker group of 3 against one worker, same model, same prompts, same run.

Both run as real processes behind one controller on loopback. Reported: generated tokens/s and TTFT
for each, and every process's peak RSS, which shows what a group is for: each rank holds about a third
of the sharded weights (the embeddings, which mlx-lm does not shard, are on every rank). On a machine
with few cores a group is slower than one worker: its ranks share the cores and meet at two
collectives per layer. The point is capacity, not speed.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from mlxcluster.bench.engine import cluster_blas_env
from mlxcluster.bench.nats import bench_config
from mlxcluster.bench.procs import BenchCluster
from mlxcluster.bench.versus import WARM_UP_PROMPT, VersusRow, fresh_prompts, stream_round
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.tables import table

GROUP_SIZE = 3


class MemoryRow(msgspec.Struct):
    setup: str
    process: str
    peak_rss_mb: float


class GroupBenchResult(msgspec.Struct):
    model: str
    weights_mb: float
    group_size: int
    sharded_mb: float
    """Weights tensor parallelism splits (the attention and MLP projections); the rest is on every rank."""
    rows: list[VersusRow]
    memory: list[MemoryRow]


def sharded_weights_mb(model_path: str) -> float:
    """Megabytes of the projection weights (``*_proj.*``), which a tensor-parallel group splits, from the
    safetensors headers (nothing is loaded)."""
    import json
    import struct

    total = 0
    for file in Path(model_path).glob("*.safetensors"):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__" and "_proj." in name:
                start, end = info["data_offsets"]
                total += end - start
    return round(total / 1024**2, 1)


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set (``VmHWM`` on Linux; the current RSS elsewhere)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 1024**2, 1)


async def run_group_bench(model_path: str, *, streams: tuple[int, ...], max_tokens: int) -> GroupBenchResult:
    """One worker, then a group of :data:`GROUP_SIZE`, each behind its own controller on a fresh NATS."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    name = Path(model_path).name
    rows: list[VersusRow] = []
    memory: list[MemoryRow] = []
    threads = {"OPENBLAS_NUM_THREADS": "1"}
    setups: list[tuple[str, dict[str, dict[str, str]]]] = [
        ("1 worker", {"solo": {}}),
        (
            f"group of {GROUP_SIZE}",
            {
                f"bench-g-r{rank}": {
                    "MLXCLUSTER_WORKER_GROUP_NAME": "bench-g",
                    "MLXCLUSTER_WORKER_GROUP_SIZE": str(GROUP_SIZE),
                    "MLXCLUSTER_WORKER_GROUP_RANK": str(rank),
                    "MLXCLUSTER_WORKER_GROUP_STALL_TIMEOUT_S": "120",
                }
                for rank in range(GROUP_SIZE)
            },
        ),
    ]
    for setup, workers in setups:
        server = EmbeddedNatsServer(bench_config().nats)
        await server.start()
        cluster = BenchCluster(
            nats_url=server.url,
            env={
                "MLXCLUSTER_WORKER_MODEL": model_path,
                "MLXCLUSTER_WORKER_MAX_CONCURRENT": str(max(streams)),
                "MLXCLUSTER_CONTROLLER_FIRST_TOKEN_TIMEOUT_S": "300",
            },
        )
        try:
            cluster.start_controller()
            for worker_id, extra in workers.items():
                cluster.start_worker(worker_id, {**cluster_blas_env(), **threads, **extra})
            await cluster.wait_for_workers(1, timeout=600)
            await stream_round(cluster.base_url, name, 1, 2, count_tokens, [WARM_UP_PROMPT])
            for n, prompts in zip(streams, fresh_prompts(streams), strict=True):
                row = await stream_round(cluster.base_url, name, n, max_tokens, count_tokens, prompts)
                rows.append(msgspec.structs.replace(row, server=setup))
            for worker_id, process in zip(cluster.names[1:], cluster.processes[1:], strict=True):
                memory.append(MemoryRow(setup, worker_id, peak_rss_mb(process.pid)))
        finally:
            cluster.stop()
            await server.stop()
    weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
    return GroupBenchResult(
        model=name,
        weights_mb=round(weights / 1024**2, 1),
        group_size=GROUP_SIZE,
        sharded_mb=sharded_weights_mb(model_path),
        rows=rows,
        memory=memory,
    )


def format_table(result: GroupBenchResult) -> str:
    speed = [
        [r.server, str(r.streams), str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_s:.2f}", f"{r.ttft_p50_ms:.0f}"]
        for r in result.rows
    ]
    lines = [
        f"{result.model}, weights {result.weights_mb:.0f} MB, greedy, streamed through the controller:",
        table(["setup", "streams", "tokens", "seconds", "tok/s", "TTFT p50 ms"], speed),
        "",
        table(
            ["setup", "process", "peak RSS MB"], [[m.setup, m.process, f"{m.peak_rss_mb:.0f}"] for m in result.memory]
        ),
    ]
    solo = [m.peak_rss_mb for m in result.memory if m.setup == "1 worker"]
    ranks = [m.peak_rss_mb for m in result.memory if m.setup != "1 worker"]
    n = result.group_size
    unsharded = result.weights_mb - result.sharded_mb
    lines.append(
        f"weights per rank: {unsharded:.0f} MB on every rank (embeddings, norms) + {result.sharded_mb:.0f} MB / {n} "
        f"= {unsharded + result.sharded_mb / n:.0f} MB, against {result.weights_mb:.0f} MB for one worker"
    )
    if solo and ranks:
        lines.append(
            f"peak RSS: largest rank / one worker = {max(ranks) / solo[0]:.2f}; every rank saves "
            f"{solo[0] - max(ranks):.0f} MB (the rest of an RSS is the Python process, MLX and the KV cache)"
        )
    by_setup = {(r.server, r.streams): r for r in result.rows}
    for (setup, n), row in by_setup.items():
        base = by_setup.get(("1 worker", n))
        if setup != "1 worker" and base and base.tokens_per_s:
            lines.append(f"{n} stream(s): group / one worker tokens/s = {row.tokens_per_s / base.tokens_per_s:.2f}×")
    return "\n".join(lines)
