"""``bench embeddings`` in its quick form on the tiny embedding fixture: the real cluster processes (nats-server,
controller, worker) and the in-process forward both embed every input; the table states the ratios and sizes.
The figures mean nothing at this size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from embedding_model import build_embedding_model
from typer.testing import CliRunner

from mlxcluster.bench.embeddings import (
    EmbeddingsResult,
    EmbeddingsRow,
    PackageSize,
    corpus,
    extra_packages,
    format_embeddings,
    run_embeddings,
)
from mlxcluster.bench.report import SECTIONS, section_args
from mlxcluster.cli import app

pytestmark = pytest.mark.timeout(120)


def test_table_and_ratio() -> None:
    rows = [
        EmbeddingsRow("cluster", 32, 512, 51200, 2.0, 256.0, 25600.0),
        EmbeddingsRow("in-process", 32, 512, 51200, 1.8, 284.4, 28444.4),
    ]
    result = EmbeddingsResult(
        "m", False, 100.0, rows, pyz_bytes=90_000_000, extra_packages=[PackageSize("x", "1", 2_000_000)]
    )
    assert result.ratio(32) == pytest.approx(0.9, abs=0.01) and result.ratio(8) is None
    text = format_embeddings(result)
    assert "32 concurrent: cluster / in-process tokens/s = 0.90× (target ≥ 0.9×)" in text
    assert "zipapp (base, no extras): 90.0 MB" in text and "x 2.0 MB" in text
    assert json.loads(result.to_json())["rows"][0]["target"] == "cluster"
    assert len(set(corpus(50, 8))) == 50
    assert {p.name for p in extra_packages()} >= {"mlx-embeddings"}
    section = next(s for s in SECTIONS if s.name == "embeddings")
    assert section_args(section, quick=True, families_dir=Path("/f")) == [
        "embeddings",
        "--quick",
        "--families-dir",
        "/f",
    ]


async def test_quick_run_on_the_fixture(tmp_path: Path) -> None:
    try:
        model = build_embedding_model(tmp_path / "tiny-embed")
    except FileNotFoundError:
        pytest.skip("the demo model (whose tokenizer the fixture uses) has not been made")
    result = await run_embeddings(str(model), quick=True, inputs=16, words=6, pyz=tmp_path / "none.pyz")
    assert [(r.target, r.concurrency) for r in result.rows] == [
        ("cluster", 1),
        ("in-process", 1),
        ("cluster", 8),
        ("in-process", 8),
    ]
    assert all(r.inputs == 16 and r.tokens > 16 and r.tokens_per_s > 0 for r in result.rows)
    assert len({r.tokens for r in result.rows}) == 1  # both count the same tokens
    assert result.pyz_bytes is None and "8 concurrent" in format_embeddings(result)


def test_cli_without_a_model_says_how_to_get_one(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["bench", "embeddings", "--families-dir", str(tmp_path)])
    assert out.exit_code == 0 and "tests/embedding_model.py" in out.output
