"""One tool-call format per model: the markup its prompt shows is the markup that is parsed, forced and streamed.

mlx-lm infers a model's tool parser from its chat template (``tokenizer_utils._infer_tool_parser``). Where the
template renders tools and mlx-lm has a parser for it, the model's own format is used (:func:`tool_format`):
``json_tools`` (hermes / Qwen: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``), ``mistral``
(``[TOOL_CALLS]name[ARGS]{...}``, no end marker: the call runs to the end of the output), ``qwen3_coder`` and
``pythonic`` (:mod:`~mlxcluster.worker.tool_format_params`); any other family mlx-lm parses is parsed but cannot
be forced, constrained or continued. Elsewhere our **fallback** applies: json_tools markup, announced by our own
system prompt (:mod:`~mlxcluster.worker.prompt`).

Each format gives its markers, ``parse`` (mlx-lm's own parser; a call that does not parse is passed on as
content, never dropped), the grammar of one call block after its start marker (:meth:`ToolFormat.body_rules`,
from which :func:`forced_answer` and :func:`strict_answer` build the forced and the ``strict`` grammars),
``render_call`` (the text the model would have written for a call) and, where its arguments are JSON or can be
made JSON as they arrive, an argument streamer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from mlxcluster.json_grammar import GrammarError
from mlxcluster.protocol import ToolCall, ToolSpec
from mlxcluster.worker.lark_text import TOOL_JSON_OPTIONS, LarkVocab, json_value, text_rule
from mlxcluster.worker.tool_format_base import ANY_OBJECT, ToolFormat, canonical_arguments, hoist_defs
from mlxcluster.worker.tool_format_params import PythonicFormat, Qwen3CoderFormat
from mlxcluster.worker.tool_stream import CallStreamer, JsonCallStreamer, MistralCallStreamer

_MISTRAL_NAME = re.compile(r"[\w-]+")


class JsonToolsFormat(ToolFormat):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (mlx-lm's ``json_tools``)."""

    name = "json_tools"
    constrainable = True
    separator = '"\\n"?'

    def body_rules(self, tools: Sequence[ToolSpec], strict: Sequence[bool], vocab: LarkVocab, *, several: bool) -> str:
        variants = []
        defs: dict[str, Any] = {}
        for index, (tool, constrained) in enumerate(zip(tools, strict, strict=True)):
            arguments, own = (
                hoist_defs(tool.parameters or ANY_OBJECT, f"t{index}_") if constrained else (ANY_OBJECT, {})
            )
            defs.update(own)
            variants.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": tool.name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        if defs:
            schema = {**schema, "$defs": defs}
        return (
            f'body: "\\n" call_json "\\n" {vocab.literal(self.end)}\n'
            f"call_json: {json_value(schema, TOOL_JSON_OPTIONS)}\n"
        )

    def render_call(self, call: ToolCall) -> str:
        arguments = canonical_arguments(call)
        body = '{"name": ' + json.dumps(call.name, ensure_ascii=False) + ', "arguments": ' + arguments + "}"
        return f"{self.start}\n{body}\n{self.end}"

    def streamer(self, tools: list[dict[str, Any]], *, limit: int | None) -> CallStreamer | None:
        return JsonCallStreamer()


class MistralFormat(ToolFormat):
    """``[TOOL_CALLS]name[ARGS]{...}``, repeated for several calls; no end marker (mlx-lm's ``mistral``)."""

    name = "mistral"
    constrainable = True
    text_after_calls = False
    ARGS = "[ARGS]"

    def body_rules(self, tools: Sequence[ToolSpec], strict: Sequence[bool], vocab: LarkVocab, *, several: bool) -> str:
        rules = []
        for index, (tool, constrained) in enumerate(zip(tools, strict, strict=True)):
            if not _MISTRAL_NAME.fullmatch(tool.name):
                raise GrammarError(
                    f"tool '{tool.name}' cannot be called in this model's format (mistral): names are letters, "
                    "digits, '_' and '-'",
                    param="tools",
                )
            schema = (tool.parameters or ANY_OBJECT) if constrained else ANY_OBJECT
            rules.append(
                f"fn{index}: {json.dumps(tool.name)} {vocab.literal(self.ARGS)} {json_value(schema, TOOL_JSON_OPTIONS)}"
            )
        alternatives = " | ".join(f"fn{i}" for i in range(len(rules)))
        return f"body: {alternatives}\n" + "\n".join(rules) + "\n"

    def render_call(self, call: ToolCall) -> str:
        return f"{self.start}{call.name}{self.ARGS}{canonical_arguments(call)}"

    def streamer(self, tools: list[dict[str, Any]], *, limit: int | None) -> CallStreamer | None:
        return MistralCallStreamer(limit=limit)

    def history_id(self, ident: str) -> str:
        """Mistral's templates want ids of 9 letters or digits: a digest of ours (alike for a call and its result)."""
        if len(ident) == 9 and ident.isalnum():
            return ident
        return hashlib.sha256(ident.encode()).hexdigest()[:9]


