"""``bench embeddings``: ``/v1/embeddings`` through a cluster against the same model in-process, batched.

The cluster is nats-server, a controller and one worker, each its own process (as dual mode runs them), serving
the embedding model dir given; ``c`` clients (1, 8, 32) each send one-input requests back to back
(``encoding_format: base64``, as the openai client does). In-process, the same model runs in this process
through the worker's own forward and pooling (:class:`~mlxcluster.worker.embedding_engine.EmbeddingModel`) on
batches of ``c`` inputs: what the model gives with no bus, no HTTP and perfect batching. Both embed the same
inputs; tokens are counted by the model's tokenizer (the cluster's ``usage``). The issue's target: at 32
concurrent requests, the cluster's tokens/s ≥ 0.9× the in-process rate.

Also the size of the zipapp (an ``mlxcluster.pyz`` given or found in the working dir) and the installed size of
the packages the ``embeddings`` extra adds to the base install (the zipapp bundles the base only).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import msgspec

from mlxcluster.tables import table

FIXTURE = "tiny-embed"
"""The tiny embedding fixture's dir name under ``--families-dir`` (``python tests/embedding_model.py DIR``)."""
EXTRA_ROOTS = ("mlx-embeddings",)
"""The ``embeddings`` extra's requirements (pyproject.toml)."""
CONCURRENCIES = (1, 8, 32)
QUICK_CONCURRENCIES = (1, 8)
WORDS = (
    "cluster worker model token batch vector search query document passage answer retrieval index memory "
    "network message stream latency throughput controller request response embedding cosine similarity"
).split()


class EmbeddingsRow(msgspec.Struct):
    """One target at one concurrency."""

    target: str
    concurrency: int
    inputs: int
    tokens: int
    seconds: float
    inputs_per_s: float
    tokens_per_s: float


class PackageSize(msgspec.Struct):
    name: str
    version: str
    installed_bytes: int


class EmbeddingsResult(msgspec.Struct):
    model: str
    quick: bool
    tokens_per_input: float
    rows: list[EmbeddingsRow]
    pyz_bytes: int | None = None
    extra_packages: list[PackageSize] = msgspec.field(default_factory=list)

    def ratio(self, concurrency: int) -> float | None:
        """Cluster tokens/s over in-process tokens/s at ``concurrency`` (None: not measured)."""
        rates = {r.target: r.tokens_per_s for r in self.rows if r.concurrency == concurrency}
        cluster, local = rates.get("cluster"), rates.get("in-process")
        return cluster / local if cluster and local else None

    def to_json(self) -> str:
        return msgspec.json.format(msgspec.json.encode(self), indent=2).decode()


def corpus(count: int, words: int) -> list[str]:
    """``count`` distinct deterministic texts of ``words`` words."""
    return [
        f"passage {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) for i in range(count)
    ]


def in_process(model_path: str, texts: list[str], concurrencies: tuple[int, ...]) -> list[EmbeddingsRow]:
    """The model in this process, the worker's forward and pooling, on batches of ``c`` inputs."""
    import mlx.core as mx

    from mlxcluster.worker.embedding_engine import EmbeddingModel, load_embedding_model
    from mlxcluster.worker.embedding_spec import read_spec

    spec = read_spec(model_path)
    model, tokenizer, _ = load_embedding_model(model_path, spec)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    embedder = EmbeddingModel(model, spec, int(pad or 0))
    tokens = [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    rows = []
    with mx.stream(mx.default_stream(mx.default_device())):
        embedder.embed(tokens[:2])  # warm up
        for concurrency in concurrencies:
            started = time.perf_counter()
            for start in range(0, len(tokens), concurrency):
                embedder.embed(tokens[start : start + concurrency])
            rows.append(_row("in-process", concurrency, len(tokens), sum(map(len, tokens)), started))
    return rows


async def through_cluster(base_url: str, model: str, texts: list[str], concurrency: int) -> EmbeddingsRow:
    """``concurrency`` clients sending one-input requests until every text is embedded."""
    import aiohttp

    tokens = 0

    async def client(session: aiohttp.ClientSession, pending: list[str]) -> None:
        nonlocal tokens
        while pending:
            body = {"model": model, "input": pending.pop(), "encoding_format": "base64"}
            async with session.post(f"{base_url}/v1/embeddings", json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"/v1/embeddings answered {response.status}: {answer}")
                tokens += answer["usage"]["prompt_tokens"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session, texts[:1]) for _ in range(concurrency)))  # warm up, untimed
        tokens = 0
        pending = list(reversed(texts))
        started = time.perf_counter()
        await asyncio.gather(*(client(session, pending) for _ in range(concurrency)))
    return _row("cluster", concurrency, len(texts), tokens, started)


