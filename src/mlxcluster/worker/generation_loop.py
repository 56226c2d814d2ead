"""The mlx engine's generation thread: insert prepared requests into mlx-lm's ``BatchGenerator``, step, emit.

Requests arrive prepared (:mod:`~mlxcluster.worker.preparation`): the thread does no template, tokenizer
or grammar work. Each turn of the loop takes new requests, drops cancelled and expired ones, admits
waiting ones into free batch slots (with the prompt cache's copy of their longest cached prefix), and
runs one ``BatchGenerator`` step: a decode step for the running requests plus a prefill chunk of new
prompts. Generated tokens go through each request's :class:`~mlxcluster.worker.job_output.JobOutput`.

One bad request never stops the batch:

- Its sampler and logits processors are guarded (:mod:`~mlxcluster.worker.step_guard`): an exception is
  recorded on it, the step completes for everyone, and that request alone ends with a non-retryable error.
- A step that fails for no known reason (an exception out of the model call itself) starts a fresh batch:
  the requests that were already decoding are re-inserted with what they generated (their prompt cache
  entry, if any, saves the prefill) and go on; the requests that were new in that step are suspects, each
  admitted alone until it produces a token; a suspect that fails a step again, or a lone new request, is
  the culprit and ends with a non-retryable error.
- If the thread dies anyway, ``on_fatal`` is told why (the worker deregisters and exits non-zero).

Prompt cache: when a request ends, its final KV cache (prompt and reply) is stored; for models whose
cache cannot be trimmed, the cache at the request's checkpoint (the conversation before the generation
prompt) is stored while it prefills, since the next turn shares exactly that prefix.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mlxcluster.prefix_digest import close_reply
from mlxcluster.protocol import Error, Progress
from mlxcluster.worker.job import Job
from mlxcluster.worker.loaded_model import LoadedModel
from mlxcluster.worker.prompt_cache import PromptCache
from mlxcluster.worker.step_budget import StepBudget
from mlxcluster.worker.step_guard import GuardedProcessor, GuardedSampler

log = logging.getLogger(__name__)

WAKE = "wake"
POLL_S = 0.5
"""Longest wait of the generation thread for work when idle."""
MAX_FAILURES = 2
"""Failed steps a request may be part of before it counts as their cause."""
BURST_WAIT_S = 0.05
"""Longest wait of an idle batch for requests still being prepared (see :meth:`GenerationLoop.gather_burst`)."""
COMPANY_SHARE = 0.05
"""A lone request on an idle batch waits for company at most this share of its own expected prefill time
(see :meth:`GenerationLoop.company_wait_s`)."""


class GenerationLoop:
    """The batch and everything the generation thread owns.

    :param loaded: the model.
    :param prompt_cache: reusable KV caches (None: no prompt cache).
    :param make_generator: builds a fresh ``BatchGenerator`` (a worker group wraps it).
    :param think_tracker: makes a request's tracker of think blocks (for its thinking budget).
    :param on_turn: called once per turn of the loop, busy or idle (a worker group's heartbeat).
    :param step_budget: sizes each step's prefill chunk while streams decode (None: always the
        generator's own ``prefill_step_size``).
    :param preparing: how many requests are being prepared right now (on other threads), on their way here.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_concurrent: int,
        prompt_cache: PromptCache | None,
        make_generator: Callable[[], Any],
        think_tracker: Callable[[Any], Any],
        on_turn: Callable[[], None] = lambda: None,
        step_budget: StepBudget | None = None,
        preparing: Callable[[], int] = lambda: 0,
    ) -> None:
        from mlx_lm.generate import make_stop_sequences

        self.loaded = loaded
        self.max_concurrent = max_concurrent
        self.prompt_cache = prompt_cache
        self.make_generator = make_generator
        self.think_tracker = think_tracker
        self.on_turn = on_turn
        self.step_budget = step_budget if step_budget is not None and step_budget.enabled else None
        self.preparing = preparing
        self.prefill_left: dict[int, int] = {}
        """Prompt tokens still to prefill per batch uid (until the prompt joins the decode batch)."""
        self.eos_stops = make_stop_sequences(loaded.tokenizer)  # type: ignore[no-untyped-call]
        self.inbox: queue.SimpleQueue[Job | str | None] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()
        self.active: dict[int, Job] = {}
        self.tokens_total = 0
        self.admissions = 0
        """Calls of :meth:`admit` so far (a job notes the one that put it in the batch: :attr:`Job.admission`)."""
        self.generator: Any = None
        self._cache_target: int | None = None
        self._target_lock = threading.Lock()

    # --- any thread -----------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def wake(self) -> None:
        self.inbox.put(WAKE)

    def stop(self) -> None:
        self.inbox.put(None)

    def shrink_cache(self, target_bytes: int) -> None:
        """Have the prompt cache evict down to ``target_bytes`` at the start of the thread's next turn (before it
        admits anything); the latest target wins."""
        with self._target_lock:
            self._cache_target = target_bytes
        self.wake()

    # --- generation thread ----------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`; whatever happens, every request still here ends with an Error."""
        self.generator = self.make_generator()
        try:
            self.serve()
        finally:
            self.drain_inbox()
            self.fail_all("shutting_down", "mlx engine is shutting down", retryable=True)
            try:
                self.generator.close()
            except Exception:
                log.debug("closing the batch generator failed", exc_info=True)
            self.generator = None

    def serve(self) -> None:
        while True:
            idle = not self.active and not self.waiting
            if self.take_inbox(block=idle) or self.gather_burst():
                return
            self.apply_cache_target()
            self.on_turn()
            self.expire()
            self.admit()
            if self.active:
                self.step()

    def take_inbox(self, *, block: bool) -> bool:
        """Queue new jobs; True when asked to stop."""
        try:
            item = self.inbox.get(timeout=POLL_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            if item is None:
                return True
            if isinstance(item, Job) and not item.cancelled:
                self.waiting.append(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return False

    def gather_burst(self) -> bool:
        """On an idle batch, wait for the requests that arrive with the first, so that they prefill together: one
        model call for all their prompts, and no step budget cutting their prefill into slices for a stream
        that started a few milliseconds earlier. The batch waits at most :data:`BURST_WAIT_S` while requests
        are being prepared (on their way), and besides that, for requests not yet arrived, at most
        :meth:`company_wait_s`. True when asked to stop."""
        if self.active or not self.waiting:
            return False
        started = time.perf_counter()
        deadline = started + BURST_WAIT_S
        company_until = started + self.company_wait_s()
        while True:
            # a request is counted as on its way until it is in the inbox: drain first, then look
            if self.take_inbox(block=False):
                return True
            if len(self.waiting) >= self.max_concurrent:
                return False
            left = (deadline if self.preparing() > 0 else company_until) - time.perf_counter()
            if left <= 0:
                return False
            try:
                item = self.inbox.get(timeout=left)
            except queue.Empty:
                continue  # one more look: a request may have arrived and still be on its way
            if item is None:
                return True
            if isinstance(item, Job) and not item.cancelled:
                self.waiting.append(item)

    def company_wait_s(self) -> float:
        """How long a lone request (nothing else waiting or on its way) waits for others to arrive.

        Requests sent together do not all reach the worker together (a client's new connections, the
        controller handling them one by one: ~10 ms apart here). A request that starts alone makes those that
        arrive just after it wait for its whole prefill, and then shares the batch with them anyway. So it
        waits for company, at most :data:`COMPANY_SHARE` of its own expected prefill (its uncached prompt
        tokens at the measured cost of a prefill token; never over :data:`BURST_WAIT_S`): on this CPU about
        15 ms for a 40-token prompt, far less on a GPU, nothing before a prefill was measured.
        """
        if len(self.waiting) != 1 or self.preparing() > 0 or self.step_budget is None:
            return 0.0
        per_token = self.step_budget.costs.prefill_ms_per_token
        if per_token is None or per_token <= 0:
            return 0.0
        job = self.waiting[0]
        tokens = job.prepared.prompt + job.generated
        cached = self.prompt_cache.cached_length(tokens) if self.prompt_cache is not None else 0
        return min(BURST_WAIT_S, COMPANY_SHARE * (len(tokens) - cached) * per_token / 1000)

    def apply_cache_target(self) -> None:
        """Evict what a memory budget asked the prompt cache to give up."""
        with self._target_lock:
            target, self._cache_target = self._cache_target, None
        if target is not None and self.prompt_cache is not None:
            try:
                self.prompt_cache.shrink_to(target)
            except Exception:  # the cache is an optimisation: never stop the batch over it
                log.exception("shrinking the prompt cache failed")

    def drain_inbox(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Job):
                item.fail("shutting_down", "mlx engine is shutting down", retryable=True)

    def jobs(self) -> list[Job]:
        """Every request the thread holds (waiting or in the batch)."""
        return list(self.waiting) + list(self.active.values())

    def expire(self) -> None:
        """Drop cancelled requests and end those past their deadline."""
        now = time.time()

        def gone(job: Job) -> bool:
            if job.cancelled:
                return True
            deadline = job.request.deadline
            if deadline is not None and now >= deadline:
                job.emit(Error(code="deadline_exceeded", message="request deadline passed"))
                return True
            return False

        expired = [job for job in self.waiting if gone(job)]
        if expired:
            self.waiting = deque(job for job in self.waiting if job not in expired)
        removed = [uid for uid, job in self.active.items() if gone(job)]
        if removed:
            self.remove(removed)

    # --- admission ------------------------------------------------------------------------------

    def admit(self) -> None:
        """Insert waiting requests into free batch slots (a suspect only when no other suspect is on trial)."""
        skipped: list[Job] = []
        on_trial = any(job.suspect for job in self.active.values())
        self.admissions += 1
        while self.waiting and len(self.active) < self.max_concurrent:
            job = self.waiting.popleft()
            if job.suspect and on_trial:
                skipped.append(job)
                continue
            if self.insert(job):
                on_trial = on_trial or job.suspect
        self.waiting.extendleft(reversed(skipped))

    def insert(self, job: Job) -> bool:
        """Put one request (or a re-inserted one, with what it generated) into the batch."""
        from mlx_lm.sample_utils import greedy_sampler

        from mlxcluster.worker.sampling import make_request_processors, make_request_sampler

        request, prepared = job.request, job.prepared
        try:
            if job.sampler is None:
                sampler = make_request_sampler(request.sampling, request.seed, self.loaded.vocab_size)
                # the shared greedy sampler cannot fail, and sharing it keeps the batch's argmax in one call
                job.sampler = sampler if sampler is greedy_sampler else GuardedSampler(job, sampler)
                job.processors = self._processors(job, make_request_processors(request.sampling))
            else:  # re-inserted: stateful processors must not count the last token twice
                for processor in job.processors:
                    processor.resume()
            tokens = prepared.prompt + job.generated
            cache, cached = self.prompt_cache.fetch(tokens) if self.prompt_cache is not None else (None, 0)
            segments = [tokens[cached:]]
            checkpoint = prepared.checkpoint if not job.generated else 0
            if self.prompt_cache is not None and cached < checkpoint < len(tokens):
                segments = [tokens[cached:checkpoint], tokens[checkpoint:]]
            (uid,) = self.generator.insert_segments(
                [segments],
                max_tokens=[prepared.max_tokens - len(job.generated)],
                caches=[cache] if cache is not None else None,
                all_tokens=[tokens[:cached]],
                samplers=[job.sampler],
                logits_processors=[job.processors],
                stop_sequences=[self.eos_stops],
            )
        except Exception as exc:  # this request's own problem: it alone fails
            log.warning("request %s could not join the batch: %r", request.request_id, exc)
            job.fail("invalid_request", f"cannot start generating: {exc}")
            return False
        if not job.generated:
            job.cached_tokens = job.output.cached_tokens = cached
            job.admitted = job.output.admitted = time.perf_counter()
        job.uid = uid
        job.admission = self.admissions
        self.active[uid] = job
        self.prefill_left[uid] = len(tokens) - cached
        return True

    def _processors(self, job: Job, sampling: Any) -> Any:
        """The request's logits processors, each guarded: sampling's, the thinking budget, the grammar."""
        from mlxcluster.worker.reasoning import ThinkingBudget

        processors = list(sampling)
        budget = job.prepared.thinking.budget
        tracker = self.think_tracker(job.prepared) if budget is not None else None
        if tracker is not None and budget is not None:
            processors.append(ThinkingBudget(tracker, budget))
        features = job.prepared.features
        grammar = list(features.processors) if features is not None else []
        processors.extend(grammar)
        guarded = type(sampling)(GuardedProcessor(job, p) for p in processors)
        guarded.repetition_penalty = sampling.repetition_penalty
        # a grammar or a budget is beyond what a worker group's followers can rebuild
        guarded.replayable = sampling.replayable and not grammar and tracker is None
        return guarded

    # --- one step -------------------------------------------------------------------------------

    def step(self) -> None:
        """One BatchGenerator step: a decode step for the batch plus a prefill chunk for new prompts."""
        budget = self.step_budget
        decoding = prefilling = 0
        if budget is not None:
            decoding, prefilling = self.batch_shape()
            # no protected stream: the full step (as with none decoding)
            self.generator.prefill_step_size = budget.chunk(self.admitted_before_prompts(), prefilling)
        left_before = sum(self.prefill_left.values()) if budget is not None else 0
        started = time.perf_counter()
        try:
            progressed, responses = self.generator.next()
        except Exception as exc:
            log.exception("mlx generation step failed")
            self.step_failed(exc)
            return
        now = time.perf_counter()
        joined = False
        for progress in progressed:
            joined = joined or progress.end_of_prompt
            self.on_prefill(progress)
        if budget is not None and not joined:  # a step that merged a prompt's caches is no sample
            prefilled = left_before - sum(self.prefill_left.values())
            budget.observe((now - started) * 1000, decoding=decoding, prefill_tokens=prefilled)
        faulted = [uid for uid, job in self.active.items() if job.fault is not None]
        responses = [r for r in responses if r.uid in self.active]
        if responses:  # counted before any Done frame goes out
            self.tokens_total += len(responses)
        stopped: list[int] = []
        for response in responses:  # a row may emit several tokens in a step (accepted drafts), in order
            job = self.active.get(response.uid)
            if job is None or job.fault is not None or response.uid in stopped:
                continue
            job.generated.append(response.token)
            job.suspect = False
            if response.finish_reason is not None:
                self.active.pop(response.uid)  # BatchGenerator already dropped it
                self.store(job, response.all_tokens, response.prompt_cache)
            if job.cancelled:
                continue  # expire() removes it from the batch
            try:
                frames = job.output.on_token(response.token, response.finish_reason, now, response.logprobs)
            except Exception as exc:  # one bad request must not take the batch down
                log.exception("post-processing a token failed")
                job.fail("engine_error", f"post-processing a token failed: {exc}")
                frames = []
            for frame in frames:
                job.emit(frame)
            if job.finished and response.finish_reason is None:
                stopped.append(response.uid)
        for uid in faulted:
            job = self.active[uid]
            job.fail("engine_error", f"this request failed its generation step: {job.fault!r}")
        if stopped or faulted:
            self.remove(stopped + faulted, keep_caches=True)

    def batch_shape(self) -> tuple[int, int]:
        """Streams decoding and prompts to be prefilled together in the next step."""
        for uid in [uid for uid in self.prefill_left if uid not in self.active]:
            del self.prefill_left[uid]
        decoding = len(self.active) - len(self.prefill_left)
        # a prompt with one token left only waits to join the decode batch; the generator prefills at
        # most prefill_batch_size prompts together
        prefilling = sum(1 for left in self.prefill_left.values() if left > 1)
        return decoding, min(prefilling, int(getattr(self.generator, "prefill_batch_size", prefilling)))

    def admitted_before_prompts(self) -> int:
        """Decoding streams admitted before every prompt still to prefill: those the budget protects.

        Prompts admitted with a stream (one burst, more prompts than ``prefill_batch_size`` takes at once)
        were waiting as long as it: they are not sliced for it, and prefill at the full step."""
        prompts = [self.active[uid].admission for uid, left in self.prefill_left.items() if left > 1]
        if not prompts:
            return 0
        first = min(prompts)
        return sum(1 for uid, job in self.active.items() if uid not in self.prefill_left and job.admission < first)

    def on_prefill(self, progress: Any) -> None:
        """A chunk of a prompt was prefilled: keep a checkpoint, tell the controller when more is to come."""
        if progress.end_of_prompt:
            self.prefill_left.pop(progress.uid, None)
        elif progress.uid in self.prefill_left:
            self.prefill_left[progress.uid] = progress.progress[1] - progress.progress[0]
        job = self.active.get(progress.uid)
        if job is None or job.cancelled or progress.end_of_prompt:
            return
        processed, total = progress.progress
        if progress.end_of_segment and self.prompt_cache is not None:
            checkpoint = job.prepared.checkpoint
            if checkpoint and job.cached_tokens + processed == checkpoint:
                self.store_checkpoint(job, progress.uid)
        if total - processed > 1:  # a long prompt: more chunks to go before the first token
            job.emit(Progress(processed=job.cached_tokens + processed, total=job.cached_tokens + total))

    def step_failed(self, exc: BaseException) -> None:
        """A step failed for no known reason: start a fresh batch without the request that caused it."""
        jobs = list(self.active.values())
        self.active.clear()
        self.prefill_left.clear()
        try:
            self.generator.close()
        except Exception:
            log.debug("closing the failed batch generator failed", exc_info=True)
        self.generator = self.make_generator()
        new = [job for job in jobs if not job.generated]
        running = [job for job in jobs if job.generated]
        suspects = new or running  # a pure decode step: any of them
        for job in jobs:
            job.uid = None
            if job in suspects:
                job.failures += 1
        culprit = len(suspects) == 1
        retry: list[Job] = []
        for job in jobs:
            if job.cancelled:
                continue
            if job in suspects and (culprit or job.failures >= MAX_FAILURES or job.suspect):
                job.fail("engine_error", f"the model failed on this request: {exc!r}")
            else:
                job.suspect = job in suspects
                retry.append(job)
        for job in retry:  # running requests first, each suspect alone after them
            if job.suspect:
                self.waiting.appendleft(job)
            elif not self.insert(job):
                continue
        log.info("started a fresh batch: %d request(s) went on, %d ended", len(retry), len(jobs) - len(retry))

    # --- ends -----------------------------------------------------------------------------------

    def store(self, job: Job, tokens: list[int] | None, cache: list[Any] | None) -> None:
        """Store a finished request's KV cache (prompt and reply) for later prompts."""
        if self.prompt_cache is None or not tokens or not cache or job.fault is not None:
            return
        request = job.request
        reply = (request.continuation or "") + job.output.content_text
        try:
            digests = close_reply(job.prepared.hasher.copy(), request.messages, reply)
            self.prompt_cache.store(tokens, cache, digests)
        except Exception:  # the cache is an optimisation: never fail a request over it
            log.exception("storing a prompt cache failed")

    def store_checkpoint(self, job: Job, uid: int) -> None:
        """Store the cache of a prefilling request's checkpoint (the prefix the next turn shares)."""
        assert self.prompt_cache is not None
        try:
            extracted = self.generator.extract_cache([uid])
            cache, tokens = extracted[uid]
            self.prompt_cache.store(list(tokens), cache, job.prepared.checkpoint_digests)
        except Exception:
            log.exception("storing a checkpoint cache failed")

    def remove(self, uids: list[int], *, keep_caches: bool = False) -> None:
        """Take requests out of the batch; with ``keep_caches`` (they ended well), store their KV caches."""
        jobs = {uid: self.active.pop(uid) for uid in uids if uid in self.active}
        keep = keep_caches and self.prompt_cache is not None
        try:
            caches = self.generator.remove(uids, return_prompt_caches=keep)
        except Exception as exc:
            log.exception("removing requests from the batch failed; starting a fresh batch")
            self.step_failed(exc)
            return
        for uid, (cache, tokens) in (caches or {}).items():
            job = jobs.get(uid)
            if job is not None:
                self.store(job, tokens, cache)

    def fail_all(self, code: str, message: str, *, retryable: bool) -> None:
        jobs = self.jobs()
        self.waiting.clear()
        if self.active and self.generator is not None:
            try:
                self.generator.remove(list(self.active))
            except Exception:
                log.debug("clearing the batch failed", exc_info=True)
        self.active.clear()
        for job in jobs:
            if not job.cancelled:
                job.emit(Error(code=code, message=message, retryable=retryable))
