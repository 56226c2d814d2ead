"""OpenAI ``tools``, ``tool_choice``, ``response_format`` and ``logprobs`` fields: Structs and validation.

The function, the named choice and the JSON schema are the Structs every API shares
(:mod:`mlxcluster.controller.http.tool_schema`); here is how OpenAI chat nests them. Schemas are checked
where they arrive (a 400 naming the field); the worker checks again and answers ``invalid_request``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.controller.http.tool_schema import FunctionDef, SchemaFormat, choose_tool, output_format
from mlxcluster.protocol import ResponseFormat, ToolCall, ToolChoice, ToolSpec


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


class JsonSchemaParam(SchemaFormat, kw_only=True):
    name: str = "response"


class ResponseFormatParam(Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaParam | None = None


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
        specs.append(function.spec(f"{where}.function.parameters"))
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
        return choose_tool(choice.function.name, tools, f"{param}.function.name")
    if choice == "required" and not tools:
        raise bad_request("tool_choice 'required' needs 'tools'", param)
    return choice, None  # type: ignore[return-value]


def convert_response_format(fmt: ResponseFormatParam | None, param: str) -> ResponseFormat | None:
    return None if fmt is None else output_format(fmt.type, fmt.json_schema, param, "json_schema.schema")


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


__all__ = ["ApiError", "FunctionDef"]
