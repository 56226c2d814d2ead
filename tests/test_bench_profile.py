"""The logic of ``bench engine --parts profile`` that needs no model: where a function's own time is put, and
the report's lines (the measuring itself runs in ``make bench``)."""

from __future__ import annotations

from mlxcluster.bench.profile import (
    PLACES,
    ProcessCpu,
    ProfileResult,
    ServerRun,
    ThreadPlace,
    format_profile,
    place_of,
)


def test_functions_are_placed_by_their_file() -> None:
    site = "/venv/lib/python3.11/site-packages"
    assert place_of(f"{site}/mlx_lm/generate.py") == "waiting for the model"
    assert place_of(f"{site}/mlx_lm/models/llama.py") == "building the model graph"
    assert place_of(f"{site}/mlx/nn/layers/linear.py") == "building the model graph"
    assert place_of("/repo/src/mlxcluster/worker/generation_loop.py") == "mlxcluster"
    assert place_of("~") == place_of(f"{site}/mlx_lm/tokenizer_utils.py") == "other"


def test_the_report_gives_each_process_its_share_and_the_thread_its_places() -> None:
    result = ProfileResult(
        model="demo",
        streams=8,
        max_tokens=64,
        rounds=1,
        cpu=[
            ProcessCpu("mlxcluster", "controller", 0.1, 0.2),
            ProcessCpu("mlxcluster", "bench-w1", 19.9, 38.9),
            ProcessCpu("mlx_lm.server", "mlx_lm.server", 18.0, 35.2),
        ],
        runs=[ServerRun("mlxcluster", 512, 9.0, 56.9), ServerRun("mlx_lm.server", 512, 9.5, 53.9)],
        thread=[
            ThreadPlace(place, seconds, seconds / 10) for place, seconds in zip(PLACES, (9, 0.7, 0.2, 0.1), strict=True)
        ],
        thread_tokens=512,
        top_ours=[("generation_loop.step:311", 0.05)],
    )
    text = format_profile(result)
    assert "controller     0.10   0.20        0.5%" in text
    assert "bench-w1       19.90  38.90       99.5%" in text
    assert "waiting for the model     9.00     90.0%" in text
    assert "generation_loop.step:311 0.05 s" in text
