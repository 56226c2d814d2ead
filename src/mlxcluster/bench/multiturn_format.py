"""Text tables of a ``bench multiturn`` run, with each target stated as a ratio measured in that run."""

from __future__ import annotations

from mlxcluster.bench.conversation import TurnSample
from mlxcluster.bench.family_turns import FamilyCache
from mlxcluster.bench.multiturn import OURS, THEIRS, MultiturnResult
from mlxcluster.bench.stall import format_stall
from mlxcluster.tables import table
from mlxcluster.worker.step_budget import DEFAULT_STEP_BUDGET_MS


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def format_multiturn(result: MultiturnResult) -> str:
    s = result.settings
    models = "the model-family fixtures" if set(result.parts) <= {"f"} else result.model
    parts = "" if result.parts == "abcde" else f" --parts {result.parts}"
    lines = [
        f"bench multiturn{' --quick' if result.quick else ''}{parts} — {models}, greedy — {result.machine}",
        f"system prompt ≈ {s.system_tokens} tokens (distinct per conversation), replies ≤ {s.max_tokens} tokens; "
        "every turn resends the whole history, streamed",
    ]
    if result.single:
        lines += [
            "",
            f"a) one conversation of {s.turns} turns, one worker vs mlx_lm.server (its prompt cache on), same "
            "model dir and BLAS, both up, turns sent to each alternately:",
        ]
        rows = []
        for server in result.single:
            for sample in server.samples:
                rows.append(
                    [
                        server.server,
                        str(sample.turn),
                        str(sample.prompt_tokens),
                        str(sample.cached_tokens),
                        f"{sample.ttft_ms:.0f}",
                    ]
                )
        lines.append(table(["server", "turn", "prompt tok", "cached tok", "TTFT ms"], rows))
        by = {r.server: r.summary for r in result.single}
        if OURS in by and THEIRS in by and by[THEIRS].later_ttft_p50_ms:
            ratio = by[OURS].later_ttft_p50_ms / by[THEIRS].later_ttft_p50_ms
            lines.append(
                f"later turns TTFT p50: {by[OURS].later_ttft_p50_ms:.0f} ms vs {by[THEIRS].later_ttft_p50_ms:.0f} ms "
                f"= {ratio:.2f}× mlx_lm.server (target ≤ 1.0×: {_verdict(ratio <= 1.0)}); turn 1: "
                f"{by[OURS].turn1_ttft_p50_ms:.0f} vs {by[THEIRS].turn1_ttft_p50_ms:.0f} ms"
            )
    if result.balancers or result.balancers_absent:
        lines += [
            "",
            f"b) two workers, {s.interleaved_conversations} conversations of {s.interleaved_turns} turns interleaved "
            "(each turn sent for all "
            f"at once), default strategy on this branch: {result.default_strategy}:",
        ]
        rows = [
            [
                b.balancer,
                f"{b.summary.turn1_ttft_p50_ms:.0f} / {b.summary.turn1_ttft_mean_ms:.0f}",
                f"{b.summary.later_ttft_p50_ms:.0f} / {b.summary.later_ttft_mean_ms:.0f}",
                f"{b.summary.later_over_turn1:.2f}× / {b.summary.later_over_turn1_mean:.2f}×",
                f"{b.summary.later_cached_fraction * 100:.0f}%",
                " ".join(f"{w}:{n}" for w, n in sorted(b.worker_hits.items())) or "-",
            ]
            for b in result.balancers
        ]
        headers = ["balancer", "turn-1 TTFT p50/mean ms", "later p50/mean ms", "later/turn 1", "later cached"]
        lines.append(table([*headers, "cache hits per worker"], rows))
        for b in result.balancers:
            cached_ok = b.summary.later_cached_fraction >= 0.8
            latency_ok = 0 < b.summary.later_over_turn1_mean <= 0.35
            lines.append(
                f"{b.balancer}: cached {b.summary.later_cached_fraction * 100:.0f}% (target ≥ 80%: "
                f"{_verdict(cached_ok)}), later/turn 1 by mean {b.summary.later_over_turn1_mean:.2f}× "
                f"(p50 {b.summary.later_over_turn1:.2f}×; target ≤ 0.35×: {_verdict(latency_ok)})"
            )
        for name in result.balancers_absent:
            lines.append(f"{name}: not run — no such balancer on this branch (mlxcluster balancers list)")
    if result.stall:
        lines += [
            "",
            "c) the step budget: a running stream's inter-token gaps while a long prompt prefills, and that "
            "prompt's TTFT against the idle engine's (engine in-process, one engine per budget):",
            *format_stall(result.stall, DEFAULT_STEP_BUDGET_MS),
        ]
    if result.concurrent:
        lines += ["", f"d) no cache help: {s.concurrent_requests} concurrent distinct requests, non-streamed:"]
        rows = [[r.server, str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_s:.1f}"] for r in result.concurrent]
        lines.append(table(["server", "tokens", "seconds", "tok/s"], rows))
        by_server = {r.server: r for r in result.concurrent}
        if OURS in by_server and THEIRS in by_server and by_server[THEIRS].tokens_per_s:
            ratio = by_server[OURS].tokens_per_s / by_server[THEIRS].tokens_per_s
            lines.append(f"mlxcluster / mlx_lm.server tokens/s = {ratio:.2f}× (target ≥ 1.0×: {_verdict(ratio >= 1)})")
    bound = result.cache_bound
    if bound is not None:
        lines += [
            "",
            f"e) cache byte bound: {bound.requests} distinct {bound.prompt_tokens_each}-token prompts into one worker "
            f"with prompt_cache_bytes = {bound.limit_bytes / 2**20:.0f} MiB, {bound.heartbeats} heartbeats read:",
            f"largest cache seen {bound.max_bytes_seen / 2**20:.1f} MiB of {bound.limit_bytes / 2**20:.0f} MiB; "
            f"{bound.entries} entries, {bound.evictions} evictions at the end (target never above the limit: "
            f"{_verdict(bound.within_bound)})",
        ]
    if result.families or result.families_note:
        lines += ["", *format_families(result)]
    return "\n".join(lines)


def _shares(samples: list[TurnSample]) -> str:
    return " ".join(f"{s.cached_tokens / s.prompt_tokens * 100:.0f}" if s.prompt_tokens else "-" for s in samples)


def format_families(result: MultiturnResult) -> list[str]:
    """Part f: per family fixture, both servers' later-turn cached share and the verdict."""
    s = result.settings
    lines = [
        f"f) the prompt cache per model family: one conversation of {s.turns} turns on each server, same fixture "
        "dir and BLAS, turns sent to each alternately (greedy, thinking off where the template has the switch, "
        f"replies ≤ {s.max_tokens} tokens):",
    ]
    if result.families_note:
        return [*lines, result.families_note]
    rows: list[list[str]] = []
    for family in result.families:
        for server, samples, summary in (
            ("mlxcluster (controller + 1 worker)", family.ours, family.ours_summary),
            (THEIRS, family.theirs, family.theirs_summary),
        ):
            later = [x for x in samples if x.turn > 1]
            rows.append(
                [
                    family.family,
                    family.cache,
                    server,
                    str(samples[0].prompt_tokens) if samples else "-",
                    _shares(later) or "-",
                    f"{summary.later_cached_tokens} / {summary.later_prompt_tokens}" if summary else "-",
                    f"{summary.later_cached_fraction * 100:.1f}%" if summary else "-",
                ]
            )
    headers = ["family", "cache", "server", "turn-1 prompt tok", "later turns cached %", "later cached / prompt"]
    lines.append(table([*headers, "later share"], rows))
    lines += [_family_verdict(family) for family in result.families]
    return lines


def _family_verdict(family: FamilyCache) -> str:
    if family.error or family.ours_summary is None or family.theirs_summary is None:
        return f"{family.family}: FAILED: {family.error or 'no turns answered'}"
    ours, theirs = family.ours_summary.later_cached_fraction, family.theirs_summary.later_cached_fraction
    return (
        f"{family.family}: later turns cached {ours * 100:.1f}% vs mlx_lm.server {theirs * 100:.1f}% "
        f"(target ≥ mlx_lm.server's: {_verdict(bool(family.met))})"
    )
