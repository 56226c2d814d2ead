"""An embedding model recognised from the sentence-transformers files it ships.

Most embedding repos (Qwen3-Embedding, BGE, E5, nomic, MiniLM...) carry ``modules.json``: the model's
pipeline as sentence-transformers runs it, e.g. ``Transformer → Pooling → Normalize``. The Pooling module's
``config.json`` says how token states become one vector (``pooling_mode_lasttoken``, ``_mean_tokens``,
``_cls_token``), a ``Normalize`` module that vectors are unit length, and ``config_sentence_transformers.json``
may name prompts (Qwen3-Embedding's ``query`` instruction) and the one used when a request names none
(``default_prompt_name``). The Transformer module's ``sentence_bert_config.json`` may set ``max_seq_length``
(sentence-transformers reads no further: it is the model's context here, an input past it refused) and
``do_lower_case`` (texts are lower-cased, prompt included, before tokenizing). A model dir without
``modules.json`` is a chat model. What we cannot run the way sentence-transformers would (another pooling mode,
a ``Dense`` projection) is refused at load with the module's name, never approximated.

Decoder models (``model_type`` an mlx-lm family: Qwen3, Llama...) run through mlx-lm's own classes; encoder
models (BERT, ModernBERT, XLM-RoBERTa, nomic-bert) need mlx-embeddings, the ``mlxcluster[embeddings]`` extra.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Pooling = Literal["lasttoken", "mean", "cls"]

POOLING_KEYS: dict[str, Pooling] = {
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}
UNSUPPORTED_POOLING = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)
ENCODER_TYPES = frozenset(
    {"bert", "modernbert", "xlm-roberta", "xlm_roberta", "roberta", "nomic_bert", "distilbert", "mpnet", "electra"}
)
"""``model_type`` values of bidirectional encoders (served through mlx-embeddings, not mlx-lm)."""
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"


class NotAnEmbeddingModel(ValueError):
    """The dir's sentence-transformers files describe something this worker cannot run as they say."""


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    """How one embedding model turns token states into a vector."""

    pooling: Pooling
    normalize: bool
    dimensions: int
    """The vector's length (the pooled hidden size)."""
    encoder: bool
    """A bidirectional encoder (mlx-embeddings), not an mlx-lm decoder."""
    model_type: str = ""
    prompts: dict[str, str] = field(default_factory=dict)
    """Named prompts put before a text (``config_sentence_transformers.json``)."""
    default_prompt: str | None = None
    """The prompt a request naming none gets (``default_prompt_name``; ``None``: no prompt)."""
    max_seq_length: int = 0
    """Tokens one input may have (``sentence_bert_config.json``; 0: the model's context window)."""
    lower_case: bool = False
    """Texts are lower-cased before tokenizing (``do_lower_case``)."""


def is_embedding_dir(path: str | Path) -> bool:
    """Whether the dir ships sentence-transformers' ``modules.json`` (an embedding model, runnable or not)."""
    return (Path(path) / "modules.json").is_file()


def read_spec(path: str | Path) -> EmbeddingSpec:
    """The dir's embedding pipeline. :raises NotAnEmbeddingModel: no ``modules.json``, or a pipeline we cannot
    run as sentence-transformers would (the message names the module or mode)."""
    root = Path(path)
    modules = _json(root / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise NotAnEmbeddingModel(f"{root}: modules.json is not a list of sentence-transformers modules")
    pooling: Pooling | None = None
    normalize = False
    dims = 0
    transformer: dict[str, Any] = {}
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind == ST_TRANSFORMER:
            bert_config = root / str(module.get("path", "")) / "sentence_bert_config.json"
            transformer = _json(bert_config) if bert_config.is_file() else {}
            continue
        if kind == ST_POOLING:
            config = _json(root / str(module.get("path", "")) / "config.json")
            pooling = _pooling(config, root)
            dims = int(config.get("word_embedding_dimension") or 0)
        elif kind == ST_NORMALIZE:
            normalize = True
        else:
            raise NotAnEmbeddingModel(
                f"{root}: modules.json has a {kind or 'nameless'} module, which this worker cannot run "
                "(supported: Transformer, Pooling, Normalize)"
            )
    if pooling is None:
        raise NotAnEmbeddingModel(f"{root}: modules.json has no Pooling module")
    config = _json(root / "config.json")
    model_type = str(config.get("model_type", ""))
    hidden = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size") or 0
    st_path = root / "config_sentence_transformers.json"
    st_config = _json(st_path) if st_path.is_file() else {}
    prompts = st_config.get("prompts")
    named = {str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {}
    default = st_config.get("default_prompt_name")
    if default is not None and default not in named:
        raise NotAnEmbeddingModel(f"{st_path}: default_prompt_name {default!r} is not one of its prompts")
    max_seq = transformer.get("max_seq_length")
    return EmbeddingSpec(
        pooling=pooling,
        normalize=normalize,
        dimensions=dims or int(hidden),
        encoder=model_type.lower() in ENCODER_TYPES,
        model_type=model_type,
        prompts=named,
        default_prompt=None if default is None else str(default),
        max_seq_length=max_seq if isinstance(max_seq, int) and max_seq > 0 else 0,
        lower_case=transformer.get("do_lower_case") is True,
    )


def _pooling(config: dict[str, Any], root: Path) -> Pooling:
    chosen = [mode for key, mode in POOLING_KEYS.items() if config.get(key)]
    unsupported = [key for key in UNSUPPORTED_POOLING if config.get(key)]
    if unsupported or len(chosen) != 1:
        modes = ", ".join(unsupported + [k for k, m in POOLING_KEYS.items() if m in chosen]) or "none"
        raise NotAnEmbeddingModel(
            f"{root}: pooling {modes}: this worker pools with exactly one of "
            "pooling_mode_lasttoken, pooling_mode_mean_tokens, pooling_mode_cls_token"
        )
    if config.get("include_prompt") is False:
        raise NotAnEmbeddingModel(f"{root}: pooling with include_prompt false is not supported")
    return chosen[0]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotAnEmbeddingModel(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise NotAnEmbeddingModel(f"{path}: {exc}") from None
