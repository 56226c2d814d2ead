"""A tiny decoder embedding model, Qwen3-Embedding style, built offline in about a second.

mlx-lm's qwen3 class (hidden 64, 2 layers) with seeded random weights, the demo model's tokenizer with
Qwen3's special tokens (``tests/families.py``) whose post-processor appends ``<|endoftext|>`` to every
input as Qwen3-Embedding's does, and the sentence-transformers files: ``modules.json`` (Transformer →
Pooling → Normalize), ``1_Pooling/config.json`` (last-token pooling by default) and
``config_sentence_transformers.json`` with a ``query`` prompt.

:func:`reference_vectors` is the in-process computation the cluster's answers are compared with: one input
at a time, no padding, numpy pooling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from families import _RECIPES, FAMILIES, _qwen3_config, _write_tokenizer, find_demo_model

QUERY_PROMPT = "Instruct: Given a question, find passages that answer it\nQuery: "
END_TOKEN = "<|endoftext|>"


def build_embedding_model(path: Path, *, pooling: str = "lasttoken", normalize: bool = True, seed: int = 7) -> Path:
    """Write the model dir at ``path`` (see the module docstring); ``pooling``: lasttoken, mean or cls."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3
    from mlx_lm.utils import save_config, save_model

    demo = find_demo_model()
    if demo is None:
        raise FileNotFoundError("the demo model has not been made (mlxcluster models demo)")
    path.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(demo, path, FAMILIES["qwen3"], _RECIPES["qwen3"])
    _append_end_token(path / "tokenizer.json")
    config = _qwen3_config(vocab) | {"tie_word_embeddings": True, "max_position_embeddings": 512}
    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(dict(config)))
    mx.eval(model.parameters())
    assert tree_flatten(model.parameters())
    save_model(path, model)
    save_config(config, path / "config.json")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": config["hidden_size"],
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken",
        "include_prompt": True,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    st_config = {"prompts": {"query": QUERY_PROMPT, "document": ""}, "similarity_fn_name": "cosine"}
    (path / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    return path


def _append_end_token(tokenizer_json: Path) -> None:
    """Make ``encode`` append ``<|endoftext|>`` (id 0 of the family tokenizer), as Qwen3-Embedding's does."""
    tokenizer = json.loads(tokenizer_json.read_text())
    end_id = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == END_TOKEN)
    template = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": END_TOKEN, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {END_TOKEN: {"id": END_TOKEN, "ids": [end_id], "tokens": [END_TOKEN]}},
    }
    tokenizer["post_processor"] = {"type": "Sequence", "processors": [tokenizer["post_processor"], template]}
    tokenizer_json.write_text(json.dumps(tokenizer, ensure_ascii=False))


def reference_vectors(path: Path, inputs: list[str] | list[list[int]], *, prompt: str = "") -> tuple[Any, list[int]]:
    """Vectors computed in-process, one input at a time (no batch, no padding), and each input's token count."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    model, _ = load_model(path)
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    normalize = "2_Normalize" in (path / "modules.json").read_text()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    rows, counts = [], []
    for item in inputs:
        ids = tokenizer(prompt + item)["input_ids"] if isinstance(item, str) else item
        states = np.array(model.model(mx.array([ids])).astype(mx.float32))[0]
        if pooling.get("pooling_mode_lasttoken"):
            vector = states[-1]
        elif pooling.get("pooling_mode_cls_token"):
            vector = states[0]
        else:
            vector = states.mean(axis=0)
        if normalize:
            vector = vector / np.linalg.norm(vector)
        rows.append(vector)
        counts.append(len(ids))
    return np.stack(rows), counts


def build_encoder_model(path: Path, *, seed: int = 11) -> Path:
    """A tiny BERT (mlx-embeddings' class, hidden 64, 2 layers, random weights) with the demo tokenizer and
    sentence-transformers files (mean pooling, Normalize): the encoder path, which needs mlx-embeddings."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_embeddings.models import bert

    demo = find_demo_model()
    if demo is None:
        raise FileNotFoundError("the demo model has not been made (mlxcluster models demo)")
    path.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(demo, path, FAMILIES["qwen3"], _RECIPES["qwen3"])
    config = {
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128, "vocab_size": vocab,
    }  # fmt: skip
    mx.random.seed(seed)
    model = bert.Model(bert.ModelArgs.from_dict(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return path


def main(argv: list[str]) -> int:
    """``python tests/embedding_model.py DIR``: build the tiny embedding fixture as ``DIR/tiny-embed`` (for
    ``mlxcluster bench embeddings --families-dir DIR``)."""
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python tests/embedding_model.py DIR")
        return 0 if argv else 2
    print(build_embedding_model(Path(argv[0]) / "tiny-embed"))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
