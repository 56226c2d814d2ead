"""The logic of ``bench multiturn`` that needs no model: conversations, turn order, and the arithmetic."""

from __future__ import annotations

from mlxcluster.bench.conversation import (
    USER_TURNS,
    Conversation,
    TurnSample,
    build_conversations,
    gaps_ms,
    summarize,
    system_prompt,
    turn_major,
)
from mlxcluster.bench.multiturn import MultiturnResult, Settings
from mlxcluster.bench.multiturn_format import format_multiturn


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def test_system_prompts_reach_the_target_and_differ_from_the_first_words() -> None:
    prompts = [system_prompt(i, 300, words) for i in range(3)]
    assert all(300 <= words(p) < 340 for p in prompts)
    assert len({p.split()[1] for p in prompts}) == 3  # "Session <n>": the first tokens already differ


def test_each_turn_resends_the_whole_history() -> None:
    (conversation,) = build_conversations(1, 50, words)
    first = conversation.request_messages()
    assert [m["role"] for m in first] == ["system", "user"]
    assert first[1]["content"] == USER_TURNS[0]
    conversation.record("Hi, I am an assistant.")
    second = conversation.request_messages()
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[:2] == first
    assert second[2]["content"] == "Hi, I am an assistant."
    assert second[3]["content"] == USER_TURNS[1]
    assert conversation.turns_done == 1


def test_turn_major_sends_every_conversation_before_the_next_turn() -> None:
    conversations = [Conversation(i, f"system {i}") for i in range(3)]
    rounds = turn_major(conversations, 4)
    assert len(rounds) == 4
    assert all([c.index for c in r] == [0, 1, 2] for r in rounds)


def test_summary_counts_only_later_turns_as_cached() -> None:
    samples = [
        TurnSample(conversation=0, turn=1, ttft_ms=10_000, prompt_tokens=1000, cached_tokens=3),
        TurnSample(conversation=1, turn=1, ttft_ms=12_000, prompt_tokens=1000, cached_tokens=3),
        TurnSample(conversation=0, turn=2, ttft_ms=500, prompt_tokens=1040, cached_tokens=1020),
        TurnSample(conversation=1, turn=2, ttft_ms=11_000, prompt_tokens=1040, cached_tokens=3),
        TurnSample(conversation=0, turn=3, ttft_ms=600, prompt_tokens=1080, cached_tokens=1060),
    ]
    summary = summarize(samples)
    assert summary.turn1_samples == 2 and summary.later_samples == 3
    assert summary.later_prompt_tokens == 1040 + 1040 + 1080
    assert summary.later_cached_tokens == 1020 + 3 + 1060
    assert summary.later_cached_fraction == round(2083 / 3160, 3)
    assert summary.later_ttft_p50_ms == 600  # nearest-rank median of 500, 600, 11000
    assert summary.turn1_ttft_p50_ms in (10_000, 12_000)
    assert summary.later_over_turn1 == round(600 / summary.turn1_ttft_p50_ms, 3)
    assert summary.turn1_ttft_mean_ms == 11_000 and summary.later_ttft_mean_ms == 4_033.3
    assert summary.later_over_turn1_mean == round((12_100 / 3) / 11_000, 3)  # the miss at turn 2 counts


def test_summary_of_nothing_is_zero_not_a_division_error() -> None:
    summary = summarize([])
    assert summary.later_cached_fraction == 0.0 and summary.later_over_turn1 == 0.0


def test_gaps_between_arrivals() -> None:
    assert gaps_ms([1.0, 1.1, 1.6]) == [100.00000000000009, 500.0]
    assert gaps_ms([2.0]) == []


def test_format_states_absent_balancers_and_verdicts() -> None:
    from mlxcluster.bench.multiturn import BalancerTurns

    samples = [
        TurnSample(conversation=0, turn=1, ttft_ms=10_000, prompt_tokens=1000, cached_tokens=0),
        TurnSample(conversation=0, turn=2, ttft_ms=2_000, prompt_tokens=1040, cached_tokens=1000),
    ]
    result = MultiturnResult(
        machine="test machine",
        model="m",
        quick=True,
        settings=Settings.quick(),
        balancers=[BalancerTurns("round_robin", summarize(samples), samples, {"w1": 1})],
        balancers_absent=["cache_aware"],
        default_strategy="least_loaded",
    )
    text = format_multiturn(result)
    assert "cache_aware: not run" in text
    assert (
        "round_robin: cached 96% (target ≥ 80%: met), later/turn 1 by mean 0.20× (p50 0.20×; target ≤ 0.35×: met)"
        in text
    )
    assert "w1:1" in text


def test_replace_section_keeps_the_others() -> None:
    from mlxcluster.bench.report import replace_section

    text = "# Benchmarks\n\nintro\n\n## Engine\n\nold engine\n\n## Scale\n\nold scale\n"
    replaced = replace_section(text, "Engine", "new engine\n")
    assert replaced == "# Benchmarks\n\nintro\n\n## Engine\n\nnew engine\n\n## Scale\n\nold scale\n"
    appended = replace_section(text, "Multi-turn", "turns\n")
    assert appended.startswith(text.rstrip("\n")) and appended.endswith("## Multi-turn\n\nturns\n")
    assert replace_section(appended, "Multi-turn", "again\n").endswith("## Multi-turn\n\nagain\n")


