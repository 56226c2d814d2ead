"""The engine interface every worker engine implements (``mlx`` and ``echo``).

An engine turns an admitted :class:`InferenceRequest` into an async stream of frames: zero or more
:class:`Token` frames, then exactly one :class:`Done` or :class:`Error`. Admission (concurrency
bound and queue) is the worker service's job; an engine sees at most ``max_concurrent`` requests.
Closing the iterator early (``aclose()`` or task cancellation) cancels the request: the engine stops
generating for it within one token. Tokens that are ready together (the consumer was slower than
generation) are merged into one Token frame with ``count`` set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from msgspec import Struct

from mlxcluster.protocol import Done, Error, InferenceRequest, Token

EngineFrame = Token | Done | Error


class EngineInfo(Struct, kw_only=True):
    """What an engine reports about itself (logged at start, shown by ``doctor`` and registration)."""

    name: str
    models: list[str]
    details: dict[str, str] = {}


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
    def generate(self, request: InferenceRequest) -> AsyncIterator[EngineFrame]:
        """Stream frames for one request: Tokens, then one Done or Error."""
