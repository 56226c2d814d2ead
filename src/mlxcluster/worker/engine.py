"""The ``mlx`` engine: mlx-lm's continuous batching behind the :class:`Engine` interface.

Three stages, as vLLM splits its engine: a request is **prepared** on a small thread pool
(:mod:`~mlxcluster.worker.preparation`: checks, chat template, tokens, grammar, digests), then the
**generation thread** (:mod:`~mlxcluster.worker.generation_loop`) inserts it into mlx-lm's
``BatchGenerator`` and steps the batch, and each request's **output** (:mod:`~mlxcluster.worker.job_output`)
turns its tokens into frames, handed to asyncio with ``loop.call_soon_threadsafe``. One thread owns
everything MLX: it loads the model (:mod:`~mlxcluster.worker.loaded_model`) and runs the loop.

Prompt cache: before a request is inserted, the KV cache of the longest prefix an earlier prompt shares
with it is fetched from :class:`~mlxcluster.worker.prompt_cache.PromptCache` and handed to the batch with
the tokens it covers, so only the rest is prefilled. Per-request sampling: greedy requests share mlx-lm's
greedy sampler (one batched argmax); any other request gets a
:class:`~mlxcluster.worker.sampling.KeyedSampler` with its own PRNG key, so a seed fixes its draws even
inside a batch. Stop strings are matched on decoded text and never leak.

Memory: with a worker's :class:`~mlxcluster.worker.memory_budget.MemoryBudget`, a prepared request first
reserves the KV bytes it may grow to (:class:`~mlxcluster.worker.kv_size.KvSize`, prompt plus ``max_tokens``)
and waits its turn when they are taken (``Progress`` frames keep the controller's silence timer quiet); one
that could never fit ends with ``exceeds_memory_budget``. The budget shrinks the prompt cache through
:meth:`MlxEngine.shrink_prompt_cache`, which the generation thread applies before it admits anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, cast

from mlxcluster.protocol import Error, InferenceRequest, Progress, PromptCacheStats, SpeculationCounts, Token
from mlxcluster.worker.engine_base import CacheListener, Engine, EngineFrame, EngineInfo
from mlxcluster.worker.generation_loop import GenerationLoop
from mlxcluster.worker.job import Job
from mlxcluster.worker.kv_size import CONFIG_DTYPE_BYTES, KvSize, kv_size_of
from mlxcluster.worker.loaded_model import LoadedModel, describe
from mlxcluster.worker.memory_budget import MemoryBudget, NeverFits, Reservation
from mlxcluster.worker.preparation import PreparedRequest, Rejected, RequestPreparer
from mlxcluster.worker.prompt_cache import PromptCache, default_cache_bytes
from mlxcluster.worker.speculation import DEFAULT_DRAFT_TOKENS, SpeculationStats
from mlxcluster.worker.step_budget import DEFAULT_STEP_BUDGET_MS, StepBudget, StepCosts

log = logging.getLogger(__name__)

POLL_S = 0.5
"""Longest wait of a stream for its next frame before it checks its deadline and the thread."""
PREPARE_THREADS = 2


def default_served_name(model: str) -> str:
    """The name a model is served under: a local dir's basename, or the Hugging Face repo id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


