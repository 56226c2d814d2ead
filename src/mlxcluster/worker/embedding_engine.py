"""The embedding engine: one embedding model, its inputs batched across requests on a thread of its own.

A request's texts are tokenized on a small thread pool (the model's Hugging Face tokenizer, special tokens
added as sentence-transformers adds them: Qwen3-Embedding's tokenizer appends its end token), checked (empty,
longer than the model's context, token ids outside the vocabulary: an ``invalid_request`` naming ``input``),
and queued input by input. The **batch thread** (``mlx-embedding``: it loads the model and runs every forward,
so nothing of MLX crosses threads) takes what is queued, waits up to ``batch_wait_ms`` for more while the
batch holds fewer than ``batch_tokens`` tokens, sorts it by length and runs it in sub-batches of at most
``batch_tokens`` padded tokens. Inputs of different requests share a forward; the chat generation thread
of another model is never involved. An input whose request was abandoned (its deadline passed, the
controller cancelled it) is skipped, never computed. At most :data:`QUEUE_BATCHES` × ``batch_tokens``
tokens wait: a request that would queue more is refused with a retryable ``overloaded`` (one alone in an
empty queue is always taken, however long). A request racing :meth:`EmbeddingEngine.stop` gets a
retryable ``shutting_down``, never silence.

Decoders (mlx-lm's classes) are padded on the right: causal attention never lets a token see the pads after
it, so each row's states are those of the input alone, and last-token pooling takes the row's last real
token. Their final hidden states are ``model.model(ids)`` (after the last norm, before the LM head) for
mlx-lm's families. Encoders (mlx-embeddings) get an attention mask. Pooling and normalisation follow the
model's sentence-transformers files (:mod:`~mlxcluster.worker.embedding_spec`), in float32.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxcluster.config import WorkerSection
from mlxcluster.errors import NodeError
from mlxcluster.protocol import EmbedRequest, EmbedResult, Error, InferenceRequest
from mlxcluster.worker.embedding_spec import EmbeddingSpec, read_spec
from mlxcluster.worker.engine_base import Engine, EngineFrame, EngineInfo
from mlxcluster.worker.loaded_model import context_window

log = logging.getLogger(__name__)

_WORKER = WorkerSection()
BATCH_TOKENS = _WORKER.embedding_batch_tokens
"""Padded tokens one forward holds at most (an input longer than this runs alone): the config's default."""
BATCH_WAIT_MS = _WORKER.embedding_batch_wait_ms
"""How long the batch thread waits for more inputs once it has some: the config's default."""
QUEUE_BATCHES = 16
"""Tokens waiting for the batch thread at most, in ``batch_tokens`` (past it: ``overloaded``)."""
POOL_JOIN_S = 5.0
"""How long :meth:`EmbeddingEngine.stop` waits for a tokenization under way."""
EXTRA = "mlxcluster[embeddings]"


class EngineStopped(Exception):
    """The engine stopped (or is stopping) before the request's inputs were queued: retry elsewhere."""


class EngineOverloaded(Exception):
    """The batch thread's queue is full: retry elsewhere, or later."""


class EmbeddingRefused(Exception):
    """A request the model cannot embed as asked; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class _Input:
    """One input on its way through the batch thread."""

    tokens: list[int]
    future: asyncio.Future[Any]
    """Where the vector goes; done already (cancelled) when its request was abandoned: then skipped."""
    done: Callable[[Any, BaseException | None], None]
    """Called on the batch thread with the input's float32 vector (a numpy array) or the error."""

    @property
    def abandoned(self) -> bool:
        """Nobody waits for this input any more (read on the batch thread: a plain attribute read)."""
        return self.future.done()


