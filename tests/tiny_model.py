"""A tiny random-weight mlx-lm llama for engine tests, built in about a second.

Byte-level BPE tokenizer made with ``tokenizers``, a chat template, weights from ``mx.save_safetensors``.
Its output is gibberish but deterministic; the weights are shaped so it never samples special or
non-ASCII tokens and, in the ``eos_first`` variant, always ends at once.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! 0123456789 héllo wörld ünïcödé 東京 🙂",
    "def f(x):\n    return x + 1\n",
]


def build_tiny_model(
    path: Path,
    *,
    eos_first: bool = False,
    seed: int = 0,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 400,
) -> Path:
    """Write a random-weight mlx-lm llama model dir (hidden 64, 2 layers, ~400-token byte-level BPE).

    ``hidden``, ``heads`` and ``kv_heads`` change its shape (a worker group of N needs heads divisible by N);
    ``vocab_size`` its tokenizer (another size: another vocabulary).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id("<|im_end|>")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": 2,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "eos_token_id": eos,
    }
    (path / "config.json").write_text(json.dumps(config))

    mx.random.seed(seed)
    weights = dict(tree_flatten(llama.Model(llama.ModelArgs.from_dict(config)).parameters()))
    # A large constant in hidden dim 0 survives the final RMSNorm as a positive feature, so column 0
    # of the output head is a per-token bias: -10 bans a token, +10 makes it win.
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = mx.concatenate([mx.full((vocab, 1), 30.0), embed[:, 1:]], axis=1)
    bias = []
    for token_id in range(vocab):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        banned = tokenizer.id_to_token(token_id) in SPECIAL_TOKENS or not (text.isascii() and text.isprintable())
        bias.append(-10.0 if banned else 0.0)
    bias[eos] = 10.0 if eos_first else -10.0
    head = mx.random.normal((vocab, hidden)) * 0.5
    weights["lm_head.weight"] = mx.concatenate([mx.array(bias)[:, None], head[:, 1:]], axis=1)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path