def forced_answer(fmt: ToolFormat, tools: Sequence[ToolSpec], *, parallel: bool, vocab: LarkVocab) -> str:
    """Lark rules defining ``answer``: one call of ``tools`` (several with ``parallel``), each following its
    schema, nothing else."""
    if not fmt.constrainable:
        raise GrammarError(
            f"cannot force a tool call for this model: its tool-call format ({fmt.name}) cannot be constrained; "
            "use tool_choice 'auto'",
            param="tool_choice",
        )
    start = vocab.literal(fmt.start)
    several = parallel and fmt.calls_in_one_block
    body = fmt.body_rules(tools, [True] * len(tools), vocab, several=several)
    if parallel and not fmt.calls_in_one_block:
        return f"answer: {start} body ({fmt.separator} {start} body)*\n" + body
    return f"answer: {start} body\n" + body


def strict_answer(fmt: ToolFormat, tools: Sequence[ToolSpec], *, parallel: bool, vocab: LarkVocab) -> str:
    """Lark rules defining ``answer`` under ``tool_choice: auto`` with ``strict`` tools: free text, and each call
    from its start marker on follows the format's call grammar, a strict tool's arguments its schema (a call
    of a tool that is not strict is held to the format's shape only, so it still parses)."""
    if not fmt.constrainable:
        raise GrammarError(
            f"'strict' tools cannot be enforced for this model: its tool-call format ({fmt.name}) cannot be "
            "constrained; leave 'strict' out",
            param="tools",
        )
    several = parallel and fmt.calls_in_one_block
    body = fmt.body_rules(tools, [tool.strict for tool in tools], vocab, several=several)
    repeat = "*" if parallel else "?"
    free = text_rule("FREE", [fmt.start])
    start = vocab.literal(fmt.start)
    if vocab.is_text(fmt.start):  # free text and the marker are one lexeme (see lark_text)
        head = vocab.text_then("call_head", fmt.start)
        if fmt.text_after_calls:
            answer = f"answer: (call_head body){repeat} FREE?\n"
        else:
            answer = f"answer: FREE? | call_head body ({start} body){repeat}\n"
        return answer + head + body + free
    after = " FREE?" if fmt.text_after_calls else ""
    return f"answer: FREE? ({start} body{after}){repeat}\n" + body + free


def tool_format(tokenizer: Any) -> ToolFormat:
    """The tool-call format of a model: its own (mlx-lm's parser, its template renders the tools) or our fallback."""
    parser = getattr(tokenizer, "tool_parser", None) if getattr(tokenizer, "has_tool_calling", False) else None
    template = getattr(tokenizer, "chat_template", None)
    if parser is None or not (isinstance(template, str) and "tools" in template):
        return fallback_format()
    family = getattr(parser, "__module__", "").rsplit(".", 1)[-1]
    formats: dict[str, type[ToolFormat]] = {
        "json_tools": JsonToolsFormat,
        "mistral": MistralFormat,
        "qwen3_coder": Qwen3CoderFormat,
        "pythonic": PythonicFormat,
    }
    kind = formats.get(family, ToolFormat)
    return kind(tokenizer.tool_call_start, tokenizer.tool_call_end or "", parser, native=True, name=family)


def fallback_format() -> ToolFormat:
    """Our own: json_tools markup announced by our system prompt, where mlx-lm has no parser for the template."""
    from mlx_lm.tool_parsers import json_tools

    return JsonToolsFormat(
        json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call, native=False, name="fallback"
    )