class EmbeddingModel:
    """A loaded embedding model: the forward and pooling of a batch of token lists (on the batch thread)."""

    def __init__(self, model: Any, spec: EmbeddingSpec, pad_id: int) -> None:
        self.model = model
        self.spec = spec
        self.pad_id = pad_id
        backbone = getattr(model, "model", None)
        if not spec.encoder and backbone is None:
            language = getattr(model, "language_model", None)
            backbone = getattr(language, "model", None)
        if not spec.encoder and backbone is None:
            raise NodeError(f"{spec.model_type}: no backbone (model.model) to take the final hidden states from")
        self.backbone: Any = backbone

    def embed(self, batch: list[list[int]]) -> Any:
        """The pooled (and normalised) float32 vectors of ``batch``, one row per token list (a numpy array)."""
        import mlx.core as mx
        import numpy as np

        lengths = [len(tokens) for tokens in batch]
        width = max(lengths)
        ids = mx.array([tokens + [self.pad_id] * (width - len(tokens)) for tokens in batch], dtype=mx.int32)
        real = mx.arange(width)[None, :] < mx.array(lengths)[:, None]
        if self.spec.encoder:
            states = self.model(ids, attention_mask=real.astype(mx.int32)).last_hidden_state
        else:
            states = self.backbone(ids)
        states = states.astype(mx.float32)
        if self.spec.pooling == "lasttoken":
            pooled = states[mx.arange(len(batch)), mx.array(lengths) - 1]
        elif self.spec.pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = real.astype(mx.float32)[..., None]
            pooled = (states * mask).sum(axis=1) / mx.array(lengths, dtype=mx.float32)[:, None]
        if self.spec.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        mx.eval(pooled)
        return np.array(pooled, dtype=np.float32)


def load_embedding_model(path: str, spec: EmbeddingSpec) -> tuple[Any, Any, dict[str, Any]]:
    """Model, Hugging Face tokenizer and config of an embedding model dir (on the batch thread).

    Decoders load through mlx-lm's classes; weights saved from the bare backbone (``embed_tokens...``,
    Hugging Face's Qwen3-Embedding) get the ``model.`` prefix mlx-lm's classes expect. Encoders need
    mlx-embeddings (:data:`EXTRA`)."""
    from transformers import AutoTokenizer

    if spec.encoder:
        try:
            from mlx_embeddings.utils import load as load_encoder
        except ImportError:
            raise NodeError(
                f"{path} is a {spec.model_type} encoder: serving it needs mlx-embeddings (pip install '{EXTRA}')"
            ) from None
        model, _ = load_encoder(path)
    else:
        from mlx_lm.utils import load_model

        model, _ = load_model(Path(path), get_model_classes=_backbone_classes)
    config = json.loads((Path(path) / "config.json").read_text())
    return model, AutoTokenizer.from_pretrained(path), config


