"""Per-request guards around what mlx-lm calls inside a batch step: a request's sampler and logits processors.

mlx-lm's ``GenerationBatch`` calls every request's logits processors and sampler while it builds one
batched step; an exception from any of them would abort the step for the whole batch. Each of them is
wrapped so that an exception is recorded on its request (:attr:`Job.fault`) and the step goes on for the
others (the faulty request's logits pass unchanged, or its token is the argmax); the engine then ends
that request alone, with a non-retryable error (another worker would fail it the same way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mlxcluster.worker.job import Job

log = logging.getLogger(__name__)


def _record(job: Job, what: str, exc: BaseException) -> None:
    if job.fault is None:
        log.warning("request %s: its %s failed: %r", job.request.request_id, what, exc)
        job.fault = exc


class GuardedProcessor:
    """A logits processor whose exception is recorded on its request instead of aborting the step."""

    def __init__(self, job: Job, processor: Callable[[Any, Any], Any]) -> None:
        self.job = job
        self.processor = processor

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self.job.fault is not None:
            return logits
        try:
            return self.processor(tokens, logits)
        except Exception as exc:
            _record(self.job, f"logits processor {type(self.processor).__name__}", exc)
            return logits

    @property
    def draftable(self) -> bool:
        """Whether speculative decoding may draft past it: it tells which drafted tokens it allows and can forget
        the ones not accepted (a grammar); others (penalties, budgets) keep the request from drafting."""
        return hasattr(self.processor, "valid_prefix") and hasattr(self.processor, "rollback")

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` it allows in a row (0 once this request failed)."""
        if self.job.fault is not None:
            return 0
        try:
            return int(self.processor.valid_prefix(tokens))  # type: ignore[attr-defined]
        except Exception as exc:
            _record(self.job, f"logits processor {type(self.processor).__name__}", exc)
            return 0

    def rollback(self, count: int) -> None:
        """Forget the last ``count`` tokens it consumed (drafted tokens not accepted)."""
        if self.job.fault is not None:
            return
        try:
            self.processor.rollback(count)  # type: ignore[attr-defined]
        except Exception as exc:
            _record(self.job, f"logits processor {type(self.processor).__name__}", exc)

    def resume(self) -> None:
        """Forward a re-insertion to a stateful processor (see ``GenerationLoop``)."""
        resume = getattr(self.processor, "resume", None)
        if resume is not None:
            resume()


class GuardedSampler:
    """A sampler whose exception is recorded on its request; the request's token is then the argmax."""

    def __init__(self, job: Job, sampler: Callable[[Any], Any]) -> None:
        self.job = job
        self.sampler = sampler

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx

        if self.job.fault is None:
            try:
                return self.sampler(logprobs)
            except Exception as exc:
                _record(self.job, "sampler", exc)
        return mx.argmax(logprobs, axis=-1)

    @property
    def draftable(self) -> bool:
        """Whether speculative decoding may draft for it: it can replay a position's draw (a keyed sampler)."""
        return bool(getattr(self.sampler, "draftable", False))

    def draws(self, logprobs: Any) -> tuple[list[Any], list[Any]]:
        """The sampler's draws at drafted positions (``KeyedSampler.draws``); the argmax once this request failed."""
        import mlx.core as mx

        if self.job.fault is None:
            try:
                return self.sampler.draws(logprobs)  # type: ignore[attr-defined, no-any-return]
            except Exception as exc:
                _record(self.job, "sampler", exc)
        positions = range(logprobs.shape[0])
        return [mx.argmax(logprobs[p : p + 1], axis=-1) for p in positions], [None for _ in positions]

    def commit(self, key: Any) -> None:
        """Move the sampler's key past the draws kept (nothing once this request failed)."""
        if self.job.fault is None and key is not None:
            try:
                self.sampler.commit(key)  # type: ignore[attr-defined]
            except Exception as exc:
                _record(self.job, "sampler", exc)


def guard_processors(job: Job, processors: list[Callable[[Any, Any], Any]]) -> list[Callable[[Any, Any], Any]]:
    return [GuardedProcessor(job, processor) for processor in processors]
