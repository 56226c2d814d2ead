"""The ``echo`` engine: no model, deterministic output, for control-plane tests and benchmarks.

It streams back the words of the last message (or the prompt), one word per token, up to
``max_tokens``, with an optional per-token delay. Output and usage are always labelled ``echo``.
A continued request (``continuation`` set) goes on after the words the continuation already holds, so a
stream moved from a lost worker reads exactly as if it had never moved.

With ``prompt_cache_entries`` it keeps a SIMULATED prompt cache (:mod:`mlxcluster.worker.echo_cache`):
the output is the same, usage reports ``cached_tokens`` and the cache's digests reach the listener.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from mlxcluster.protocol import (
    Done,
    Error,
    InferenceRequest,
    PromptCacheStats,
    Timings,
    Token,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from mlxcluster.worker.echo_cache import SimulatedPromptCache
from mlxcluster.worker.engine_base import CacheListener, Engine, EngineFrame, EngineInfo

ECHO_MODEL = "echo"


def echo_words(request: InferenceRequest) -> tuple[list[str], int]:
    """The words to echo and the prompt's word count (the echo engine's "tokens")."""
    if request.messages:
        source = request.messages[-1].content
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
    else:
        source = request.prompt or ""
        prompt_tokens = len(source.split())
    words = source.split() or ["echo"]
    return [w if i == 0 else " " + w for i, w in enumerate(words)], prompt_tokens


def continued_words(words: list[str], continuation: str | None) -> list[str]:
    """The words still to echo after ``continuation`` (text a previous worker already produced)."""
    return words[len(continuation.split()) :] if continuation else words


def _certain(word: str, request: InferenceRequest) -> list[TokenLogprob] | None:
    """Echo's logprobs: each word is certain (log-probability 0), and it is its own only alternative."""
    if not request.logprobs:
        return None
    entry = TokenLogprob(token=word, logprob=0.0, bytes=list(word.encode()))
    if request.top_logprobs:
        entry.top = [TopLogprob(token=word, logprob=0.0, bytes=entry.bytes)]
    return [entry]


class EchoEngine(Engine):
    """Deterministic tokens with a fixed delay; serves the model names it is given."""

    def __init__(
        self, *, models: list[str] | None = None, token_delay_ms: float = 0.0, prompt_cache_entries: int = 0
    ) -> None:
        self.models = models or [ECHO_MODEL]
        self.token_delay_s = token_delay_ms / 1000
        self.prompt_cache = SimulatedPromptCache(prompt_cache_entries) if prompt_cache_entries > 0 else None
        details = {"token_delay_ms": str(self.token_delay_s * 1000)}
        if self.prompt_cache is not None:
            details["prompt_cache"] = f"simulated, {self.prompt_cache.max_entries} conversations"
        self._info = EngineInfo(name="echo", models=list(self.models), details=details)
        """Built once: the worker asks for it on every request (which models it serves)."""

    async def start(self) -> None:
        """Nothing to load."""

    async def stop(self) -> None:
        """Nothing to release."""

    def info(self) -> EngineInfo:
        return self._info

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        return self.prompt_cache.stats() if self.prompt_cache is not None else None

    def set_cache_listener(self, listener: CacheListener | None) -> None:
        if self.prompt_cache is not None:
            self.prompt_cache.set_listener(listener)

    def cache_digests(self) -> list[int]:
        return self.prompt_cache.digests() if self.prompt_cache is not None else []

    async def generate(self, request: InferenceRequest) -> AsyncGenerator[EngineFrame, None]:
        started = time.perf_counter()
        if request.response_format is not None and request.response_format.type != "text":
            yield Error(code="invalid_request", message="the echo engine cannot enforce response_format")
            return
        if request.tools and request.tool_choice in ("required", "function"):
            yield Error(code="invalid_request", message="the echo engine cannot force a tool call")
            return
        words, prompt_tokens = echo_words(request)
        words = continued_words(words, request.continuation)
        text_so_far = request.continuation or ""
        cache = self.prompt_cache
        cached_tokens = cache.lookup(request, prompt_tokens) if cache is not None else 0
        emitted = 0
        first_at: float | None = None
        finish = "stop"
        stop_sequence: str | None = None
        for word in words:
            if emitted >= request.max_tokens:
                finish = "length"
                break
            if request.deadline is not None and time.time() > request.deadline:
                yield Error(code="deadline_exceeded", message="request deadline passed on the worker")
                return
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            candidate = text_so_far + word
            hit = min((s for s in request.stop if s and s in candidate), key=candidate.index, default=None)
            if hit is not None:
                tail = candidate[: candidate.index(hit)][len(text_so_far) :]
                if tail:
                    text_so_far += tail
                    yield Token(text=tail, logprobs=_certain(tail, request))
                    emitted += 1
                stop_sequence = hit
                break
            text_so_far = candidate
            first_at = first_at or time.perf_counter()
            yield Token(text=word, logprobs=_certain(word, request))
            emitted += 1
        total_s = time.perf_counter() - started
        ttft_s = (first_at - started) if first_at else total_s
        if cache is not None:
            cache.store(request, text_so_far)
        yield Done(
            finish_reason=finish,  # type: ignore[arg-type]
            stop_sequence=stop_sequence,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=emitted,
                total_tokens=prompt_tokens + emitted,
                cached_tokens=cached_tokens,
            ),
            timings=Timings(
                ttft_ms=ttft_s * 1000,
                total_ms=total_s * 1000,
                tokens_per_second=emitted / total_s if total_s > 0 else 0.0,
            ),
        )
