"""The one table helper of the CLI and the benchmarks: a rich table on a terminal, plain aligned text otherwise.

Plain text is what scripts, pipes, tests and ``bench report`` get: a header line (when there is one), then
one line per row, columns two spaces apart, no rule and no wrapping, trailing blanks stripped, so
``line.split()`` and ``grep`` work on it. On a terminal the same cells go through rich (imported only then).
``--json`` output never comes through here.
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Literal, TextIO

Style = Literal["plain", "rich"]
NOTE_MARK = "↳ "
"""Starts a note: a line under its row (a plugin's failure, say)."""


def output_style(stream: TextIO | None = None) -> Style:
    """``rich`` when ``stream`` (default: stdout) is a terminal, else ``plain``."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "rich" if callable(isatty) and isatty() else "plain"


def table(
    headers: Sequence[str] | None,
    rows: Sequence[Sequence[str]],
    *,
    align: str = "",
    notes: Mapping[int, str] | None = None,
    style: Style | None = None,
) -> str:
    """Render ``rows`` under ``headers`` (``None``: no header line, a key/value listing say).

    ``align`` holds one letter per column, ``l`` or ``r`` (missing letters are ``l``). ``notes`` maps a row's
    index to a line shown under it. ``style`` defaults to :func:`output_style` of stdout.
    """
    width = len(headers) if headers is not None else max((len(row) for row in rows), default=0)
    cells = [[str(cell) for cell in row] + [""] * (width - len(row)) for row in rows]
    justify = [("r" if align[i : i + 1] == "r" else "l") for i in range(width)]
    if (style or output_style()) == "rich":
        return _rich(list(headers) if headers is not None else None, cells, justify, notes or {})
    return _plain(list(headers) if headers is not None else None, cells, justify, notes or {})


def _plain(headers: list[str] | None, cells: list[list[str]], justify: list[str], notes: Mapping[int, str]) -> str:
    lines = ([headers] if headers is not None else []) + cells
    if not lines or not justify:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(justify))]
    last = len(justify) - 1

    def render(line: list[str]) -> str:
        padded = [
            cell.rjust(w) if how == "r" else (cell if i == last else cell.ljust(w))
            for i, (cell, w, how) in enumerate(zip(line, widths, justify, strict=True))
        ]
        return "  ".join(padded).rstrip()

    out = [render(headers)] if headers is not None else []
    for index, row in enumerate(cells):
        out.append(render(row))
        if index in notes:
            out.append(f"    {NOTE_MARK}{notes[index]}")
    return "\n".join(out)


def _rich(headers: list[str] | None, cells: list[list[str]], justify: list[str], notes: Mapping[int, str]) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    grid = Table(
        box=box.SIMPLE_HEAD if headers is not None else None,
        show_header=headers is not None,
        header_style="bold",
        show_edge=False,
        pad_edge=False,
    )
    for index, how in enumerate(justify):
        title = headers[index] if headers is not None else ""
        key = headers is None and index == 0  # a key/value listing: the keys stand out
        grid.add_column(title, justify="right" if how == "r" else "left", style="bold" if key else None)
    for index, row in enumerate(cells):
        grid.add_row(*(Text(cell) for cell in row))  # Text: a cell's "[...]" is not markup
        if index in notes:
            grid.add_row(*([Text("")] * (len(justify) - 1)), Text(NOTE_MARK + notes[index], style="red"))
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=True, width=shutil.get_terminal_size().columns).print(grid)
    return buffer.getvalue().rstrip("\n")
