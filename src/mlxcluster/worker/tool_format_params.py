"""Tool-call formats whose arguments are written one parameter at a time: ``qwen3_coder`` and ``pythonic``.

Their grammars write a strict tool's parameters in its schema's order (each optional one may be left out),
each value as the family's parser reads it back into the schema's type: qwen3_coder's parser converts each
value by the parameter's declared ``type`` (a string raw, the others as JSON), pythonic's reads Python
literals, of which JSON's values (with ``true``/``false``/``null``, which it maps) are a subset.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mlxcluster.json_grammar import GrammarError
from mlxcluster.protocol import ToolCall, ToolSpec
from mlxcluster.worker.lark_text import TOOL_JSON_OPTIONS, LarkVocab, json_value, ordered_fields, regex_literal
from mlxcluster.worker.tool_format_base import ToolFormat, arguments_value, hoist_defs
from mlxcluster.worker.tool_stream import CallStreamer

_CODER_JSON_TYPES = {"integer", "number", "boolean", "object", "array"}
_STRING_KEYWORDS = {"pattern", "format", "minLength", "maxLength"}
_PARAM_END = "</parameter>"
_ANY_VALUE = f"/(?s:.*)\\n{regex_literal(_PARAM_END)}/ & ~/(?s:.*){regex_literal(_PARAM_END)}(?s:.+)/"
"""A qwen3_coder value with the ``\\n</parameter>`` that closes it: one lexeme, in which the closing marker
occurs once (the parser cuts at the first)."""
_STRING_VALUE = f"{_ANY_VALUE} & ~/(?i:null)\\n{regex_literal(_PARAM_END)}/"
"""A string value: never the bare word null (which the parser reads as None)."""


def _properties(tool: ToolSpec) -> tuple[dict[str, Any], set[str]]:
    """A tool's parameters, each schema standing on its own (the definitions it refers to beside it), and the
    required ones."""
    parameters, defs = hoist_defs(tool.parameters or {}, "")
    properties = {
        name: {**schema, "$defs": defs} if defs else schema
        for name, schema in (parameters.get("properties") or {}).items()
    }
    return properties, set(parameters.get("required") or [])


def object_arguments(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as an object, for formats that write each one as a named parameter."""
    arguments = arguments_value(call)
    if not isinstance(arguments, dict):
        raise GrammarError(f"tool call '{call.name}' has arguments that are not an object; it cannot be written back")
    return arguments


class Qwen3CoderFormat(ToolFormat):
    """``<tool_call>\\n<function=name>\\n<parameter=p>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>``."""

    name = "qwen3_coder"
    constrainable = True
    separator = '"\\n"?'

    def body_rules(self, tools: Sequence[ToolSpec], strict: Sequence[bool], vocab: LarkVocab, *, several: bool) -> str:
        rules = [
            f'body: "\\n" ({" | ".join(f"fn{i}" for i in range(len(tools)))}) "\\n" {vocab.literal(self.end)}',
            f"STRING_VALUE: {_STRING_VALUE}",
            f"ANY_VALUE: {_ANY_VALUE}",
        ]
        for index, (tool, constrained) in enumerate(zip(tools, strict, strict=True)):
            head = json.dumps(f"<function={tool.name}>\n")
            if not constrained:
                rules.append(f'fn{index}: {head} any_param* "</function>"')
                continue
            properties, required = _properties(tool)
            fields = []
            for number, (name, schema) in enumerate(properties.items()):
                rules.append(
                    f"fn{index}_p{number}: {json.dumps(f'<parameter={name}>' + chr(10))} {_value(tool, name, schema)}"
                )
                fields.append((f"fn{index}_p{number}", name in required))
            rules.append(f'fn{index}: {head} {ordered_fields(fields, "")} "</function>"')
        rules.append('any_param: "<parameter=" PARAM_NAME ">\\n" ANY_VALUE "\\n"')
        rules.append("PARAM_NAME: /[^\\s<>]+/")
        return "\n".join(rules) + "\n"

    def render_call(self, call: ToolCall) -> str:
        arguments = object_arguments(call)
        params = "".join(
            f"<parameter={name}>\n{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}\n"
            f"{_PARAM_END}\n"
            for name, value in arguments.items()
        )
        return f"{self.start}\n<function={call.name}>\n{params}</function>\n{self.end}"

    def streamer(self, tools: list[dict[str, Any]], *, limit: int | None) -> CallStreamer | None:
        from mlxcluster.worker.tool_stream_params import CoderCallStreamer

        return CoderCallStreamer(self.parser, tools)


def _value(tool: ToolSpec, name: str, schema: dict[str, Any]) -> str:
    """One qwen3_coder parameter's value and its closing, as a Lark expression."""
    kind = schema.get("type")
    where = f"parameter '{name}' of tool '{tool.name}'"
    closing = json.dumps(f"\n{_PARAM_END}\n")
    if kind == "string":
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not all(isinstance(v, str) for v in values):
                raise GrammarError(f"cannot enforce {where} in this model's format (qwen3_coder)", param="tools")
            return "(" + " | ".join(json.dumps(v) for v in values) + f") {closing}"
        if _STRING_KEYWORDS & schema.keys():
            raise GrammarError(
                f"cannot enforce {where} in this model's format (qwen3_coder): "
                f"its {sorted(_STRING_KEYWORDS & schema.keys())} constraints have no grammar there",
                param="tools",
            )
        return 'STRING_VALUE "\\n"'
    if kind in _CODER_JSON_TYPES:
        return f"{json_value(schema, TOOL_JSON_OPTIONS)} {closing}"
    raise GrammarError(
        f"cannot enforce {where} in this model's format (qwen3_coder): a parameter needs one 'type' "
        f"(string, {', '.join(sorted(_CODER_JSON_TYPES))})",
        param="tools",
    )


class PythonicFormat(ToolFormat):
    """``<|tool_call_start|>[name(a=1, b="x"), other()]<|tool_call_end|>`` (mlx-lm's ``pythonic``)."""

    name = "pythonic"
    constrainable = True
    calls_in_one_block = True

    def body_rules(self, tools: Sequence[ToolSpec], strict: Sequence[bool], vocab: LarkVocab, *, several: bool) -> str:
        more = ' (", " fcall)*' if several else ""
        rules = [
            f'body: "[" fcall{more} "]" {vocab.literal(self.end)}',
            f"fcall: {' | '.join(f'fn{i}' for i in range(len(tools)))}",
            f'any_kwarg: KEYWORD "=" {json_value({}, TOOL_JSON_OPTIONS)}',
            "KEYWORD: /[A-Za-z_][A-Za-z0-9_]*/",
        ]
        for index, (tool, constrained) in enumerate(zip(tools, strict, strict=True)):
            head = json.dumps(f"{tool.name}(")
            if not constrained:
                rules.append(f'fn{index}: {head} (any_kwarg (", " any_kwarg)*)? ")"')
                continue
            properties, required = _properties(tool)
            fields = [
                (f"{json.dumps(name + '=')} {json_value(schema, TOOL_JSON_OPTIONS)}", name in required)
                for name, schema in properties.items()
            ]
            rules.append(f'fn{index}: {head} {ordered_fields(fields, json.dumps(", "))} ")"')
        return "\n".join(rules) + "\n"

    def render_call(self, call: ToolCall) -> str:
        arguments = object_arguments(call)
        kwargs = ", ".join(f"{name}={json.dumps(value, ensure_ascii=False)}" for name, value in arguments.items())
        return f"{self.start}[{call.name}({kwargs})]{self.end}"
