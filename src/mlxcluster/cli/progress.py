"""Progress of ``models demo`` and ``models import``: rich progress bars on a terminal, one line per stage otherwise.

The model code reports ``(stage, done, total, unit)`` (:class:`mlxcluster.models.gguf.ProgressFn`); each new
stage is a new bar (bytes and a speed for a download or an extraction, ``done/total`` for tensors, a spinner
while the total is unknown) and the one before it is shown finished. Off a terminal (a pipe, a log, a test)
each stage is one line, ``stage...``, written when it starts.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text


class _Amount(ProgressColumn):
    """Bytes (``12.3/98.4 MB``, its speed) for a ``bytes`` stage, ``done/total`` for a counted one, nothing
    while the total is unknown."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes, self._speed, self._count = DownloadColumn(), TransferSpeedColumn(), MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        if not task.fields.get("known"):
            return Text("")
        if task.fields.get("unit") == "bytes":
            return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))
        return self._count.render(task)


class StageProgress:
    """A progress callback for the model commands; use it as a context manager, so a bar left running
    is closed (and the terminal's cursor given back) when the command ends, error or not."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        self._live = self._stream.isatty() if live is None else live
        self._stage: str | None = None
        self._task: TaskID | None = None
        self._bars: Progress | None = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close(finished=kind is None)

    def __call__(self, stage: str, done: int, total: int, unit: str = "") -> None:
        if not self._live:
            if stage != self._stage:
                self._stage = stage
                self._stream.write(f"{stage}...\n")
                self._stream.flush()
            return
        bars = self._bars if self._bars is not None else self._start()
        if stage != self._stage or self._task is None:
            self._finish_task()
            self._stage = stage
            self._task = bars.add_task(stage, total=None, unit=unit, known=False)
        if total:
            bars.update(self._task, completed=done, total=total, known=True)

    def _start(self) -> Progress:
        console = Console(file=self._stream, force_terminal=True)
        self._bars = Progress(
            SpinnerColumn(finished_text="✓"),
            TextColumn("{task.description}"),
            BarColumn(),
            _Amount(),
            TimeElapsedColumn(),
            console=console,
        )
        self._bars.start()
        return self._bars

    def _finish_task(self) -> None:
        """Show the current stage as done (a spinner's bar full)."""
        if self._bars is None or self._task is None:
            return
        task = next(t for t in self._bars.tasks if t.id == self._task)
        total = task.total or max(task.completed, 1)
        self._bars.update(self._task, total=total, completed=total)
        self._bars.stop_task(self._task)

    def close(self, *, finished: bool = True) -> None:
        """End the display; the last stage is shown done only when the command ``finished``."""
        if self._bars is not None:
            if finished:
                self._finish_task()
            self._bars.stop()
        self._bars, self._task, self._stage = None, None, None
