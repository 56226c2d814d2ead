"""The one table helper: plain aligned text off a terminal (what scripts and tests read), rich on a terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from mlxcluster.tables import output_style, table

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_plain_columns_align_without_rule_or_trailing_blanks() -> None:
    text = table(
        ["NAME", "SIZE MB", "SOURCE"], [["a", "1.5", "x y"], ["longer", "123.0", "z"]], align="lr", style="plain"
    )
    assert text.splitlines() == [
        "NAME    SIZE MB  SOURCE",
        "a           1.5  x y",
        "longer    123.0  z",
    ]


def test_plain_last_column_is_not_padded_and_rows_are_padded_to_the_header() -> None:
    text = table(["A", "B"], [["x", "a long last cell"], ["yy"]], style="plain")
    assert text.splitlines() == ["A   B", "x   a long last cell", "yy"]


def test_plain_key_value_listing_and_notes() -> None:
    listing = table(None, [["controller", "c1 (ready)"], ["nats", "connected"]], style="plain")
    assert listing.splitlines() == ["controller  c1 (ready)", "nats        connected"]
    noted = table(
        ["NAME", "STATUS"], [["good", "loaded"], ["bad", "failed"]], notes={1: "ImportError: x"}, style="plain"
    )
    assert noted.splitlines() == ["NAME  STATUS", "good  loaded", "bad   failed", "    ↳ ImportError: x"]


def test_plain_never_wraps_a_long_row() -> None:
    cell = "d" * 500
    [_, row] = table(["N", "DESCRIPTION"], [["n", cell]], style="plain").splitlines()
    assert row == "n  " + cell


def test_empty_tables() -> None:
    assert table(["A", "B"], [], style="plain") == "A  B"
    assert table(None, [], style="plain") == ""


def test_rich_draws_a_header_rule_and_keeps_brackets_literal() -> None:
    text = ANSI.sub("", table(["NAME", "NOTE"], [["[red]x[/red]", "ok"]], style="rich"))
    header, rule, row = text.splitlines()
    assert header.split() == ["NAME", "NOTE"]
    assert set(rule.strip()) == {"─"}
    assert row.split() == ["[red]x[/red]", "ok"]  # a cell is text, never rich markup


def test_rich_shows_a_note_under_its_row() -> None:
    text = ANSI.sub("", table(["NAME", "STATUS"], [["bad", "failed"]], notes={0: "ImportError: x"}, style="rich"))
    *_, row, note = text.splitlines()
    assert row.split() == ["bad", "failed"] and note.strip() == "↳ ImportError: x"


def test_output_style_follows_the_stream() -> None:
    assert output_style(io.StringIO()) == "plain"
    primary, secondary = os.openpty()
    try:
        with os.fdopen(secondary, "w", closefd=False) as terminal:
            assert output_style(terminal) == "rich"
    finally:
        os.close(primary)
        os.close(secondary)


def _on_a_terminal(*args: str, cwd: Path) -> str:
    """``python -m mlxcluster ARGS`` with its stdout on a pseudo-terminal; what it printed there."""
    primary, secondary = os.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXCLUSTER_")} | {"COLUMNS": "200"}
    with subprocess.Popen(
        [sys.executable, "-m", "mlxcluster", *args], cwd=cwd, env=env, stdout=secondary, stderr=subprocess.PIPE
    ) as proc:
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    os.close(primary)
    return ANSI.sub("", b"".join(chunks).decode())


def test_a_command_on_a_terminal_prints_a_rich_table_and_plain_text_into_a_pipe(tmp_path: Path) -> None:
    shown = _on_a_terminal("plugins", cwd=tmp_path).splitlines()
    assert shown[0].split() == ["NAME", "VERSION", "STATUS", "SOURCE", "HOOKS"]
    assert set(shown[1].strip()) == {"─"}
    assert any(line.split()[:3] == ["builtin-balancers", "0.1.0", "loaded"] for line in shown)
    piped = subprocess.run(
        [sys.executable, "-m", "mlxcluster", "plugins"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STATUS", "SOURCE", "HOOKS"]
    assert "─" not in piped.stdout and "\x1b[" not in piped.stdout