def _backbone_classes(config: dict[str, Any]) -> tuple[Any, Any]:
    """mlx-lm's model classes for ``config``, taking weights saved without the ``model.`` prefix too."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)

    class Embedder(model_class):  # type: ignore[misc, valid-type]
        def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
            if weights and not any(key.startswith(("model.", "language_model.")) for key in weights):
                weights = {f"model.{key}": value for key, value in weights.items()}
            base = getattr(super(), "sanitize", None)
            return base(weights) if base is not None else weights

    return Embedder, args_class


class EmbeddingEngine(Engine):
    """Serves one embedding model (see the module docstring).

    :param batch_tokens: padded tokens per forward at most.
    :param batch_wait_ms: the longest wait for more inputs once the batch thread has some.
    """

    def __init__(
        self,
        path: str,
        *,
        served_name: str,
        batch_tokens: int = BATCH_TOKENS,
        batch_wait_ms: float = BATCH_WAIT_MS,
        spec: EmbeddingSpec | None = None,
    ) -> None:
        self.path = path
        self.model_name = served_name
        self.spec = spec or read_spec(path)
        self.batch_tokens = max(1, batch_tokens)
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000
        self.context_window = 0
        self.vocab_size = 0
        self.batches = 0
        """Forwards run since start (a test checks that concurrent requests share them)."""
        self.inputs = 0
        self.max_queued_tokens = QUEUE_BATCHES * self.batch_tokens
        """Tokens waiting for the batch thread at most (see :data:`QUEUE_BATCHES`)."""
        self.queued_tokens = 0
        self.skipped = 0
        """Inputs dropped unrun because their request was abandoned."""
        self._queue: queue.Queue[_Input | None] = queue.Queue()
        self._lock = threading.Lock()
        """Guards ``_state``, ``queued_tokens`` and every put on ``_queue``: nothing is queued once stopping."""
        self._thread: threading.Thread | None = None
        self._model: EmbeddingModel | None = None
        self._tokenizer: Any = None
        self._details: dict[str, str] = {}
        self._state = "new"
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlx-embed-tokenize")

    # --- Engine API -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model on the batch thread and start it; raises if loading fails. Cancelled while the model
        loads, the thread is told to stop once loaded (and :meth:`stop` joins it)."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="mlx-embedding", daemon=True)
        with self._lock:
            self._state = "loading"
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            with self._lock:
                if self._thread.is_alive():  # still loading (cancelled): it exits once loaded
                    self._state = "stopping"
                    self._queue.put(None)
                else:
                    self._state = "stopped"
            raise
        with self._lock:
            if self._state == "loading":
                self._state = "running"
        log.info(
            "embedding engine ready: model=%s pooling=%s normalize=%s dimensions=%d",
            self.model_name,
            self.spec.pooling,
            self.spec.normalize,
            self.spec.dimensions,
        )

    async def stop(self) -> None:
        """Stop the batch thread (after its load, if it still loads) and the tokenizer pool; inputs still queued
        and requests not queued yet fail with ``shutting_down``."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            if self._state in ("loading", "running"):
                self._queue.put(None)
            self._state = "stopping" if self._state != "new" else "stopped"
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, 30.0)
        with contextlib.suppress(TimeoutError):  # a tokenization under way ends on its own
            await asyncio.wait_for(asyncio.to_thread(self._pool.shutdown, wait=True), POOL_JOIN_S)
        with self._lock:
            self._state = "stopped"

    def info(self) -> EngineInfo:
        return EngineInfo(name="mlx-embedding", models=[self.model_name], details=self._details)

    async def generate(self, request: InferenceRequest) -> AsyncGenerator[EngineFrame, None]:
        """An embedding model does not chat: one ``invalid_request`` naming ``model``."""
        yield Error(
            code="invalid_request",
            message=f"'{request.model}' is an embedding model: it does not chat or complete text; use /v1/embeddings",
            param="model",
        )

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """The vectors of every input of ``request``, batched with those of other requests; a forward's error
        (MLX's, e.g. out of memory) is raised. Cancelled, the request's queued inputs are skipped."""
        futures: list[asyncio.Future[Any]] = []
        try:
            inputs = await self._tokenize(request)
            dims = self._dimensions(request.dimensions)
            futures = self._submit(inputs)
            vectors = await asyncio.gather(*futures)
        except EmbeddingRefused as exc:
            return EmbedResult(error=Error(code="invalid_request", message=str(exc), param=exc.param))
        except EngineStopped as exc:
            return EmbedResult(error=Error(code="shutting_down", message=str(exc), retryable=True))
        except EngineOverloaded as exc:
            return EmbedResult(error=Error(code="overloaded", message=str(exc), retryable=True))
        finally:
            for future in futures:  # abandoned (cancelled, or a sibling failed): the batch thread skips them
                future.cancel()
        return EmbedResult(
            vectors=[self._shape(vector, dims) for vector in vectors],
            dimensions=dims,
            prompt_tokens=sum(len(tokens) for tokens in inputs),
        )

    # --- requests -------------------------------------------------------------------------------

    async def _tokenize(self, request: EmbedRequest) -> list[list[int]]:
        """:meth:`_prepare` on the tokenizer pool. :raises EngineStopped: the engine stops meanwhile."""
        with self._lock:
            if self._state != "running":
                raise EngineStopped(f"embedding engine is {self._state}")
            try:
                prepared = self._pool.submit(self._prepare, request)
            except RuntimeError:  # the pool is shut down
                raise EngineStopped("embedding engine is stopping") from None
        try:
            return await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if prepared.cancelled() and (task is None or not task.cancelling()):
                raise EngineStopped("embedding engine stopped before the input was tokenized") from None
            raise

    def _prepare(self, request: EmbedRequest) -> list[list[int]]:
        """The token lists of a request's inputs (on the tokenizer pool); refuses what cannot be embedded."""
        prefix = ""
        prompt_name = request.prompt_name
        if prompt_name is None and request.tokens is None:
            prompt_name = self.spec.default_prompt  # sentence-transformers' default_prompt_name
        if prompt_name is not None:
            if prompt_name not in self.spec.prompts:
                known = ", ".join(sorted(self.spec.prompts)) or "none"
                raise EmbeddingRefused(
                    f"prompt_name: '{request.model}' has no prompt '{prompt_name}' (its prompts: {known})",
                    "prompt_name",
                )
            if request.tokens is not None:
                raise EmbeddingRefused("prompt_name: applies to text input, not token ids", "prompt_name")
            prefix = self.spec.prompts[prompt_name]
        if request.tokens is not None:
            inputs = request.tokens
            for index, tokens in enumerate(inputs):
                bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise EmbeddingRefused(
                        f"input[{index}]: token id {bad} is outside the model's vocabulary (0..{self.vocab_size - 1})",
                        "input",
                    )
        else:
            texts = [prefix + text for text in request.texts or []]
            if self.spec.lower_case:
                texts = [text.lower() for text in texts]
            inputs = (
                [list(ids) for ids in self._tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []
            )
        if not inputs:
            raise EmbeddingRefused("input: no inputs", "input")
        for index, tokens in enumerate(inputs):
            if not tokens:
                raise EmbeddingRefused(f"input[{index}]: empty", "input")
            if self.context_window and len(tokens) > self.context_window:
                raise EmbeddingRefused(
                    f"input[{index}] has {len(tokens)} tokens, more than the model's context of "
                    f"{self.context_window} tokens",
                    "input",
                )
        return inputs

    def _dimensions(self, asked: int | None) -> int:
        full = self.spec.dimensions
        if asked is None:
            return full
        if not 1 <= asked <= full:
            raise EmbeddingRefused(
                f"dimensions: {asked} is out of range; '{self.model_name}' gives 1 to {full}", "dimensions"
            )
        return asked

    def _shape(self, vector: Any, dims: int) -> bytes:
        """Matryoshka: the first ``dims`` values, renormalised when the model normalises; little-endian float32."""
        import numpy as np

        if dims < len(vector):
            vector = vector[:dims]
            if self.spec.normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return bytes(np.ascontiguousarray(vector, dtype="<f4").tobytes())

    def _submit(self, inputs: list[list[int]]) -> list[asyncio.Future[Any]]:
        """Queue a request's inputs together, each with the future of its vector.

        :raises EngineStopped: the engine is not running (nothing is queued then).
        :raises EngineOverloaded: the queue holds tokens and these would take it past :attr:`max_queued_tokens`.
        """
        loop = asyncio.get_running_loop()
        items = [_input(loop, tokens) for tokens in inputs]
        need = sum(len(tokens) for tokens in inputs)
        with self._lock:
            if self._state != "running":
                raise EngineStopped(f"embedding engine is {self._state}")
            if self.queued_tokens and self.queued_tokens + need > self.max_queued_tokens:
                raise EngineOverloaded(
                    f"embedding queue full: {self.queued_tokens} tokens wait; {need} more would pass "
                    f"{self.max_queued_tokens}"
                )
            self.queued_tokens += need
            for item in items:
                self._queue.put(item)
        return [item.future for item in items]

    def _dequeued(self, item: _Input) -> None:
        with self._lock:
            self.queued_tokens -= len(item.tokens)

    # --- the batch thread -----------------------------------------------------------------------

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        import mlx.core as mx

        stream = mx.default_stream(mx.default_device())
        try:
            with mx.stream(stream):
                self._load()
        except BaseException as exc:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # start() was cancelled meanwhile
                ready.set_exception(exc)
            return
        try:
            ready.set_result(None)
        except concurrent.futures.InvalidStateError:  # start() was cancelled meanwhile: stop() joins us
            pass
        else:
            with mx.stream(stream):
                while True:
                    batch = self._collect()
                    if batch is None:
                        break
                    self._forward(batch)
        self._fail_queued()
        self._model = None  # the weights go with the engine's last request, not with the engine object

    def _load(self) -> None:
        import mlx.core as mx

        started = time.perf_counter()
        model, tokenizer, config = load_embedding_model(self.path, self.spec)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._model = EmbeddingModel(model, self.spec, int(pad or 0))
        self._tokenizer = tokenizer
        self.context_window = context_window(config, tokenizer)
        if self.spec.max_seq_length:  # sentence-transformers reads no further than its max_seq_length
            limit = self.spec.max_seq_length
            self.context_window = min(self.context_window, limit) if self.context_window else limit
        self.vocab_size = int(config.get("vocab_size") or len(tokenizer))
        self._details = {
            "kind": "embedding",
            "pooling": self.spec.pooling,
            "normalize": str(self.spec.normalize).lower(),
            "dimensions": str(self.spec.dimensions),
            "backend": "mlx-embeddings" if self.spec.encoder else "mlx-lm",
            "context_window": str(self.context_window),
            "device": "cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu",
            "model_path": self.path,
            "load_seconds": f"{time.perf_counter() - started:.2f}",
        }

    def _collect(self) -> list[_Input] | None:
        """The next batch: what is queued, and what comes within ``batch_wait_s`` while it has room (None: stop)."""
        batch: list[_Input] = []
        tokens = 0
        while not batch:
            first = self._queue.get()
            if first is None:
                return None
            self._dequeued(first)
            if first.abandoned:
                self.skipped += 1
                continue
            batch, tokens = [first], len(first.tokens)
        deadline = time.monotonic() + self.batch_wait_s
        while tokens < self.batch_tokens:
            try:
                wait = deadline - time.monotonic()
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            self._dequeued(item)
            if item.abandoned:
                self.skipped += 1
                continue
            batch.append(item)
            tokens += len(item.tokens)
        return batch

    def _forward(self, batch: list[_Input]) -> None:
        """Run ``batch`` in sub-batches of at most ``batch_tokens`` padded tokens, shortest first."""
        assert self._model is not None
        batch.sort(key=lambda item: len(item.tokens))
        start = 0
        while start < len(batch):
            end = start + 1
            while end < len(batch) and len(batch[end].tokens) * (end + 1 - start) <= self.batch_tokens:
                end += 1
            part = [item for item in batch[start:end] if not item.abandoned]  # given up during earlier forwards
            self.skipped += end - start - len(part)
            start = end
            if not part:
                continue
            self.batches += 1
            self.inputs += len(part)
            try:
                vectors = self._model.embed([item.tokens for item in part])
            except Exception as exc:
                log.exception("embedding forward failed")
                for item in part:
                    item.done(None, exc)
            else:
                for item, vector in zip(part, vectors, strict=True):
                    item.done(vector, None)

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._dequeued(item)
                item.done(None, EngineStopped("embedding engine stopped"))


def _input(loop: asyncio.AbstractEventLoop, tokens: list[int]) -> _Input:
    """An input and its future, settled from the batch thread through ``loop``."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(vector: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(vector)

    def done(vector: Any, error: BaseException | None) -> None:  # on the batch thread
        with contextlib.suppress(RuntimeError):  # the event loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, vector, error)

    return _Input(tokens, future, done)