def test_replace_section_keeps_its_notes() -> None:
    from mlxcluster.bench.report import replace_section, section_notes

    text = "# Benchmarks\n\n## Engine\n\nold\n\n### Notes\n\nby hand\n\n## Scale\n\nx\n"
    replaced = replace_section(text, "Engine", "new\n")
    assert replaced == "# Benchmarks\n\n## Engine\n\nnew\n\n### Notes\n\nby hand\n\n## Scale\n\nx\n"
    assert section_notes(replaced, "Engine") == "### Notes\n\nby hand\n"
    assert section_notes(replaced, "Scale") == "" and section_notes(replaced, "Absent") == ""
    last = replace_section("## Engine\n\nold\n### Notes\nkept\n", "Engine", "new\n")
    assert last == "## Engine\n\nnew\n\n### Notes\nkept\n"


def test_family_sections_take_the_fixtures_dir() -> None:
    from pathlib import Path

    from mlxcluster.bench.report import SECTIONS, section_args

    by_name = {section.name: section for section in SECTIONS}
    assert len(by_name) == len(SECTIONS)  # what --only names is unique
    assert {"multiturn-families", "arrivals", "grammar-strict", "fuzz"} <= set(by_name)
    assert section_args(by_name["fuzz"], families_dir=Path("/f")) == ["fuzz", "--families-dir", "/f"]
    assert section_args(by_name["multiturn-families"], quick=True) == ["multiturn", "--parts", "f", "--quick"]
    assert section_args(by_name["grammar-strict"]) == ["grammar", "--parts", "strict"]
    assert section_args(by_name["engine"], families_dir=Path("/f")) == ["engine"]


# --- part c / bench engine --parts stall: the step budget's curve ---------------------------------------------


def _stall_row(budget: float, gap_during_s: float, ttft_s: float, idle_ttft_ms: float):  # type: ignore[no-untyped-def]
    """A stream ticking every 0.1 s alone, every ``gap_during_s`` after the long prompt is sent at 10 s."""
    from mlxcluster.bench.stall import stall_row

    alone = [0.0, 0.5, 0.6, 0.7, 0.8, 1.0]  # the first gap (its own prefill) is left out; then 0.1 ×3 and 0.2
    stalled = [9.8, 9.9, 10.0] + [10.0 + gap_during_s * k for k in range(1, 40)]
    first = 10.0 + ttft_s
    stalled = [t for t in stalled if t <= first + 2 * gap_during_s]  # cancelled two tokens after its first
    return stall_row(
        step_budget_ms=budget,
        prefill_step_size=256,
        long_prompt_tokens=2000,
        alone=alone,
        stalled=stalled,
        sent=10.0,
        first=first,
        idle_ttft_ms=idle_ttft_ms,
    )


def test_stall_row_states_gaps_and_ttft_as_ratios() -> None:
    row = _stall_row(250.0, 0.25, 3.0, 2500.0)
    assert (row.baseline_gap_p50_ms, row.baseline_gap_max_ms) == (100.0, 200.0)
    # the gaps ending after the prompt was sent and starting before its first token: 10.0 .. 13.0, 0.25 each
    assert row.gaps_during_prefill == 12 and row.stall_gap_p50_ms == row.stall_gap_max_ms == 250.0
    assert row.prompt_tokens_per_gap == round(2000 / 12, 1)
    assert (row.gap_p50_ratio, row.gap_max_ratio, row.ttft_ratio) == (2.5, 2.5, 1.2)
    assert row.long_prompt_ttft_ms == 3000.0 and row.covered and row.meets_target


def test_stall_row_misses_the_target_on_any_of_the_three_or_when_not_covered() -> None:
    assert not _stall_row(400.0, 0.4, 3.0, 2500.0).meets_target  # gap p50 4×
    assert not _stall_row(250.0, 0.25, 4.0, 2500.0).meets_target  # TTFT 1.6×
    uncovered = _stall_row(250.0, 0.25, 3.0, 2500.0)
    uncovered.covered = False
    assert not uncovered.meets_target


def test_stall_rows_in_multiturn_part_c_and_the_curve() -> None:
    from mlxcluster.bench.stall import StallCurve, format_curve
    from mlxcluster.worker.step_budget import DEFAULT_STEP_BUDGET_MS as default

    rows = [_stall_row(0.0, 1.5, 2.6, 2500.0), _stall_row(default, 0.25, 3.0, 2500.0)]
    result = MultiturnResult(
        machine="test machine", model="m", quick=True, settings=Settings.quick(), parts="c", stall=rows
    )
    text = format_multiturn(result)
    assert "c) the step budget" in text
    lines = text.splitlines()
    none_row = next(line for line in lines if line.startswith("none (256/step)"))
    assert "15.0×" in none_row and "1.04×" in none_row and "NOT met" in none_row
    assert any(line.startswith(f"{default:g} ") and line.rstrip().endswith(" met") for line in lines)
    assert f"budgets meeting all three: {default:g}" in text and f"default step_budget_ms = {default:g}: met" in text
    curve = format_curve(StallCurve(machine="test machine", model="m", default_budget_ms=default + 1, rows=rows))
    assert curve.startswith("bench engine --parts stall — m") and "default step_budget_ms" not in curve


def test_the_step_budget_section_runs_the_stall_part() -> None:
    from mlxcluster.bench.report import SECTIONS, _timeout

    section = next(s for s in SECTIONS if s.name == "step-budget")
    assert section.args == ["engine", "--parts", "stall"] and not section.families
    assert _timeout(section.args, 0) == 1800
