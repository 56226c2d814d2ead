"""``mlxcluster bench limits``: its header checks and window placement on their own, then one short real run
(two controllers, one echo worker, a small rpm) whose figures must hold exactly."""

from __future__ import annotations

import pytest

from mlxcluster.bench.limits import admitted_minute, check_refusal, format_table, parse_reset, run_limits_bench


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20ms", 0.02), ("6s", 6.0), ("9.87s", 9.87), ("1m30s", 90.0), ("0s", 0.0), ("", None), ("soon", None)],
)
def test_reset_durations_parse_as_openai_writes_them(text: str, seconds: float | None) -> None:
    assert parse_reset(text) == seconds


def test_a_request_is_placed_in_the_window_that_admitted_it_not_the_one_it_returned_in() -> None:
    minute_end = 1_000_020 * 60.0
    assert admitted_minute(minute_end - 0.3, 0.3) == 1_000_019  # admitted and answered in the same minute
    assert admitted_minute(minute_end + 0.05, 0.02) == 1_000_019  # admitted 20 ms before the edge, answered after
    assert admitted_minute(minute_end + 0.05, 59.96) == 1_000_020  # admitted just after the edge


def _refusal(received_at: float, **changes: str) -> dict[str, str]:
    to_end = 60 - received_at % 60
    headers = {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": f"{to_end:.3g}s",
        "retry-after": str(max(1, round(to_end))),
    }
    return headers | changes


def test_a_correct_refusal_passes_and_each_wrong_header_is_named() -> None:
    at = 1_000_000 * 60 + 42.0
    assert check_refusal(429, _refusal(at), 600, at) is None
    assert check_refusal(200, {}, 600, at) is None
    wrong = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "601",
        "x-ratelimit-reset-requests": "45s",
        "retry-after": "0",
    }
    for name, value in wrong.items():
        problem = check_refusal(429, _refusal(at, **{name: value}), 600, at)
        assert problem is not None and name in problem
    missing = {k: v for k, v in _refusal(at).items() if k != "retry-after"}
    assert check_refusal(429, missing, 600, at) == "retry-after None"


async def test_a_short_run_admits_the_budget_once_per_window_and_usage_counts_every_200() -> None:
    result = await run_limits_bench(rpm=12, clients=6, seconds=3.0, quick=True)
    assert result.controllers == 2 and result.other == {}
    assert result.refused > 0 and result.header_problems == 0
    assert result.max_admitted <= result.rpm <= result.admitted and result.unplaced == 0
    assert sum(w.admitted for w in result.windows) == result.admitted
    assert all(sum(w.by_controller.values()) == w.admitted for w in result.windows)
    assert result.usage_matches and result.usage_requests == result.admitted
    text = format_table(result)
    assert "target ≤ 12: met" in text and "(equal)" in text
