"""Tokenizers of the tool-calling families, built offline from the demo model's tokenizer (no weights).

Each family renames some of SmolLM2's unused special tokens (ids 3-16) to the family's markers and writes a chat
template in the family's published format, so that mlx-lm's own inference (``_infer_tool_parser``,
``_infer_thinking``) picks the family's tool parser and think markers exactly as it would for the real model:

- ``qwen3``: ``<think>`` / ``</think>`` and hermes-style ``<tool_call>`` JSON calls, ``enable_thinking`` switch
  (``qwen3_open``: the generation prompt opens the think block, as the 2507 thinking models do);
- ``mistral``: ``[TOOL_CALLS]name[ARGS]{json}``;
- ``qwen3_coder``: ``<tool_call>\\n<function=name>\\n<parameter=p>\\nvalue\\n</parameter>...``;
- ``pythonic``: LFM2-style ``<|tool_call_start|>[f(a=1)]<|tool_call_end|>``;
- ``function_gemma``: a family mlx-lm parses (``call:name{...}``) that we cannot force or constrain;
- ``llama3``: a template that renders tools, but in a format mlx-lm has no parser for (our fallback applies);
- ``plain``: the demo's own template, no tools at all.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

QWEN3 = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function %}{% set tool_call = tool_call.function %}{% endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% elif OPENS_THINK %}<think>
{% endif %}{% endif %}"""

MISTRAL = """\
{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}[SYSTEM_PROMPT]{{ message.content }}[/SYSTEM_PROMPT]
{%- elif message.role == 'user' %}[INST]{{ message.content }}[/INST]
{%- elif message.role == 'assistant' %}{{ message.content }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.id is not defined or tool_call.id | length != 9 %}
{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}
{%- if tool_call.function.arguments is string %}{% set args = tool_call.function.arguments %}
{%- else %}{% set args = tool_call.function.arguments | tojson %}{% endif %}
[TOOL_CALLS]{{ tool_call.function.name }}[ARGS]{{ args }}
{%- endfor %}{{ eos_token }}
{%- elif message.role == 'tool' %}
{%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}
{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}
[TOOL_RESULTS]{{ message.tool_call_id }}[TOOL_CONTENT]{{ message.content }}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"""

