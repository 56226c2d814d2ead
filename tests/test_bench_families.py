"""Issue 19's benchmarks in their smallest form, on the model-family fixtures (``families.py``).

The figures mean nothing at this size; what is asserted is that each benchmark runs its real paths (both
servers on a fixture dir, a cached long prompt joining running streams, sampled outputs checked, engines fuzzed
with an injected fault) and counts exactly what it was asked for. Each takes a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from families import FamilyModels

from mlxcluster.bench.arrivals import ArrivalSettings, format_arrivals, run_arrivals
from mlxcluster.bench.family_dirs import MissingFamilies, family_dirs
from mlxcluster.bench.family_turns import run_family
from mlxcluster.bench.fuzz import FuzzSettings, format_fuzz, outcome_of, run_fuzz
from mlxcluster.bench.multiturn import MultiturnResult, Settings, run_multiturn
from mlxcluster.bench.multiturn_format import format_multiturn
from mlxcluster.bench.strict_json import MODES, check_output, format_strict, run_strict_json, spread
from mlxcluster.protocol import Done, Error, ToolCall

pytestmark = pytest.mark.timeout(180)


def test_family_dirs_say_how_to_build_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(MissingFamilies, match="python tests/families.py"):
        family_dirs(None, ("gemma3",))
    (tmp_path / "gemma3").mkdir()
    (tmp_path / "gemma3" / "config.json").write_text("{}")
    assert family_dirs(tmp_path, ("gemma3",)) == {"gemma3": tmp_path / "gemma3"}
    with pytest.raises(MissingFamilies, match=f"python tests/families.py {tmp_path} qwen3_next"):
        family_dirs(tmp_path, ("gemma3", "qwen3_next"))


async def test_part_f_without_fixtures_says_how_to_get_them(tmp_path: Path) -> None:
    result = await run_multiturn(str(tmp_path / "demo"), parts="f", families_dir=None)
    assert result.families == [] and "tests/families.py" in result.families_note
    text = format_multiturn(result)
    assert "f) the prompt cache per model family" in text and "not run" in text


async def test_part_f_runs_both_servers_on_a_fixture(family_models: FamilyModels) -> None:
    """Gemma 3's rolling window: mlxcluster and mlx_lm.server each answer every turn and report cached tokens."""
    path = family_models.path("gemma3")
    family = await run_family("gemma3", path, turns=3, system_tokens=60, max_tokens=4)
    assert family.error == "" and family.cache.startswith("sliding window")
    for samples in (family.ours, family.theirs):
        assert [s.turn for s in samples] == [1, 2, 3]
        assert all(s.prompt_tokens > 60 for s in samples)  # the system prompt, as asked, rolls the 16-token window
        assert samples[2].prompt_tokens > samples[1].prompt_tokens > samples[0].prompt_tokens  # history resent
    assert family.ours_summary is not None and family.theirs_summary is not None
    assert family.ours_summary.later_samples == 2 and family.met is not None
    result = MultiturnResult(machine="m", model="demo", quick=False, settings=Settings(turns=3), parts="f")
    result.families = [family]
    text = format_multiturn(result)
    assert "bench multiturn --parts f — the model-family fixtures" in text
    assert "gemma3: later turns cached" in text and "vs mlx_lm.server" in text


async def test_arrivals_measure_each_mode_with_a_cached_long_prompt(family_models: FamilyModels) -> None:
    settings = ArrivalSettings(
        streams=2, stream_tokens=48, tools=15, arrival_tokens=2, max_arrivals=1, pause_s=0.0, rounds=1
    )
    result = await run_arrivals(str(family_models.path("qwen3")), settings)
    assert [row.mode for row in result.rows] == ["none", "long", "short"]
    for row in result.rows:
        assert row.stream_tokens == 2 * 48  # the end tokens are banned: every stream runs its length
        assert row.gaps == 2 * 46  # from each stream's 2nd token on
        assert 0 < row.gap_p50_ms <= row.gap_p99_ms <= row.gap_max_ms
    none, long, short = result.rows
    assert none.arrivals == 0 and long.arrivals == 1 and short.arrivals == 1
    assert long.arrival_errors == [] and short.arrival_errors == []
    assert long.arrival_prompt_tokens > 1500 and long.arrival_cached_share > 0.99  # the tool list was cached
    assert short.arrival_prompt_tokens < 100
    assert result.p99_ratio > 0 and result.control_p99_ratio > 0
    assert "p99 gap with long arrivals / without" in format_arrivals(result)