class _Arrival:
    """One request between its arrival and its submission to the generation thread (counted in
    ``MlxEngine.on_the_way``, which an idle batch waits for); ended once, submitted or not."""

    __slots__ = ("engine", "ended")

    def __init__(self, engine: MlxEngine) -> None:
        self.engine = engine
        self.ended = False
        engine.on_the_way += 1

    def end(self, *, submitted: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        self.engine.on_the_way -= 1
        loop = self.engine._loop
        if not submitted and loop is not None:
            loop.wake()  # a batch waiting for it does not wait out its deadline


class MlxEngine(Engine):
    """mlx-lm engine with continuous batching of up to ``max_concurrent`` requests.

    :param model: an mlx-lm model dir or a Hugging Face repo id.
    :param max_concurrent: requests decoded together; more are held in arrival order.
    :param prefill_step_size: prompt tokens processed per model call; a smaller step lets running
        requests keep decoding between chunks of a long prompt.
    :param step_budget_ms: while streams decode, the wall time one step of the batch should take: each
        step's prefill chunk is sized from measured costs to fit (:mod:`~mlxcluster.worker.step_budget`);
        with no stream decoding a prompt prefills ``prefill_step_size`` tokens a step; 0: always
        ``prefill_step_size``.
    :param step_costs: fixed step costs for the budget instead of measured ones (tests).
    :param speculative_tokens: the most prompt-lookup draft tokens per greedy request and step
        (:mod:`~mlxcluster.worker.speculative_batch`); 0: no speculative decoding.
    :param draft_model: the dir of a draft model with the same tokenizer (``worker.draft_model``), loaded
        with the model and drafting beside prompt lookup (:mod:`~mlxcluster.worker.draft_model`); unused when
        ``speculative_tokens`` is 0 or the model's caches cannot drop positions per row (then it is not loaded).
    :param prefill_batch_size: prompts prefilled together (default ``min(max_concurrent, 8)``).
    :param served_name: the served model name (default :func:`default_served_name` of ``model``);
        ``name`` is an alias.
    :param prompt_cache_bytes: bound of the prompt cache; ``None``: :func:`default_cache_bytes` of the
        machine's memory; 0: no prompt cache.
    :param thinking_budgets: reasoning tokens per effort (``low``, ``medium``, ``high``) when a request
        gives no budget.
    :param on_fatal: called (from the generation thread) with the reason if that thread dies while
        serving: the engine can no longer serve and its worker should leave and restart.
    :param held_progress_s: the longest silence towards the controller while a request's output is held back
        (a tool call parsed whole): a ``Progress(generated=n)`` frame then goes out; also the interval of the
        ``Progress`` frames of a request waiting for memory.
    :param memory_budget: the worker's memory budget, which admits requests by their projected KV bytes
        (``None``: no admission by memory); the engine does not add itself to it (its model host does, with
        :attr:`weights_bytes`, :attr:`prompt_cache_nbytes` and :meth:`shrink_prompt_cache`).

    ``tokens_total`` counts the tokens generated since start.
    """

    def __init__(
        self,
        model: str,
        *,
        max_concurrent: int = 8,
        prefill_step_size: int = 256,
        step_budget_ms: float = DEFAULT_STEP_BUDGET_MS,
        step_costs: StepCosts | None = None,
        speculative_tokens: int = DEFAULT_DRAFT_TOKENS,
        draft_model: str | None = None,
        prefill_batch_size: int | None = None,
        served_name: str | None = None,
        name: str | None = None,
        stop_timeout_s: float = 30.0,
        prompt_cache_bytes: int | None = None,
        thinking_budgets: dict[str, int] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        held_progress_s: float = 1.0,
        memory_budget: MemoryBudget | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.model = model
        self.model_name = served_name or name or default_served_name(model)
        self.max_concurrent = max_concurrent
        self.prefill_step_size = prefill_step_size
        self.step_budget_ms = step_budget_ms
        self.step_costs = step_costs
        self.speculative_tokens = speculative_tokens
        self.draft_model = draft_model or None
        self._draft: Any = None
        """The loaded draft model (None: none, or it cannot draft for this model)."""
        self.prefill_batch_size = prefill_batch_size or min(max_concurrent, 8)
        self.speculation = SpeculationStats()
        """Speculative decoding counters, across the batches this engine builds."""
        self.stop_timeout_s = stop_timeout_s
        if prompt_cache_bytes is None:
            import psutil

            prompt_cache_bytes = default_cache_bytes(psutil.virtual_memory().total)
        self.prompt_cache_bytes = prompt_cache_bytes
        self.thinking_budgets = thinking_budgets
        self.on_fatal = on_fatal
        self.held_progress_s = held_progress_s
        self.memory_budget = memory_budget
        self._kv_size: KvSize | None = None
        self._weights_bytes = 0
        self.failure: str | None = None
        """Why the generation thread died while serving (None: it did not)."""
        self._prompt_cache: PromptCache | None = None
        self._cache_listener: CacheListener | None = None
        self._details: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._state = "new"  # new -> running -> stopping -> stopped
        self._loaded: LoadedModel | None = None
        self._preparer: RequestPreparer | None = None
        self._loop: GenerationLoop | None = None
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="mlx-prepare")
        self.on_the_way = 0
        """Requests received and not yet handed to the generation thread (read there, written on the event loop)."""

    # --- Engine API (asyncio side) -------------------------------------------------------------

    async def start(self) -> None:
        """Load the model on the generation thread and start serving; raises if loading fails."""
        if self._state != "new":
            raise RuntimeError(f"engine already {self._state}")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="mlx-generation", daemon=True)
        self._state = "running"
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            self._state = "stopped"
            raise
        log.info(
            "mlx engine ready: model=%s weights=%s quantization=%s cache=%s blas=%s max_concurrent=%d",
            self.model_name,
            self._details.get("weights_dtype"),
            self._details.get("quantization"),
            self._details.get("cache"),
            self._details.get("blas"),
            self.max_concurrent,
        )

    async def stop(self) -> None:
        """Stop the thread; requests still pending end with ``Error(code="shutting_down", retryable=True)``."""
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        if self._state != "running" or self._thread is None:
            self._state = "stopped"
            return
        self._state = "stopping"
        if self._loop is not None:
            self._loop.stop()
        deadline = time.monotonic() + self.stop_timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._thread.is_alive():
            log.warning("mlx generation thread did not stop within %.0f s", self.stop_timeout_s)
            self._state = "stopped"
            return
        self._state = "stopped"
        self._release_memory()

    def _release_memory(self) -> None:
        """Drop the model, its batch and its prompt cache, and give MLX's buffer cache back: a worker that
        unloads a model gets its memory back for the next one."""
        self._loop = None
        self._loaded = None
        self._preparer = None
        self._prompt_cache = None
        import gc

        import mlx.core as mx

        gc.collect()
        mx.clear_cache()

    def info(self) -> EngineInfo:
        """Name, served model and details (weights dtype, quantization, cache, BLAS, mlx version, device)."""
        return EngineInfo(name="mlx", models=[self.model_name], details=dict(self._details))

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        """Hits, hit tokens, bytes, entries and evictions of the prompt cache (``None``: disabled)."""
        cache = self._prompt_cache
        return cache.stats() if cache is not None else None

    def speculation_stats(self) -> SpeculationCounts | None:
        """Speculative decoding's steps, drafted and accepted tokens (``None``: ``speculative_tokens`` is 0)."""
        if self.speculative_tokens <= 0:
            return None
        return SpeculationCounts(**dataclasses.asdict(self.speculation))  # the same fields, ints only

    def set_cache_listener(self, listener: CacheListener | None) -> None:
        """Be told (on the generation thread) of prefix digests the prompt cache stores and drops."""
        self._cache_listener = listener

    def cache_digests(self) -> list[int]:
        """Every prefix digest the prompt cache holds now."""
        cache = self._prompt_cache
        return cache.digests() if cache is not None else []

    def set_failure_listener(self, listener: Callable[[str], None] | None) -> None:
        """Be told (on the generation thread) why it died, if it dies while serving."""
        self.on_fatal = listener

    @property
    def kv_size(self) -> KvSize:
        """What a request's KV cache costs on this model (known once started)."""
        if self._kv_size is None:
            raise RuntimeError("the engine has not loaded its model yet")
        return self._kv_size

    @property
    def weights_bytes(self) -> int:
        """Bytes of the model's weight files (of its parameters when there are no local files; 0 before start)."""
        return self._weights_bytes

    @property
    def prompt_cache_nbytes(self) -> int:
        """Bytes the prompt cache holds now (any thread)."""
        cache = self._prompt_cache
        return cache.nbytes if cache is not None else 0

    def shrink_prompt_cache(self, target_bytes: int) -> None:
        """Have the generation thread evict prompt-cache entries, least recently used first, down to
        ``target_bytes`` before it admits anything more (any thread; returns at once)."""
        if self._loop is not None and self._prompt_cache is not None:
            self._loop.shrink_cache(target_bytes)

    @property
    def tokens_total(self) -> int:
        return self._loop.tokens_total if self._loop is not None else 0

    @property
    def active_requests(self) -> int:
        """Requests in the batch (prefilling or decoding)."""
        return len(self._loop.active) if self._loop is not None else 0

    @property
    def queued_requests(self) -> int:
        """Requests accepted but waiting for a batch slot."""
        return len(self._loop.waiting) if self._loop is not None else 0

    async def generate(self, request: InferenceRequest) -> AsyncGenerator[EngineFrame, None]:
        """Stream Token frames, then one Done or Error; closing the iterator early cancels the request."""
        submitted = time.perf_counter()
        if self._state != "running" or self._loop is None or self._preparer is None:
            code = "not_started" if self._state == "new" else "shutting_down"
            yield Error(code=code, message=f"mlx engine is {self._state}", retryable=True)
            return
        loop = asyncio.get_running_loop()
        arrival = _Arrival(self)  # on its way: an idle batch waits for it (GenerationLoop.gather_burst)
        try:
            async with contextlib.aclosing(self._admit(request, loop, submitted, arrival)) as frames:
                async for frame in frames:
                    yield frame
        finally:
            arrival.end()

    async def _admit(
        self, request: InferenceRequest, loop: asyncio.AbstractEventLoop, submitted: float, arrival: _Arrival
    ) -> AsyncGenerator[EngineFrame, None]:
        """Prepare the request, reserve its memory, run it."""
        assert self._preparer is not None
        try:
            prepared = await loop.run_in_executor(self._prepare_pool, self._preparer.prepare, request)
        except Rejected as rejected:
            yield Error(code=rejected.code, message=str(rejected), param=rejected.param)
            return
        except RuntimeError:  # the pool shut down: the engine is stopping
            yield Error(code="shutting_down", message="mlx engine is shutting down", retryable=True)
            return
        reservation: Reservation | None = None
        if self.memory_budget is not None:
            admitted: list[Reservation] = []
            async with contextlib.aclosing(self._reserve(self.memory_budget, prepared, admitted)) as waits:
                async for waited in waits:  # closed with this stream, the wait ends at once
                    yield waited
                    if isinstance(waited, Error):
                        return
            reservation = admitted[0]
        try:
            async with contextlib.aclosing(self._run_job(prepared, loop, submitted, arrival)) as frames:
                async for frame in frames:
                    yield frame
        finally:
            if reservation is not None:
                reservation.release()

    async def _reserve(
        self, budget: MemoryBudget, prepared: PreparedRequest, admitted: list[Reservation]
    ) -> AsyncGenerator[Progress | Error, None]:
        """Reserve the request's projected KV bytes (into ``admitted``), with ``Progress`` frames while it
        waits, or end with an Error frame when it can never fit. Without ``max_tokens`` a request gets the
        tokens the budget leaves, as it gets the room its context window leaves."""
        kv = self.kv_size
        most = budget.most_bytes(self.model_name)
        prompt = len(prepared.prompt)
        if prepared.request.max_tokens_auto and kv.projected(prompt + prepared.max_tokens) > most:
            prepared.max_tokens = min(prepared.max_tokens, kv.tokens_within(most) - prompt)
        if prepared.max_tokens < 1:
            prepared.max_tokens = 1  # refused below, naming the prompt's bytes
        task = asyncio.ensure_future(budget.reserve(self.model_name, kv.projected(prompt + prepared.max_tokens)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.held_progress_s)
                if done:
                    break
                yield Progress(processed=0, total=prompt - prepared.continued)
            try:
                admitted.append(task.result())
            except NeverFits as exc:
                yield Error(code="exceeds_memory_budget", message=str(exc), retryable=True, param="max_tokens")
        finally:
            if not task.done():
                task.cancel()
            elif not admitted and not task.cancelled() and task.exception() is None:
                task.result().release()  # granted while the stream was being closed

    async def _run_job(
        self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop, submitted: float, arrival: _Arrival
    ) -> AsyncGenerator[EngineFrame, None]:
        """Hand the prepared request to the generation thread and relay its frames."""
        generation = self._loop
        if self._state != "running" or generation is None:  # stopped while the request waited for memory
            yield Error(code="shutting_down", message=f"mlx engine is {self._state}", retryable=True)
            return
        job = self._job(prepared, loop, submitted)
        generation.submit(job)
        arrival.end(submitted=True)
        finished = False
        try:
            while True:
                frame = await self._next_frame(job)
                if isinstance(frame, Token):
                    frame = self._coalesce(job, frame)
                elif not isinstance(frame, Progress):
                    finished = True
                yield frame
                if finished:
                    return
        finally:
            if not job.finished:  # closed early, or ended here (deadline): take it out of the batch
                job.cancelled = True
                generation.wake()

    def _job(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop, submitted: float) -> Job:
        """A job for the generation thread, its output stage set up (detokenizer primed with a continuation)."""
        from mlxcluster.worker.job_output import JobOutput
        from mlxcluster.worker.sampling import StopTextFilter

        assert self._loaded is not None and self._preparer is not None
        detokenizer = self._loaded.tokenizer.detokenizer
        if prepared.continued:  # shown already: the first new token reads as it would have mid-stream
            for token in prepared.prompt[-prepared.continued :]:
                detokenizer.add_token(token)
            _ = detokenizer.last_segment
        output = JobOutput(
            detokenizer=detokenizer,
            stop_filter=StopTextFilter(prepared.request.stop),
            features=prepared.features,
            think=self._preparer.think_tracker(prepared),
            prompt_tokens=len(prepared.prompt) - prepared.continued,
            submitted=submitted,
            held_progress_s=self.held_progress_s,
        )
        return Job(
            request=prepared.request,
            prepared=prepared,
            output=output,
            loop=loop,
            frames=asyncio.Queue(),
            submitted=submitted,
        )

    async def _next_frame(self, job: Job) -> EngineFrame:
        if job.held is not None:
            frame, job.held = job.held, None
            return frame
        if not job.frames.empty():
            return job.frames.get_nowait()
        deadline = job.request.deadline
        while True:
            timeout = POLL_S
            if deadline is not None:
                remaining = deadline - time.time()
                if remaining <= 0:
                    return Error(code="deadline_exceeded", message="request deadline passed", retryable=False)
                timeout = min(timeout, remaining)
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(timeout):
                    return await job.frames.get()
            except TimeoutError:
                thread = self._thread
                if (thread is None or not thread.is_alive()) and job.frames.empty():
                    return Error(code="shutting_down", message="mlx engine stopped", retryable=True)

    @staticmethod
    def _coalesce(job: Job, first: Token) -> Token:
        """Merge Token frames already waiting (the consumer is slower than generation)."""
        from mlxcluster.worker.output import merge_tokens

        tokens = [first]
        while not job.frames.empty():
            frame = job.frames.get_nowait()
            if not isinstance(frame, Token):
                job.held = frame
                break
            tokens.append(frame)
        return merge_tokens(tokens)

    # --- generation thread ---------------------------------------------------------------------

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        import mlx.core as mx

        stream = mx.default_stream(mx.default_device())
        try:
            with mx.stream(stream):
                self._loop = self._load(stream)
        except BaseException as exc:  # handed to start()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            with mx.stream(stream):
                self._loop.run()
        except BaseException as exc:
            log.exception("mlx generation thread crashed")
            if self._state == "running":
                self.failure = f"the generation thread died: {exc!r}"
                if self.on_fatal is not None:
                    self.on_fatal(self.failure)
        finally:
            self._state = "stopped"

    def _load(self, stream: Any) -> GenerationLoop:
        """Load the model and build what serves it: the preparer, the prompt cache, the loop."""
        from mlxcluster.worker.features import EngineFeatures

        started = time.perf_counter()
        model, tokenizer, config = self._load_model()
        loaded = self._loaded = LoadedModel.from_parts(model, tokenizer, config)
        features = EngineFeatures(tokenizer, loaded.vocab_size, loaded.eos_ids)
        self._preparer = RequestPreparer(
            loaded, features, checkpoints=self._checkpoints(), thinking_budgets=self.thinking_budgets
        )
        self._features = features
        self._stream = stream
        self._draft = self._load_draft_model(loaded, tokenizer)
        if self.prompt_cache_bytes > 0:
            self._prompt_cache = self._make_prompt_cache()
        loop = GenerationLoop(
            loaded,
            max_concurrent=self.max_concurrent,
            prompt_cache=self._prompt_cache,
            make_generator=self._new_generator,
            think_tracker=self._preparer.think_tracker,
            on_turn=self._on_turn,
            step_budget=StepBudget(
                self.step_budget_ms, self.prefill_step_size, costs=self.step_costs, learn=self.step_costs is None
            ),
            preparing=lambda: self.on_the_way,
        )
        self._details = describe(
            loaded,
            self.model,
            started,
            {
                "max_concurrent": str(self.max_concurrent),
                "prompt_cache_bytes": str(self.prompt_cache_bytes),
                **({"draft_model": str(self.draft_model)} if self._draft is not None else {}),
            },
        )
        self._measure(loaded)
        return loop

    def _load_draft_model(self, loaded: LoadedModel, tokenizer: Any) -> Any:
        """The draft model (``worker.draft_model``), checked against the model's tokenizer; None when there is
        none, speculation is off, or the model's caches cannot drop positions per row (it could not draft)."""
        if self.draft_model is None or self.speculative_tokens <= 0:
            return None
        if loaded.cache_kinds != ["KVCache"]:
            log.warning(
                "worker.draft_model %s is not used: %s's caches (%s) cannot drop drafted positions per request",
                self.draft_model,
                self.model_name,
                ", ".join(loaded.cache_kinds),
            )
            return None
        import mlx_lm

        from mlxcluster.worker.draft_model import check_draft_model

        draft, draft_tokenizer = mlx_lm.load(self.draft_model)[:2]
        check_draft_model(tokenizer, draft, draft_tokenizer, name=self.draft_model)
        return draft

    def _measure(self, loaded: LoadedModel) -> None:
        """The model's KV size (in the dtype its weights compute in) and its weights' bytes."""
        from mlx.utils import tree_flatten

        from mlxcluster.worker.placement import weights_bytes

        dtype = self._details.get("weights_dtype", "").split(" ")[0]
        self._kv_size = kv_size_of(loaded.config, CONFIG_DTYPE_BYTES.get(dtype, 2))
        parameters = cast(list[tuple[str, Any]], tree_flatten(loaded.model.parameters()))
        self._weights_bytes = weights_bytes(self._model_key()) or sum(int(value.nbytes) for _, value in parameters)
        if self._draft is not None:  # the draft model's weights are this engine's too
            drafts = cast(list[tuple[str, Any]], tree_flatten(self._draft.parameters()))
            self._weights_bytes += sum(int(value.nbytes) for _, value in drafts)

    def _on_turn(self) -> None:
        """Called by the generation thread once per turn of its loop."""

    def _checkpoints(self) -> bool:
        """Whether the prompt cache keeps checkpoints for caches that cannot be trimmed (a group does not)."""
        return True

    def _make_prompt_cache(self) -> PromptCache:
        return PromptCache(self._model_key(), self.prompt_cache_bytes, self._on_cache_change)

    def _on_cache_change(self, stored: list[int], removed: list[int]) -> None:
        listener = self._cache_listener
        if listener is not None:
            try:
                listener(stored, removed)
            except Exception:  # a listener must not take the batch down
                log.exception("the prompt-cache listener failed")

    def _model_key(self) -> str:
        path = Path(self.model).expanduser()
        return str(path.resolve()) if path.exists() else self.model

    def _load_model(self) -> tuple[Any, Any, dict[str, Any]]:
        """Model, tokenizer and config (a worker group's engine loads only its shard here)."""
        import mlx_lm

        return mlx_lm.load(self.model, return_config=True)  # type: ignore[return-value]

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        from mlxcluster.worker.speculative_batch import SpeculativeBatchGenerator

        assert self._loaded is not None
        options: dict[str, Any] = {
            "completion_batch_size": self.max_concurrent,
            "prefill_batch_size": self.prefill_batch_size,
            "prefill_step_size": self.prefill_step_size,
            "stream": self._stream,
        }
        if self.speculative_tokens > 0:
            return SpeculativeBatchGenerator(
                self._loaded.model,
                draft_tokens=self.speculative_tokens,
                stats=self.speculation,
                draft_model=self._draft,
                **options,
            )
        return BatchGenerator(self._loaded.model, **options)
