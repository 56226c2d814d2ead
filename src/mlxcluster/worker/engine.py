"""The ``mlx`` engine: mlx-lm's continuous batching on one dedicated thread, frames handed to asyncio.

One thread owns everything MLX: it loads the model, tokenizes, and drives a
:class:`mlx_lm.generate.BatchGenerator`, which decodes all active requests as one batch and
prefills newly inserted ones between decode steps. Requests reach the thread through a queue;
frames come back with ``loop.call_soon_threadsafe`` onto a per-request :class:`asyncio.Queue`.

Prompt cache: before a request is inserted into the batch, the KV cache of the longest prefix any
earlier prompt shares with it is fetched from :class:`~mlxcluster.worker.prompt_cache.PromptCache`
(mlx-lm's LRU prompt cache, bounded by bytes) and handed to ``BatchGenerator.insert`` with the tokens
it covers, so only the rest is prefilled; hits and misses mix freely in one batch. When a request
ends, its final KV cache (prompt plus reply) is stored back, so the next turn of a conversation finds
it. Long prompts prefill in chunks of ``prefill_step_size`` between decode steps of the others, and
send :class:`~mlxcluster.protocol.Progress` frames while they do.

Per-request sampling: greedy requests share mlx-lm's greedy sampler (one batched argmax); any
other request gets a :class:`~mlxcluster.worker.sampling.KeyedSampler` with its own PRNG key, so a
seed fixes its draws even inside a batch. Stop strings are matched on decoded text, and any tail
that could start a stop string is held back until it is resolved, so stop text never leaks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from mlxcluster.prefix_digest import canonical_text, prefix_digests
from mlxcluster.protocol import Done, Error, InferenceRequest, Progress, PromptCacheStats, Timings, Token, Usage
from mlxcluster.worker.engine_base import CacheListener, Engine, EngineFrame, EngineInfo
from mlxcluster.worker.prompt_cache import PromptCache, default_cache_bytes

log = logging.getLogger(__name__)

_WAKE = "wake"
_POLL_S = 0.5
"""Longest wait of the generation thread for work when idle, and of a stream for its next frame."""


@dataclass(eq=False)
class _Job:
    """One request's state; the asyncio side owns ``frames``/``held``, the thread the rest."""

    request: InferenceRequest
    loop: asyncio.AbstractEventLoop
    frames: asyncio.Queue[EngineFrame]
    submitted: float
    cancelled: bool = False
    # asyncio side
    held: EngineFrame | None = None
    # generation thread side
    prompt: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    reply: list[str] = field(default_factory=list)
    uid: int | None = None
    admitted: float = 0.0
    first_token: float = 0.0
    completion_tokens: int = 0
    unreported: int = 0
    detokenizer: Any = None
    stop_filter: Any = None
    features: Any = None
    finished: bool = False
    continued: int = 0
    """Tokens at the end of ``prompt`` that continue the assistant's message (not prompt tokens in usage)."""


