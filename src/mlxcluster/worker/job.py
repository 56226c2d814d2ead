"""One request inside the mlx engine, from its preparation to its last frame.

The asyncio side creates a :class:`Job` once the request is prepared and reads its frames; the
generation thread owns everything else. Frames cross into asyncio with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlxcluster.protocol import Error, InferenceRequest, Progress, Token
from mlxcluster.worker.engine_base import EngineFrame

if TYPE_CHECKING:
    from mlxcluster.worker.job_output import JobOutput
    from mlxcluster.worker.preparation import PreparedRequest


@dataclass(eq=False)
class Job:
    """One request's state; the asyncio side owns ``frames``/``held``, the generation thread the rest."""

    request: InferenceRequest
    prepared: PreparedRequest
    output: JobOutput
    loop: asyncio.AbstractEventLoop
    frames: asyncio.Queue[EngineFrame]
    submitted: float
    cancelled: bool = False
    # asyncio side
    held: EngineFrame | None = None
    # generation thread side
    uid: int | None = None
    admitted: float = 0.0
    admission: int = 0
    """The turn of the generation loop that put it into the batch (requests admitted together share it)."""
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    """Tokens generated so far (each one fed back to the model)."""
    processors: list[Any] = field(default_factory=list)
    sampler: Any = None
    fault: BaseException | None = None
    """The first exception this request's sampler or logits processors raised in a step."""
    suspect: bool = False
    """It was new in a step that failed for no known reason: admitted alone until it has produced a token."""
    failures: int = 0
    finished: bool = False

    @property
    def prompt(self) -> list[int]:
        return self.prepared.prompt

    def emit(self, frame: EngineFrame) -> None:
        """Hand a frame to the request's event loop (dropped once the stream has ended)."""
        if self.finished:
            return
        if not isinstance(frame, Token | Progress):
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.frames.put_nowait, frame)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def fail(self, code: str, message: str, *, retryable: bool = False, param: str | None = None) -> None:
        self.emit(Error(code=code, message=message, retryable=retryable, param=param))
