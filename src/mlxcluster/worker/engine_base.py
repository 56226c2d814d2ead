"""The engine interface every worker engine implements (``mlx`` and ``echo``).

An engine turns an admitted :class:`InferenceRequest` into an async stream of frames: zero or more
:class:`Token` frames, then exactly one :class:`Done` or :class:`Error`. Admission (concurrency
bound and queue) is the worker service's job; an engine sees at most ``max_concurrent`` requests.
Closing the iterator early (``aclose()`` or task cancellation) cancels the request: the engine stops
generating for it within one token. Tokens that are ready together (the consumer was slower than
generation) are merged into one Token frame with ``count`` set. Engines do not number frames: the worker's
stream writer (:class:`mlxcluster.bus.ReplyWriter`) does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable

from msgspec import Struct

from mlxcluster.protocol import (
    Done,
    EmbedRequest,
    EmbedResult,
    Error,
    InferenceRequest,
    Progress,
    PromptCacheStats,
    SpeculationCounts,
    Token,
)

EngineFrame = Progress | Token | Done | Error

CacheListener = Callable[[list[int], list[int]], None]
"""Called as ``listener(stored, removed)`` with prefix digests (see :mod:`mlxcluster.prefix_digest`)
whenever the engine's prompt cache changes; it may be called from the engine's own thread."""


class EngineInfo(Struct, kw_only=True):
    """What an engine reports about itself (logged at start, shown by ``doctor`` and registration)."""

    name: str
    models: list[str]
    details: dict[str, str] = {}
    vision: bool = False
    """Its models read images (the mlx-vlm engine)."""


class Engine(ABC):
    """Base class of worker engines."""

    @abstractmethod
    async def start(self) -> None:
        """Load the model and start any generation thread."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop generating and release the thread; pending streams end with an Error frame."""

    @abstractmethod
    def info(self) -> EngineInfo:
        """Name, served model names and details such as BLAS and weight dtype."""

    @abstractmethod
    def generate(self, request: InferenceRequest) -> AsyncGenerator[EngineFrame, None]:
        """Stream frames for one request: Progress while a long prompt prefills, Tokens, then one
        Done or Error."""

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """The vectors of an embedding request; a chat engine refuses it (an ``invalid_request`` naming
        ``model``): only an embedding model's engine embeds."""
        return EmbedResult(
            error=Error(
                code="invalid_request",
                message=f"'{request.model}' is a chat model: it does not make embeddings; use an embedding model",
                param="model",
            )
        )

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        """Reuse and size of the engine's prompt cache; ``None`` when it has none."""
        return None

    def speculation_stats(self) -> SpeculationCounts | None:
        """Drafted and accepted tokens of the engine's speculative decoding; ``None`` when it does not speculate."""
        return None

    def set_cache_listener(self, listener: CacheListener | None) -> None:
        """Be told of prefix digests the prompt cache stores and drops (engines without one: never)."""
        return None

    def cache_digests(self) -> list[int]:
        """Every prefix digest the prompt cache holds now (for a full snapshot)."""
        return []

    @property
    def prompt_cache_nbytes(self) -> int:
        """Bytes the prompt cache holds now (read from any thread; engines without one: 0)."""
        stats = self.prompt_cache_stats()
        return stats.bytes if stats is not None else 0

    def shrink_prompt_cache(self, target_bytes: int) -> None:
        """Ask the prompt cache to drop entries until it holds at most ``target_bytes`` (soon, from its own
        thread; engines without one: nothing to do)."""
        return None

    def set_failure_listener(self, listener: Callable[[str], None] | None) -> None:
        """Be told (from any thread) why the engine can no longer serve, if that happens (engines that
        cannot fail that way: never)."""
        return None