QWEN3_CODER = """\
{%- if tools %}<|im_start|>system
You have access to the following functions:

<tools>
{%- for tool in tools %}
<function>
<name>{{ tool.function.name }}</name>
<parameters>{{ tool.function.parameters | tojson }}</parameters>
</function>
{%- endfor %}
</tools>

If you choose to call a function ONLY reply in the following format with NO suffix:

<tool_call>
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
</function>
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or message.role == 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function %}{% set tool_call = tool_call.function %}{% endif %}
<tool_call>
<function={{ tool_call.name }}>
{% for name, value in tool_call.arguments | items %}
{{- '<parameter=' + name + '>\n' }}
{%- if value is string %}{{ value }}{% else %}{{ value | tojson }}{% endif %}
{{- '\n</parameter>\n' }}
{%- endfor %}</function>
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

PYTHONIC = """\
{%- if tools %}<|im_start|>system
List of tools: <|tool_list_start|>{{ tools | tojson }}<|tool_list_end|><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- if message.tool_calls %}<|tool_call_start|>[
{%- for tool_call in message.tool_calls %}{{ tool_call.function.name }}(
{%- for name, value in tool_call.function.arguments | items %}{{ name }}={{ value | tojson }}
{%- if not loop.last %}, {% endif %}{% endfor %}){% if not loop.last %}, {% endif %}
{%- endfor %}]<|tool_call_end|>{% endif %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3 = """\
{%- if tools %}<|im_start|>system
Environment: ipython
Respond with a JSON {"name": function name, "parameters": arguments}. Functions: {{ tools | tojson }}<|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.tool_calls %}{{ message.tool_calls[0].function | tojson }}
{%- else %}{{ message.content }}{% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

FUNCTION_GEMMA = """\
{%- if tools %}<|im_start|>system
Functions: {{ tools | tojson }}. Call one as <start_function_call>call:name{arg:value}<end_function_call><|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

FAMILIES: dict[str, tuple[str, list[str]]] = {
    "qwen3": (QWEN3.replace("OPENS_THINK", "false"), ["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "qwen3_open": (QWEN3.replace("OPENS_THINK", "true"), ["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "mistral": (
        MISTRAL,
        [
            "[TOOL_CALLS]",
            "[ARGS]",
            "[INST]",
            "[/INST]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
            "[TOOL_CONTENT]",
            "[SYSTEM_PROMPT]",
            "[/SYSTEM_PROMPT]",
        ],
    ),
    "qwen3_coder": (QWEN3_CODER, ["<tool_call>", "</tool_call>"]),
    "pythonic": (PYTHONIC, ["<|tool_call_start|>", "<|tool_call_end|>", "<|tool_list_start|>", "<|tool_list_end|>"]),
    "function_gemma": (FUNCTION_GEMMA, ["<start_function_call>", "<end_function_call>"]),
    "llama3": (LLAMA3, []),
    "plain": ("", []),
}
VOCAB_SIZE = 49152
"""The demo model's logits width."""
FIRST_FREE_ID = 3
"""SmolLM2's special tokens 3-16 (``<repo_name>`` ...) are not used by chat: they become the family's markers."""


def demo_tokenizer_dir() -> Path:
    from mlxcluster.models.demo import ensure_demo_model
    from mlxcluster.models.registry import default_models_dir

    return ensure_demo_model(Path(os.environ.get("MLXCLUSTER_MODELS_DIR") or default_models_dir()))


def write_family(family: str, path: Path, source: Path | None = None) -> Path:
    """A tokenizer dir for ``family`` at ``path`` (tokenizer files only; load it with mlx-lm's tokenizer loader)."""
    template, markers = FAMILIES[family]
    source = source or demo_tokenizer_dir()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer: dict[str, Any] = json.loads((source / "tokenizer.json").read_text())
    config: dict[str, Any] = json.loads((source / "tokenizer_config.json").read_text())
    renames = {FIRST_FREE_ID + i: marker for i, marker in enumerate(markers)}
    vocab = tokenizer["model"]["vocab"]
    for added in tokenizer["added_tokens"]:
        if added["id"] in renames:
            del vocab[added["content"]]
            added["content"] = renames[added["id"]]
            vocab[added["content"]] = added["id"]
            config["added_tokens_decoder"][str(added["id"])]["content"] = added["content"]
    if template:
        config["chat_template"] = template
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(source / "special_tokens_map.json", path / "special_tokens_map.json")
    return path


def load_family(family: str, root: Path) -> Any:
    """mlx-lm's TokenizerWrapper for ``family`` (its tool parser and think markers inferred by mlx-lm)."""
    from mlx_lm.tokenizer_utils import load

    path = root / family
    if not (path / "tokenizer.json").exists():
        write_family(family, path)
    return load(path)


@functools.cache
def family_tokenizer(family: str) -> Any:
    """:func:`load_family` in a directory shared by the whole test session (built once per family)."""
    return load_family(family, _session_root())


@functools.cache
def family_features(family: str) -> Any:
    """The worker's :class:`~mlxcluster.worker.features.EngineFeatures` on ``family``'s tokenizer (built once)."""
    from mlxcluster.worker.features import EngineFeatures

    tokenizer = family_tokenizer(family)
    return EngineFeatures(tokenizer, VOCAB_SIZE, sorted(tokenizer.eos_token_ids))


@functools.cache
def _session_root() -> Path:
    root = tempfile.TemporaryDirectory(prefix="tokenizer-families-")
    atexit.register(root.cleanup)
    return Path(root.name)
