"""``bench models`` (issue 20's fleet targets) in its smallest form on the model-family fixtures, and its table.

The figures mean nothing at this size; what is asserted is that each part runs its real path (a controller and
the real worker role over NATS, loads on demand and by the admin routes, evictions under a budget, admission by
bytes) and counts what it was asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from families import FamilyModels

from mlxcluster.bench.models import LoadSample, ModelsResult, ModelsSettings, TargetRow, format_models, run_models
from mlxcluster.bench.report import SECTIONS, section_args

pytestmark = pytest.mark.timeout(120)

TINY = ModelsSettings(
    load_model="mistral",
    repetitions=1,
    first_tokens=4,
    concurrent_first=3,
    pair=("llama3", "mistral"),
    alternations=2,
    pair_tokens=4,
    admission_model="mistral",
    concurrent_long=3,
    fit=1,
    long_prompt_words=60,
    long_tokens=8,
)


def test_the_table_states_each_target_its_value_and_whether_it_was_met() -> None:
    result = ModelsResult(machine="m", settings=ModelsSettings.quick(), quick=True)
    result.rows = [
        TargetRow("1. load on demand", "first 500 ms = 0.90× (load 400 + warm 150 ms)", "≤ 1.2×", True, "qwen3"),
        TargetRow("3. budget holds one of two models", "2/4 answered 200", "0 failures", False),
    ]
    result.samples = [LoadSample(first_s=0.5, load_s=0.4, warm_s=0.15, after_load_s=0.2)]
    result.notes = ["part 3 back to back: why"]
    text = format_models(result)
    assert "bench models" in text and "(quick)" in text
    assert "0.90×" in text and "≤ 1.2×" in text and "↳ qwen3" in text
    lines = text.splitlines()
    assert next(line for line in lines if line.startswith("1. load")).rstrip().endswith("met")
    assert next(line for line in lines if line.startswith("3. budget")).rstrip().endswith("NOT met")
    assert "first 0.500 / load 0.400 + warm 0.150" in text and "note: part 3 back to back: why" in text
    assert json.loads(result.to_json())["rows"][1]["met"] is False


async def test_every_part_runs_on_the_fixtures(family_models: FamilyModels) -> None:
    paths = {name: family_models.path(name) for name in TINY.families()}
    result = await run_models(paths, TINY)
    assert not [n for n in result.notes if "failed:" in n], result.notes
    rows = {row.part: row for row in result.rows}
    assert list(rows) == [
        "1. load on demand",
        "2. 3 concurrent first requests",
        "3. budget holds one of two models",
        "3. budget holds one of two models (paced)",
        "4. admission by bytes (3 long requests)",
    ], format_models(result)
    assert len(result.samples) == 1 and min(s.first_s for s in result.samples) > 0
    assert rows["2. 3 concurrent first requests"].met, format_models(result)  # one load, three answers
    assert rows["3. budget holds one of two models (paced)"].met, format_models(result)
    admission = rows["4. admission by bytes (3 long requests)"]
    assert admission.met and "at most 1 at once" in admission.measured, format_models(result)


def test_bench_report_runs_it_on_the_fixtures_and_quick() -> None:
    (section,) = [s for s in SECTIONS if s.name == "models"]
    assert section_args(section, quick=True, families_dir=Path("/f")) == ["models", "--quick", "--families-dir", "/f"]