def _row(target: str, concurrency: int, inputs: int, tokens: int, started: float) -> EmbeddingsRow:
    seconds = time.perf_counter() - started
    return EmbeddingsRow(
        target=target,
        concurrency=concurrency,
        inputs=inputs,
        tokens=tokens,
        seconds=round(seconds, 3),
        inputs_per_s=round(inputs / seconds, 1),
        tokens_per_s=round(tokens / seconds, 1),
    )


ClusterFactory = Callable[[str], AbstractAsyncContextManager[str]]
"""Starts a cluster serving a model dir; yields its base URL."""


def process_cluster(model_path: str) -> AbstractAsyncContextManager[str]:
    """nats-server, a controller and one worker on ``model_path``, each its own process."""
    import contextlib

    from mlxcluster.bench.versus import mlxcluster_server

    @contextlib.asynccontextmanager
    async def started() -> AsyncIterator[str]:
        async with mlxcluster_server(model_path, workers=1, env={"MLXCLUSTER_WORKER_MAX_CONCURRENT": "32"}) as cluster:
            yield cluster.base_url

    return started()


async def run_embeddings(
    model_path: str,
    *,
    quick: bool = False,
    inputs: int | None = None,
    words: int | None = None,
    concurrencies: tuple[int, ...] | None = None,
    pyz: Path | None = None,
    cluster: ClusterFactory = process_cluster,
) -> EmbeddingsResult:
    """Measure both targets on the same texts (see the module docstring)."""
    concurrencies = concurrencies or (QUICK_CONCURRENCIES if quick else CONCURRENCIES)
    texts = corpus(inputs or (32 if quick else 512), words or (12 if quick else 96))
    name = Path(model_path).name
    # on this thread, before the cluster starts (nothing else runs yet): an executor thread's MLX state has
    # once aborted the process at exit ("terminate called without an active exception")
    local = in_process(model_path, texts, concurrencies)
    rows: list[EmbeddingsRow] = []
    async with cluster(model_path) as base_url:
        for concurrency in concurrencies:
            rows.append(await through_cluster(base_url, name, texts, concurrency))
    rows += local
    tokens = sum(r.tokens for r in local[:1]) / len(texts) if local else 0.0
    found = pyz if pyz is not None else Path("mlxcluster.pyz")
    return EmbeddingsResult(
        model=name,
        quick=quick,
        tokens_per_input=round(tokens, 1),
        rows=sorted(rows, key=lambda r: (r.concurrency, r.target)),
        pyz_bytes=found.stat().st_size if found.is_file() else None,
        extra_packages=extra_packages(),
    )


def extra_packages(roots: tuple[str, ...] = EXTRA_ROOTS) -> list[PackageSize]:
    """The installed packages that ``roots`` (an extra's requirements) bring beyond mlxcluster's base requirements
    (what a zipapp with the extra would bundle more), with their installed bytes; those not installed are left out."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def closure(names: tuple[str, ...]) -> set[str]:
        seen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop().lower().replace("_", "-")
            if name in seen:
                continue
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            seen.add(name)
            for line in requires:
                requirement = Requirement(line)
                if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                    todo.append(requirement.name)
        return seen

    sizes = []
    for name in sorted(closure(roots) - closure(("mlxcluster",))):
        dist = metadata.distribution(name)
        total = sum((f.size or 0) for f in dist.files or [])
        sizes.append(PackageSize(name=name, version=dist.version, installed_bytes=total))
    return sizes


def format_embeddings(result: EmbeddingsResult) -> str:
    """The rows, the ratio at each concurrency (target ≥ 0.9× at 32), the sizes."""
    body = [
        [
            r.target,
            str(r.concurrency),
            str(r.inputs),
            str(r.tokens),
            f"{r.seconds:.2f}",
            f"{r.inputs_per_s:.1f}",
            f"{r.tokens_per_s:.0f}",
        ]
        for r in result.rows
    ]
    lines = [
        f"model {result.model}: {result.tokens_per_input:.0f} tokens per input"
        + (" (quick: small and short, not for comparison)" if result.quick else ""),
        table(["target", "concurrency", "inputs", "tokens", "seconds", "inputs/s", "tokens/s"], body, align="llrrrrr"),
    ]
    for concurrency in sorted({r.concurrency for r in result.rows}):
        ratio = result.ratio(concurrency)
        if ratio is not None:
            target = " (target ≥ 0.9×)" if concurrency == 32 else ""
            lines.append(f"{concurrency} concurrent: cluster / in-process tokens/s = {ratio:.2f}×{target}")
    if result.pyz_bytes is not None:
        lines.append(f"zipapp (base, no extras): {result.pyz_bytes / 1e6:.1f} MB")
    if result.extra_packages:
        total = sum(p.installed_bytes for p in result.extra_packages)
        names = ", ".join(f"{p.name} {p.installed_bytes / 1e6:.1f} MB" for p in result.extra_packages)
        lines.append(f"the embeddings extra adds {total / 1e6:.1f} MB installed: {names}")
    return "\n".join(lines)
