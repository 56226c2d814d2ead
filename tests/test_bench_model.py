"""The model benchmarks run on the tiny random-weight llama (``tiny_model.py``) with a few tokens each.

The figures of such a model mean nothing; what is asserted is that each benchmark runs its real paths
(in-process engine, a worker subprocess over NATS, mlx_lm.server side by side) and that its report
counts exactly the tokens and streams it was asked for.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import pytest
from tiny_model import build_tiny_model

from mlxcluster.bench import engine as engine_bench
from mlxcluster.bench import grammar as grammar_bench
from mlxcluster.bench import versus
from mlxcluster.bench.group import GROUP_SIZE, format_table, peak_rss_mb, run_group_bench, sharded_weights_mb

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


async def test_bench_engine_in_process_and_over_nats(tiny_model: Path) -> None:
    result = await engine_bench.run_engine_bench(
        model_path=str(tiny_model), served_name="tiny", streams=2, max_tokens=8
    )
    assert result.model == "tiny" and result.max_tokens == 8
    paths = [(row.path, row.streams) for row in result.rows]
    assert paths == [
        ("engine in-process", 1),
        ("engine in-process", 2),
        ("worker over NATS", 1),
        ("worker over NATS", 2),
    ]
    for row in result.rows:
        assert row.tokens == 8 * row.streams  # the tiny model never stops early: max_tokens each
        assert row.tokens_per_s > 0 and row.ttft_p50_ms > 0
    assert result.worker_vs_inprocess_single > 0 and result.concurrent_speedup > 0
    assert "blas" in result.details or "weights_dtype" in result.details
    assert "worker over NATS" in engine_bench.format_table(result)


def test_served_name_of_a_model_dir_is_its_directory(tiny_model: Path) -> None:
    assert engine_bench._served(str(tiny_model), "ignored") == "tiny"
    assert engine_bench._served("org/some-repo", "some-repo") == "some-repo"


async def test_bench_grammar_compiles_schemas_and_runs_both_modes(tiny_model: Path) -> None:
    result = await grammar_bench.run_grammar_bench(
        model_path=str(tiny_model), streams=2, max_tokens=8, rounds=2, schemas=3
    )
    assert result.schemas == 3
    assert 0 < result.compile_p50_ms <= result.compile_p95_ms
    assert result.cached_p50_ms >= 0
    assert [row.mode for row in result.rows] == ["unconstrained", "constrained (json_schema)"]
    unconstrained, constrained = result.rows
    assert unconstrained.tokens == 2 * 2 * 8  # two rounds of two streams, never stopping early
    assert 0 < constrained.tokens <= 2 * 2 * 8  # a schema may end an answer before max_tokens
    assert all(row.streams == 2 and row.tokens_per_s > 0 for row in result.rows)
    assert f"{result.schemas} tool schemas" in grammar_bench.format_table(result)


def test_tool_schemas_are_all_different() -> None:
    tools = grammar_bench.tool_schemas(4)
    assert len({tool.name for tool in tools}) == 4
    assert len({json.dumps(tool.parameters, sort_keys=True) for tool in tools}) == 4


async def test_versus_runs_both_servers_on_the_same_prompts(tiny_model: Path) -> None:
    rows = await versus.run_versus(str(tiny_model), streams=(1, 2), max_tokens=8)
    assert [(row.server, row.streams) for row in rows] == [
        ("mlxcluster (controller + 1 worker)", 1),
        ("mlxcluster (controller + 1 worker)", 2),
        ("mlx_lm.server", 1),
        ("mlx_lm.server", 2),
    ]
    for row in rows:
        assert row.tokens > 0 and row.tokens_per_s > 0 and row.ttft_p50_ms > 0
    text = versus.format_versus(rows)
    assert "mlx_lm.server" in text and "mlxcluster" in text


def test_fresh_prompts_never_repeat_within_a_run() -> None:
    rounds = versus.fresh_prompts((1, 2, 3))
    assert [len(r) for r in rounds] == [1, 2, 3]
    flat = [p for r in rounds for p in r]
    assert len(set(flat)) == 6 and versus.WARM_UP_PROMPT not in flat


def test_sharded_weights_are_the_projection_tensors(tiny_model: Path) -> None:
    weights = mx.load(str(tiny_model / "model.safetensors"))
    expected = sum(a.nbytes for name, a in weights.items() if "_proj." in name)
    assert expected > 0
    assert sharded_weights_mb(str(tiny_model)) == round(expected / 1024**2, 1)


def test_sharded_weights_of_a_dir_without_safetensors_is_zero(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    assert sharded_weights_mb(str(tmp_path)) == 0.0


def test_peak_rss_is_at_least_the_current_rss() -> None:
    import os

    import psutil

    assert peak_rss_mb(os.getpid()) >= round(psutil.Process().memory_info().rss / 1024**2, 1) - 1


async def test_multiturn_stall_part_measures_each_step_budget(tiny_model: Path) -> None:
    from mlxcluster.bench.multiturn import run_multiturn
    from mlxcluster.bench.multiturn_format import format_multiturn
    from mlxcluster.worker.step_budget import DEFAULT_STEP_BUDGET_MS

    result = await run_multiturn(str(tiny_model), parts="c", quick=True)
    assert result.quick and result.model == "tiny"
    assert (result.single, result.balancers, result.concurrent, result.cache_bound) == ([], [], [], None)
    assert [row.step_budget_ms for row in result.stall] == [0.0, DEFAULT_STEP_BUDGET_MS]
    for row in result.stall:
        assert row.long_prompt_tokens >= result.settings.stall_prompt_tokens  # the long system prompt, as asked
        assert row.prefill_step_size == 256
        assert 0 < row.baseline_gap_p50_ms <= row.baseline_gap_max_ms
        assert row.long_prompt_ttft_ms > 0 and row.idle_ttft_ms > 0 and row.ttft_ratio > 0
        assert row.gap_p50_ratio >= 0 and row.gaps_during_prefill >= 0
    text = format_multiturn(result)
    assert "c) the step budget" in text and "a) one conversation" not in text
    assert f"default step_budget_ms = {DEFAULT_STEP_BUDGET_MS:g}: " in text


def test_end_of_sequence_ids_are_the_models(tiny_model: Path) -> None:
    from tokenizers import Tokenizer

    from mlxcluster.bench.stall import end_of_sequence_ids

    eos = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).token_to_id("<|im_end|>")
    assert end_of_sequence_ids(str(tiny_model)) == [eos]


async def test_cache_bound_holds_under_distinct_prompts(tiny_model: Path) -> None:
    from mlxcluster.bench.cache_bound import run_cache_bound

    limit = 1 << 20  # a few of the tiny model's 400-token prompts
    result = await run_cache_bound(str(tiny_model), requests=6, prompt_tokens=400, limit_bytes=limit)
    assert (result.requests, result.prompt_tokens_each, result.limit_bytes) == (6, 400, limit)
    assert result.heartbeats > 0 and result.entries >= 1
    assert 0 < result.max_bytes_seen <= limit and result.within_bound
    assert result.evictions >= 1  # six distinct prompts do not fit: older ones were evicted


async def test_bench_group_runs_one_worker_then_a_group(tmp_path: Path) -> None:
    """A tiny llama with heads divisible by the group's size: one worker, then a tensor-parallel group of 3."""
    model = build_tiny_model(tmp_path / "tiny-6h", hidden=96, heads=6, kv_heads=3)
    result = await run_group_bench(str(model), streams=(1,), max_tokens=4)
    assert (result.model, result.group_size) == ("tiny-6h", GROUP_SIZE)
    assert [(row.server, row.streams) for row in result.rows] == [("1 worker", 1), (f"group of {GROUP_SIZE}", 1)]
    assert all(row.tokens > 0 and row.tokens_per_s > 0 for row in result.rows)
    assert [m.process for m in result.memory] == ["solo", *(f"bench-g-r{rank}" for rank in range(GROUP_SIZE))]
    assert all(m.peak_rss_mb > 0 for m in result.memory)
    assert 0 < result.sharded_mb < result.weights_mb
    assert "group of 3" in format_table(result)
