"""OpenAI ``tools``, ``tool_choice``, ``response_format`` and ``logprobs`` fields: Structs and validation.

Schemas are checked where they arrive: each becomes an llguidance grammar (the engine the worker
enforces it with), and one that cannot be built is a 400 naming the field and the problem. The
worker checks again and answers ``invalid_request``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from mlxcluster.controller.errors import ApiError, bad_request
from mlxcluster.protocol import ResponseFormat, ToolCall, ToolChoice, ToolSpec
from mlxcluster.worker.grammar import GrammarError, json_schema_grammar, validate_grammar


class FunctionDef(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OpenAITool(Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    function: FunctionDef | None = None


class NamedFunction(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    function: NamedFunction | None = None


ToolChoiceParam = Literal["none", "auto", "required"] | NamedToolChoice


class CallFunction(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    arguments: str = "{}"


class ToolCallParam(Struct, kw_only=True, forbid_unknown_fields=True):
    id: str = ""
    type: str = "function"
    function: CallFunction


class JsonSchemaParam(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str = "response"
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormatParam(Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaParam | None = None


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming ``param`` unless the worker can enforce ``schema``."""
    try:
        validate_grammar(json_schema_grammar(schema))
    except GrammarError as exc:
        raise bad_request(f"Invalid schema for '{param}': {exc}", param, code="invalid_schema") from None


def convert_tools(tools: list[OpenAITool] | None, param: str) -> list[ToolSpec] | None:
    if not tools:
        return None
    specs = []
    names: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"{param}[{index}]"
        if tool.type != "function" or tool.function is None:
            raise bad_request(
                f"Only function tools are supported (got type '{tool.type}')", f"{where}.type", "unsupported_tool"
            )
        function = tool.function
        if function.name in names:
            raise bad_request(f"Duplicate tool name '{function.name}'", f"{where}.function.name")
        names.add(function.name)
        if function.parameters is not None:
            check_schema(function.parameters, f"{where}.function.parameters")
        specs.append(
            ToolSpec(
                name=function.name,
                description=function.description or "",
                parameters=function.parameters,
                strict=bool(function.strict),
            )
        )
    return specs


def convert_tool_choice(
    choice: str | NamedToolChoice | None, tools: list[ToolSpec] | None, param: str
) -> tuple[ToolChoice, str | None]:
    """``(tool_choice, tool_name)`` for the wire; a choice that names no given tool is a 400."""
    if choice is None:
        return "auto", None
    if isinstance(choice, NamedToolChoice):
        if choice.type != "function" or choice.function is None:
            raise bad_request(f"Unsupported tool_choice type '{choice.type}'", f"{param}.type")
        name = choice.function.name
        if not any(tool.name == name for tool in tools or []):
            raise bad_request(f"tool_choice names '{name}', which is not in 'tools'", f"{param}.function.name")
        return "function", name
    if choice == "required" and not tools:
        raise bad_request("tool_choice 'required' needs 'tools'", param)
    return choice, None  # type: ignore[return-value]


def convert_response_format(fmt: ResponseFormatParam | None, param: str) -> ResponseFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    spec = fmt.json_schema
    if spec is None or spec.schema is None:
        raise bad_request(
            "response_format json_schema needs 'json_schema.schema'",
            f"{param}.json_schema.schema",
            "missing_required_parameter",
        )
    check_schema(spec.schema, f"{param}.json_schema.schema")
    return ResponseFormat(type="json_schema", schema=spec.schema, name=spec.name)


def history_tool_calls(calls: list[ToolCallParam] | None, param: str) -> list[ToolCall] | None:
    if not calls:
        return None
    out = []
    for index, call in enumerate(calls):
        if call.type != "function":
            raise bad_request(f"Unsupported tool call type '{call.type}'", f"{param}[{index}].type")
        out.append(ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments))
    return out


def check_logprobs(logprobs: bool | None, top_logprobs: int | None) -> None:
    if top_logprobs and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")


def decode_tool_arguments(text: str) -> Any:
    """Arguments JSON as an object (Anthropic's ``input``, Responses' history); text that is not JSON stays text."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


__all__ = ["ApiError"]
