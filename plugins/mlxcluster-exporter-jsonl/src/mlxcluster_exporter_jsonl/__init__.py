"""``jsonl``: one JSON line per finished request, appended to the file named by the ``path`` setting."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

import msgspec

from mlxcluster.api import MetricsEvent, Register, RequestFinished, hookimpl

__version__ = "0.1.0"


class RequestLine(msgspec.Struct, kw_only=True):
    """One line of the file."""

    time: float
    request_id: str
    model: str
    worker: str | None
    status: str
    error: str | None
    ttft_s: float | None
    duration_s: float
    inter_token_s: float | None
    """Mean seconds per token between token frames (``None``: fewer than two token frames)."""
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    stream: bool


def request_line(event: RequestFinished) -> RequestLine:
    """The flat record written for ``event``."""
    gaps = event.inter_token_s
    return RequestLine(
        time=event.time,
        request_id=event.request_id,
        model=event.model,
        worker=event.worker,
        status=event.status,
        error=event.error,
        ttft_s=event.ttft_s,
        duration_s=event.duration_s,
        inter_token_s=sum(gaps) / len(gaps) if gaps else None,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        attempts=event.attempts,
        stream=event.stream,
    )


class JsonlExporter:
    """Appends a line per finished request (every event with ``all_events``) to ``path``.

    ``export`` is a plain function: the controller calls it on this exporter's own thread, so file I/O
    never blocks the event loop. Lines are flushed as they are written.
    """

    def __init__(self, path: str, all_events: bool = False) -> None:
        if not path:
            raise ValueError("path must name a file")
        self.path = Path(path).expanduser()
        self.all_events = all_events
        self._encoder = msgspec.json.Encoder()
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Open the file for appending (creating its directory)."""
        with self._lock:
            self._open()

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        return self._file

    def export(self, event: MetricsEvent) -> None:
        """Write ``event`` as one line, if it is a finished request (or ``all_events`` is set)."""
        if isinstance(event, RequestFinished):
            record: msgspec.Struct = request_line(event)
        elif self.all_events:
            record = event
        else:
            return
        line = self._encoder.encode(record) + b"\n"
        with self._lock:
            file = self._open()
            file.write(line)
            file.flush()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


@hookimpl
def mlxcluster_register_exporters(register: Register) -> None:
    """Register ``jsonl``."""
    register("jsonl", JsonlExporter, "One JSON line per finished request in a file (settings: path, all_events).")
