"""A tiny random-weight Qwen2-VL for vision tests, built offline in about two seconds (needs mlx-vlm).

The demo model's tokenizer (SmolLM2) with Qwen2-VL's four vision tokens added, a Qwen2-VL-style chat template,
a two-layer vision tower and language model (hidden 64), and an image processor config that makes a small
image 4 to 16 image tokens. Output is gibberish but deterministic for a fixed seed.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from tokenizer_families import demo_tokenizer_dir

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% set images = namespace(count=0) %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% set images.count = images.count + 1 %}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{% for _ in range(images.count) %}<|vision_start|><|image_pad|>{% endfor %}"
)
"""Qwen2-VL's markers, but every image at the very end: a random-weight model's next token depends mostly on the
last prompt token, so there the image decides the output (a real template puts it in its turn)."""
IN_TURN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A real Qwen2-VL template's layout: each image in its turn, before the turn's text (the text after it can be
matched by a prompt cache)."""


def build_vision_model(
    path: Path, *, seed: int = 0, chat_template: str = CHAT_TEMPLATE, text_scale: float = 0.05
) -> Path:
    """Write the tiny Qwen2-VL model dir at ``path`` (with ``chat_template``; the language model's weights drawn
    with standard deviation ``text_scale``: larger makes each output token depend on more of the prompt)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import get_model_and_args
    from transformers import AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(chat_template)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    config = {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "eos_token_id": tokenizer.eos_token_id,
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "mlp_ratio": 2,
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    module, _ = get_model_and_args(config)
    model_config = module.ModelConfig.from_dict(dict(config))
    model_config.vision_config = module.VisionConfig.from_dict(config["vision_config"])
    model_config.text_config = module.TextConfig.from_dict(config)
    model = module.Model(model_config)
    mx.random.seed(seed)
    weights = {  # a larger vision tower: different images give far apart image tokens
        name: (mx.random.normal(value.shape) * (0.2 if name.startswith("vision_tower") else text_scale)).astype(
            mx.float32
        )
        for name, value in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def png_bytes(seed: int, size: int = 64) -> bytes:
    """A ``size``-pixel square PNG of seeded noise."""
    import numpy as np
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
