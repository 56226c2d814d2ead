"""KV sizes read from config.json against the caches mlx-lm really makes, on the family fixtures.

Each fixture prefills ``n`` tokens in the engine's 256-token chunks and decodes one more; the projection of
``n + 1`` tokens is never below the cache's bytes at either point, and at most one 256-token step above them
(sliding-window layers, capped at their window, may sit further below their projection).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from families import FamilyModels

from mlxcluster.worker.kv_size import STEP, KvSize, kv_size, kv_size_of
from mlxcluster.worker.placement import weights_bytes

FAMILIES = ("qwen3", "gemma3", "qwen3_next", "mistral", "llama3")


def cache_bytes(path: Path, lengths: tuple[int, ...]) -> list[tuple[int, int]]:
    """(the most bytes while prefilling, the bytes after one decode step) for prompts of each length."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlx_lm.load(str(path))[:2]
    found = []
    for length in lengths:
        cache = make_prompt_cache(model)
        tokens = mx.array([[5] * length])
        most = 0
        for start in range(0, length, STEP):
            model(tokens[:, start : start + STEP], cache=cache)
            mx.eval([layer.state for layer in cache])
            most = max(most, sum(layer.nbytes for layer in cache))
        model(mx.array([[5]]), cache=cache)
        mx.eval([layer.state for layer in cache])
        found.append((most, sum(layer.nbytes for layer in cache)))
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_projection_bounds_the_real_cache(family: str, family_models: FamilyModels) -> None:
    path = family_models.path(family)
    size = kv_size(path)
    assert size is not None
    lengths = (1, 255, 300, 700)
    for length, (most, after) in zip(lengths, cache_bytes(path, lengths), strict=True):
        projected = size.projected(length + 1)
        assert projected >= max(most, after), (family, length)
        slack = STEP * size.bytes_per_token + (size.window_tokens + STEP) * size.window_bytes_per_token
        assert projected - max(most, after) <= slack, (family, length, projected, most, after)


def test_layer_kinds_of_the_fixtures(family_models: FamilyModels) -> None:
    gemma = kv_size(family_models.path("gemma3"))
    nxt = kv_size(family_models.path("qwen3_next"))
    assert gemma is not None and nxt is not None
    # the fixtures are float32: 2 × 2 kv heads × 16 head dim × 4 bytes per layer
    assert (gemma.bytes_per_token, gemma.window_bytes_per_token, gemma.window_tokens) == (512, 512, 16)
    assert gemma.projected(10_000) == gemma.projected(10_000 - STEP) + STEP * 512  # windows stopped growing
    assert nxt.fixed_bytes > 0 and nxt.bytes_per_token == 256  # 3 linear layers, 1 full
    assert nxt.capped_fixed_bytes == nxt.fixed_bytes
    assert gemma.capped_fixed_bytes == (16 + STEP) * 512


def test_dtype_and_defaults(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512, "max_position_embeddings": 4096}
    # no head_dim, no kv heads: hidden // heads, and every head keeps keys and values; 2 bytes by default
    assert kv_size_of(config) == KvSize(bytes_per_token=2 * 2 * 8 * 64 * 2, context_length=4096)
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    size = kv_size(tmp_path)
    assert size is not None and size.bytes_per_token == 2 * 2 * 8 * 64 * 4
    assert size.projected(0) == 0 and size.projected(1) == STEP * size.bytes_per_token
    # a window with no pattern places no layer: counted as full attention (too high, never too low)
    assert kv_size_of({**config, "sliding_window": 128}).window_bytes_per_token == 0
    assert kv_size(tmp_path / "missing") is None


def test_weights_dtype_wins_over_the_config(family_models: FamilyModels) -> None:
    path = family_models.path("llama3")  # 8-bit weights, float32 scales, no torch_dtype in its config
    size = kv_size(path)
    assert size is not None and size.bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert weights_bytes(path) == sum(f.stat().st_size for f in path.glob("*.safetensors")) > 0


def test_tokens_within_inverts_the_projection() -> None:
    size = KvSize(
        bytes_per_token=100, fixed_bytes=1000, window_bytes_per_token=10, window_tokens=16, context_length=8192
    )
    for nbytes in (0, 1000, size.projected(1), size.projected(1) - 1, size.projected(3000), 10**12):
        tokens = size.tokens_within(nbytes)
        assert tokens % STEP == 0 and tokens <= 8192 + STEP
        assert tokens == 0 or size.projected(tokens) <= nbytes
        assert tokens > 8192 or size.projected(tokens + 1) > nbytes