def test_strict_json_checks_are_strict_and_follow_the_schema() -> None:
    assert check_output("json_schema", '{"answer": "hi", "sure": true}', [], None) is None
    assert "json.loads" in (check_output("json_schema", '{"answer": "a\x01", "sure": true}', [], None) or "")
    import jsonschema  # type: ignore[import-untyped]

    validate = jsonschema.validate
    assert "schema" in (check_output("json_schema", '{"answer": "far too long here", "sure": 1}', [], validate) or "")
    call = ToolCall(name="get_weather", arguments='{"city": "Oslo", "days": 3}')
    assert check_output("tool_call", "", [call], validate) is None
    assert "one call" in (check_output("tool_call", "hi", [call], validate) or "")
    assert check_output("json_object", "[1]", [], validate) is not None
    assert [len(seeds) for family in spread(10, ["a", "b"]).values() for seeds in family.values()] == [2, 2, 2, 2, 1, 1]


async def test_strict_json_counts_every_sampled_generation(family_models: FamilyModels) -> None:
    paths = {name: family_models.path(name) for name in ("qwen3", "gemma3")}
    result = await run_strict_json(paths, total=12, streams=4, max_tokens=48)
    assert result.schema_checked and result.requests == 12
    assert [(c.family, c.mode) for c in result.counts] == [(f, m) for f in paths for m in MODES]
    for count in result.counts:
        assert count.requests == 2 and count.errors == 0
        assert count.finished + count.cut == 2 and count.passed + count.failed == count.finished
    assert all(c.finished == 2 for c in result.counts if c.mode != "json_object")  # bounded: the grammar ends them
    assert sum(c.failed for c in result.counts) == 0 and result.failures == []
    assert "finished outputs that fail: 0 of" in format_strict(result)


def test_fuzz_outcomes_allow_only_request_errors_and_the_injected_fault() -> None:
    assert outcome_of(Done(finish_reason="length")) == ("done length", True)
    assert outcome_of(Done(), called=True) == ("done tool_calls", True)
    assert outcome_of(Error(code="invalid_request", message="")) == ("error invalid_request", True)
    assert outcome_of(Error(code="engine_error", message="")) == ("error engine_error", False)
    assert outcome_of(Error(code="engine_error", message=""), injected=True) == ("error engine_error (injected)", True)
    assert outcome_of(Done(), injected=True)[1] is False  # the injected fault must show
    assert outcome_of(Error(code="shutting_down", message=""))[1] is False
    assert outcome_of(None)[1] is False


async def test_fuzz_sends_what_it_was_asked_and_no_engine_dies(family_models: FamilyModels) -> None:
    paths = {name: family_models.path(name) for name in ("qwen3", "mistral")}
    settings = FuzzSettings(requests=30, inject_every=10, in_flight_per_engine=4, max_concurrent=2, time_limit_s=120)
    result = await run_fuzz(paths, settings)
    assert (result.sent, result.not_sent) == (30, 0)
    assert sum(result.outcomes.values()) == 30
    assert sum(sum(counts.values()) for counts in result.by_family.values()) == 30
    assert result.injected == 3 and result.injected_ended_as_injected == 3
    assert all(counts.get("error engine_error (injected)") for counts in result.by_family.values())  # each engine
    assert result.violations == 0, result.examples
    assert result.engine_failures == {} and set(result.probes) == set(paths)
    assert result.ok, result.probes
    assert json.loads(result.to_json())["sent"] == 30
    assert "engine deaths: 0" in format_fuzz(result)