def default_served_name(model: str) -> str:
    """The name a model is served under: a local dir's basename, or the Hugging Face repo id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


class MlxEngine(Engine):
    """mlx-lm engine with continuous batching of up to ``max_concurrent`` requests.

    :param model: an mlx-lm model dir or a Hugging Face repo id.
    :param max_concurrent: requests decoded together; more are held in arrival order.
    :param prefill_step_size: prompt tokens processed per model call; a smaller step lets running
        requests keep decoding between chunks of a long prompt.
    :param prefill_batch_size: prompts prefilled together (default ``min(max_concurrent, 8)``).
    :param served_name: the served model name (default :func:`default_served_name` of ``model``);
        ``name`` is an alias.
    :param prompt_cache_bytes: bound of the prompt cache; ``None``: :func:`default_cache_bytes` of the
        machine's memory; 0: no prompt cache.

    ``tokens_total`` counts the tokens generated since start.
    """

    def __init__(
        self,
        model: str,
        *,
        max_concurrent: int = 8,
        prefill_step_size: int = 256,
        prefill_batch_size: int | None = None,
        served_name: str | None = None,
        name: str | None = None,
        stop_timeout_s: float = 30.0,
        prompt_cache_bytes: int | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.model = model
        self.model_name = served_name or name or default_served_name(model)
        self.max_concurrent = max_concurrent
        self.prefill_step_size = prefill_step_size
        self.prefill_batch_size = prefill_batch_size or min(max_concurrent, 8)
        self.stop_timeout_s = stop_timeout_s
        if prompt_cache_bytes is None:
            import psutil

            prompt_cache_bytes = default_cache_bytes(psutil.virtual_memory().total)
        self.prompt_cache_bytes = prompt_cache_bytes
        self._prompt_cache: PromptCache | None = None
        self._cache_listener: CacheListener | None = None
        self._context_window = 0
        self.tokens_total = 0
        self._details: dict[str, str] = {}
        self._inbox: queue.SimpleQueue[_Job | str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._state = "new"  # new -> running -> stopping -> stopped
        # owned by the generation thread
        self._waiting: deque[_Job] = deque()
        self._active: dict[int, _Job] = {}
        self._model: Any = None
        self._tokenizer: Any = None
        self._generator: Any = None
        self._eos_stops: Any = None
        self._stream: Any = None
        self._vocab_size = 0
        self._features: Any = None

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
            "mlx engine ready: model=%s weights=%s quantization=%s blas=%s max_concurrent=%d",
            self.model_name,
            self._details.get("weights_dtype"),
            self._details.get("quantization"),
            self._details.get("blas"),
            self.max_concurrent,
        )

    async def stop(self) -> None:
        """Stop the thread; requests still pending end with ``Error(code="shutting_down", retryable=True)``."""
        if self._state != "running" or self._thread is None:
            self._state = "stopped"
            return
        self._state = "stopping"
        self._inbox.put(None)
        deadline = time.monotonic() + self.stop_timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._thread.is_alive():
            log.warning("mlx generation thread did not stop within %.0f s", self.stop_timeout_s)
        self._state = "stopped"

    def info(self) -> EngineInfo:
        """Name, served model and details (weights dtype, quantization, BLAS, mlx version, device)."""
        return EngineInfo(name="mlx", models=[self.model_name], details=dict(self._details))

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        """Hits, hit tokens, bytes, entries and evictions of the prompt cache (``None``: disabled)."""
        cache = self._prompt_cache
        return cache.stats() if cache is not None else None

    def set_cache_listener(self, listener: CacheListener | None) -> None:
        """Be told (on the generation thread) of prefix digests the prompt cache stores and drops."""
        self._cache_listener = listener

    def cache_digests(self) -> list[int]:
        """Every prefix digest the prompt cache holds now."""
        cache = self._prompt_cache
        return cache.digests() if cache is not None else []

    def _on_cache_change(self, stored: list[int], removed: list[int]) -> None:
        listener = self._cache_listener
        if listener is not None:
            try:
                listener(stored, removed)
            except Exception:  # a listener must not take the batch down
                log.exception("the prompt-cache listener failed")

    @property
    def active_requests(self) -> int:
        """Requests in the batch (prefilling or decoding)."""
        return len(self._active)

    @property
    def queued_requests(self) -> int:
        """Requests accepted but waiting for a batch slot."""
        return len(self._waiting)

    async def generate(self, request: InferenceRequest) -> AsyncGenerator[EngineFrame, None]:
        """Stream Token frames, then one Done or Error; closing the iterator early cancels the request."""
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, frames=asyncio.Queue(), submitted=time.perf_counter())
        if self._state != "running":
            code = "not_started" if self._state == "new" else "shutting_down"
            yield Error(code=code, message=f"mlx engine is {self._state}", retryable=True)
            return
        self._inbox.put(job)
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
                self._inbox.put(_WAKE)

    async def _next_frame(self, job: _Job) -> EngineFrame:
        if job.held is not None:
            frame, job.held = job.held, None
            return frame
        if not job.frames.empty():
            return job.frames.get_nowait()
        deadline = job.request.deadline
        while True:
            timeout = _POLL_S
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
    def _coalesce(job: _Job, first: Token) -> Token:
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
                self._load(stream)
        except BaseException as exc:  # handed to start()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            with mx.stream(stream):
                self._serve()
        except BaseException:
            log.exception("mlx generation thread crashed")
        finally:
            self._drain_inbox_on_stop()
            self._fail_all("shutting_down", "mlx engine is shutting down", retryable=True)
            try:
                self._generator.close()
            except Exception:
                log.debug("closing the batch generator failed", exc_info=True)
            self._generator = self._model = None
            self._state = "stopped"

    def _load(self, stream: Any) -> None:
        import mlx.core as mx
        import mlx_lm
        from mlx_lm.generate import make_stop_sequences

        from mlxcluster.worker.blas import blas_in_use

        started = time.perf_counter()
        model, tokenizer, config = self._load_model()
        self._model, self._tokenizer = model, tokenizer
        self._vocab_size = int(config.get("vocab_size") or len(tokenizer))
        self._context_window = _context_window(config, tokenizer)
        if self.prompt_cache_bytes > 0:
            self._prompt_cache = PromptCache(self._model_key(), self.prompt_cache_bytes, self._on_cache_change)
        self._eos_stops = make_stop_sequences(tokenizer)  # type: ignore[no-untyped-call]
        from mlxcluster.worker.features import EngineFeatures

        self._features = EngineFeatures(tokenizer, self._vocab_size, sorted(tokenizer.eos_token_ids))
        self._stream = stream
        self._generator = self._new_generator()
        device = mx.default_device()
        device_name = "cpu" if device.type == mx.DeviceType.cpu else "gpu"
        try:
            device_name += f" ({mx.device_info().get('device_name', '')})".replace(" ()", "")
        except Exception:  # informational only
            pass
        self._details = {
            "weights_dtype": _weights_dtype(model),
            "quantization": _quantization(config),
            "blas": blas_in_use() if device.type == mx.DeviceType.cpu else "n/a (gpu)",
            "mlx_version": getattr(mx, "__version__", ""),
            "mlx_lm_version": getattr(mlx_lm, "__version__", ""),
            "device": device_name,
            "model_path": str(Path(self.model).expanduser().resolve()) if Path(self.model).exists() else self.model,
            "max_concurrent": str(self.max_concurrent),
            "context_window": str(self._context_window),
            "prompt_cache_bytes": str(self.prompt_cache_bytes),
            "load_seconds": f"{time.perf_counter() - started:.2f}",
        }

    def _model_key(self) -> str:
        path = Path(self.model).expanduser()
        return str(path.resolve()) if path.exists() else self.model

    def _load_model(self) -> tuple[Any, Any, dict[str, Any]]:
        """Model, tokenizer and config (a worker group's engine loads only its shard here)."""
        import mlx_lm

        return mlx_lm.load(self.model, return_config=True)  # type: ignore[return-value]

    def _new_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            self._model,
            completion_batch_size=self.max_concurrent,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step_size=self.prefill_step_size,
            stream=self._stream,
        )

    def _serve(self) -> None:
        while True:
            idle = not self._active and not self._waiting
            if self._take_inbox(block=idle):
                return
            self._expire()
            self._admit()
            if self._active:
                self._step()

    def _take_inbox(self, *, block: bool) -> bool:
        """Accept new jobs; True when asked to stop."""
        try:
            item = self._inbox.get(timeout=_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            if item is None:
                return True
            if isinstance(item, _Job):
                self._accept(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return False

    def _drain_inbox_on_stop(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                self._emit(item, Error(code="shutting_down", message="mlx engine is shutting down", retryable=True))

    def _accept(self, job: _Job) -> None:
        """Tokenize and validate; a bad request ends at once with ``invalid_request``."""
        from mlxcluster.worker.sampling import StopTextFilter, validate_sampling

        if job.cancelled:
            return
        request = job.request
        problem = validate_sampling(request.sampling, request.max_tokens)
        if problem is None:
            from mlxcluster.worker.grammar import GrammarError

            try:
                job.prompt = self._tokenize(request)
                job.features = self._features.prepare(request, job.prompt) if job.prompt else None
            except GrammarError as exc:  # an unsupported schema or tool choice
                problem = str(exc)
            except Exception as exc:  # template or tokenizer errors are the request's fault
                problem = f"cannot build the prompt: {exc}"
            else:
                if not job.prompt:
                    problem = "the prompt is empty"
        if problem is None and self._context_window and len(job.prompt) + request.max_tokens > self._context_window:
            message = (
                f"This model's context window is {self._context_window} tokens; the prompt has "
                f"{len(job.prompt)} tokens and max_tokens asks for {request.max_tokens} more. "
                "Shorten the prompt or lower max_tokens."
            )
            self._emit(job, Error(code="context_length_exceeded", message=message, retryable=False))
            return
        if problem is not None:
            self._emit(job, Error(code="invalid_request", message=problem, retryable=False))
            return
        job.detokenizer = self._tokenizer.detokenizer
        job.continued = self._continue_after(job.detokenizer, request)
        job.stop_filter = StopTextFilter(request.stop)
        self._waiting.append(job)

    def _tokenize(self, request: InferenceRequest) -> list[int]:
        """The prompt's token ids (chat messages and tools through the chat template, or the raw prompt),
        then those of ``request.continuation`` (text a lost worker had already generated: the assistant's
        message goes on after it, and ``max_tokens`` is the remaining budget)."""
        prompt: list[int] = self._features.prompt(request)
        return prompt + self._continuation_ids(request)

    def _continuation_ids(self, request: InferenceRequest) -> list[int]:
        """The tokens of ``request.continuation`` (none when it is not a continued request)."""
        if not request.continuation:
            return []
        return list(self._tokenizer.encode(request.continuation, add_special_tokens=False))

    def _continue_after(self, detokenizer: Any, request: InferenceRequest) -> int:
        """Feed a continuation's tokens to the detokenizer (shown already: its output is dropped), so the
        first new token reads as it would have mid-stream (a leading space is only trimmed at the start).
        Returns how many tokens that was."""
        continued = self._continuation_ids(request)
        for token in continued:
            detokenizer.add_token(token)
        _ = detokenizer.last_segment
        return len(continued)

    def _expire(self) -> None:
        """Drop cancelled requests and end those past their deadline."""
        now = time.time()

        def gone(job: _Job) -> bool:
            if job.cancelled:
                return True
            if job.request.deadline is not None and now >= job.request.deadline:
                self._emit(job, Error(code="deadline_exceeded", message="request deadline passed"))
                return True
            return False

        expired = [job for job in self._waiting if gone(job)]
        if expired:
            self._waiting = deque(job for job in self._waiting if job not in expired)
        removed = [uid for uid, job in self._active.items() if gone(job)]
        if removed:
            self._remove(removed)

    def _admit(self) -> None:
        from mlxcluster.worker.sampling import make_request_processors, make_request_sampler

        while self._waiting and len(self._active) < self.max_concurrent:
            job = self._waiting.popleft()
            request = job.request
            sampler = make_request_sampler(request.sampling, request.seed, self._vocab_size)
            processors = make_request_processors(request.sampling)
            if job.features.processors:  # a grammar: beyond what a worker group's followers can rebuild
                processors.extend(job.features.processors)
                processors.replayable = False
            cache, cached = self._prompt_cache.fetch(job.prompt) if self._prompt_cache is not None else (None, 0)
            job.cached_tokens = cached
            try:
                (uid,) = self._generator.insert(
                    [job.prompt[cached:]],
                    caches=[cache] if cache is not None else None,
                    all_tokens=[job.prompt[:cached]],
                    max_tokens=[request.max_tokens],
                    samplers=[sampler],
                    logits_processors=[processors],
                    stop_sequences=[self._eos_stops],
                )
            except ValueError as exc:
                self._emit(job, Error(code="invalid_request", message=str(exc)))
                continue
            job.uid = uid
            job.admitted = time.perf_counter()
            self._active[uid] = job

    def _step(self) -> None:
        """One BatchGenerator step: a decode step for the batch plus a prefill chunk for new prompts."""
        try:
            prefilling, responses = self._generator.next()
        except Exception as exc:  # fail the batch, keep serving
            log.exception("mlx generation step failed")
            self._fail_all("engine_error", f"generation failed: {exc}", retryable=True)
            self._generator = self._new_generator()
            return
        now = time.perf_counter()
        for progress in prefilling:
            self._on_prefill(progress)
        responses = [r for r in responses if r.uid in self._active]
        if responses:  # counted before any Done frame goes out
            self.tokens_total += len(responses)
        stopped: list[int] = []
        for response in responses:
            job = self._active[response.uid]
            job.completion_tokens += 1
            if job.completion_tokens == 1:
                job.first_token = now
            if response.finish_reason is not None:
                self._active.pop(response.uid)  # BatchGenerator already dropped it
                self._keep_cache(job, response.all_tokens, response.prompt_cache)
            if job.cancelled:
                continue  # _expire removes it from the batch
            try:
                ended = self._on_token(job, response.token, response.finish_reason, now, response.logprobs)
            except Exception as exc:  # one bad request must not take the batch down
                log.exception("post-processing a token failed")
                self._emit(job, Error(code="engine_error", message=str(exc), retryable=False))
                ended = True
            if ended and response.finish_reason is None:
                stopped.append(response.uid)
        if stopped:
            self._remove(stopped, keep_caches=True)

    def _on_prefill(self, progress: Any) -> None:
        """A chunk of a prompt was prefilled: tell the controller when more chunks are still to come."""
        job = self._active.get(progress.uid)
        if job is None or job.cancelled or progress.end_of_prompt:
            return
        processed, total = progress.progress
        if total - processed > 1:  # a long prompt: more chunks to go before the first token
            self._emit(job, Progress(processed=job.cached_tokens + processed, total=job.cached_tokens + total))

    def _keep_cache(self, job: _Job, tokens: list[int] | None, cache: list[Any] | None) -> None:
        """Store a finished request's KV cache (prompt and reply) for later prompts."""
        if self._prompt_cache is None or not tokens or not cache:
            return
        request = job.request
        reply = (request.continuation or "") + "".join(job.reply)  # a continued stream: the whole reply so far
        text = canonical_text(request.messages, request.prompt, reply=reply)
        try:
            self._prompt_cache.store(tokens, cache, prefix_digests(text))
        except Exception:  # the cache is an optimisation: never fail a request over it
            log.exception("storing a prompt cache failed")

    def _on_token(self, job: _Job, token: int, finish_reason: str | None, now: float, logprobs: Any = None) -> bool:
        """Turn one generated token into frames; True when the request ended here."""
        detokenizer = job.detokenizer
        if finish_reason == "stop":  # an end-of-sequence token: never shown
            detokenizer.finalize()
        else:
            detokenizer.add_token(token)
            if finish_reason is not None:
                detokenizer.finalize()
        text, hit_stop = job.stop_filter.feed(detokenizer.last_segment)
        if finish_reason is not None and not hit_stop:
            text += job.stop_filter.flush()
        job.unreported += 1
        if text:
            job.reply.append(text)
        job.features.on_token(None if finish_reason == "stop" else token, logprobs)
        frame = job.features.frame(text, job.unreported, final=hit_stop or finish_reason is not None)
        if frame is not None:
            self._emit(job, frame)
            job.unreported = 0
        if not hit_stop and finish_reason is None:
            return False
        reason = "stop" if hit_stop or finish_reason == "stop" else "length"
        done = self._done(job, reason, now)
        if hit_stop:
            done.stop_sequence = job.stop_filter.matched
        self._emit(job, done)
        return True

    def _done(self, job: _Job, reason: str, now: float) -> Done:
        prompt_tokens, completion = len(job.prompt) - job.continued, job.completion_tokens
        decode_s = now - job.first_token
        rate = (completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0
        return Done(
            finish_reason=reason,  # type: ignore[arg-type]
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
                cached_tokens=min(job.cached_tokens, prompt_tokens),
            ),
            timings=Timings(
                queue_ms=round((job.admitted - job.submitted) * 1000, 3),
                ttft_ms=round((job.first_token - job.submitted) * 1000, 3),
                total_ms=round((now - job.submitted) * 1000, 3),
                tokens_per_second=round(rate, 3),
            ),
        )

    def _remove(self, uids: list[int], *, keep_caches: bool = False) -> None:
        """Take requests out of the batch; with ``keep_caches`` (they ended well), store their KV caches."""
        jobs = {uid: self._active.pop(uid) for uid in uids if uid in self._active}
        keep = keep_caches and self._prompt_cache is not None
        try:
            caches = self._generator.remove(uids, return_prompt_caches=keep)
        except Exception:
            log.exception("removing requests from the batch failed; starting a fresh batch")
            self._fail_all("engine_error", "the batch was reset", retryable=True)
            self._generator = self._new_generator()
            return
        for uid, (cache, tokens) in (caches or {}).items():
            job = jobs.get(uid)
            if job is not None:
                self._keep_cache(job, tokens, cache)

    def _fail_all(self, code: str, message: str, *, retryable: bool) -> None:
        jobs = list(self._waiting) + list(self._active.values())
        self._waiting.clear()
        if self._active and self._generator is not None:
            try:
                self._generator.remove(list(self._active))
            except Exception:
                log.debug("clearing the batch failed", exc_info=True)
        self._active.clear()
        for job in jobs:
            if not job.cancelled:
                self._emit(job, Error(code=code, message=message, retryable=retryable))

    def _emit(self, job: _Job, frame: EngineFrame) -> None:
        """Hand a frame to the request's event loop (dropped if the stream is gone)."""
        if job.finished:
            return
        if not isinstance(frame, Token | Progress):
            job.finished = True
        try:
            job.loop.call_soon_threadsafe(job.frames.put_nowait, frame)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            job.cancelled = True


def _weights_dtype(model: Any) -> str:
    """The floating dtype holding most parameters (quantized packs and scales aside)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    sizes: dict[str, int] = {}
    parameters = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    for name, value in parameters:
        if not mx.issubdtype(value.dtype, mx.floating) or name.endswith((".scales", ".biases")):
            continue
        key = str(value.dtype).removeprefix("mlx.core.")
        sizes[key] = sizes.get(key, 0) + value.size
    if not sizes:
        return "unknown"
    quantized = any(name.endswith(".scales") for name, _ in parameters)
    dtype = max(sizes, key=sizes.__getitem__)
    return f"{dtype} (+ quantized)" if quantized else dtype


def _context_window(config: dict[str, Any], tokenizer: Any) -> int:
    """The model's context window in tokens (0: unknown), from its config or its tokenizer."""
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length", "n_ctx"):
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else 0


def _quantization(config: dict[str, Any]) -> str:
    """``none`` or e.g. ``4-bit group 32 (mixed per layer)`` from the model config."""
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict) or "bits" not in quant:
        return "none"
    text = f"{quant['bits']}-bit group {quant.get('group_size', '?')}"
    if quant.get("mode") and quant["mode"] != "affine":
        text += f" {quant['mode']}"
    if any(isinstance(value, dict) for value in quant.values()):
        text += " (mixed per layer)"
    return text
