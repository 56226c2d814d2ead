"""The tool fields every API shares: a function tool, a tool choice naming one tool, a JSON schema for the output.

One Struct each, and the checks that go with it. Each API subclasses the Struct where it nests or names
a field its own way (OpenAI chat nests the function under ``tools[].function``, the Responses API flattens
it, Anthropic calls ``parameters`` ``input_schema``), so the fields, their checks and the 400s that name
them are written once. Schemas are checked where they arrive: each becomes an llguidance grammar (the
engine the worker enforces it with), and one that cannot be built is a 400 naming the field.
(The Structs' docstrings would be the descriptions ``/openapi.json`` shows: our notes on them are comments.)
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct

from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.json_grammar import GrammarError, json_schema_grammar, validate_grammar
from mlxcluster.protocol import ResponseFormat, ToolChoice, ToolSpec


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming ``param`` unless the worker can enforce ``schema``."""
    try:
        validate_grammar(json_schema_grammar(schema))
    except GrammarError as exc:
        raise bad_request(f"Invalid schema for '{param}': {exc}", param, code="invalid_schema") from None


# A function the model may call: OpenAI chat's ``tools[].function``; the other APIs' tools extend it.
class FunctionDef(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def spec(self, parameters_param: str) -> ToolSpec:
        """The wire ToolSpec; a schema the worker cannot enforce is a 400 naming ``parameters_param``."""
        if self.parameters is not None:
            check_schema(self.parameters, parameters_param)
        return ToolSpec(
            name=self.name, description=self.description or "", parameters=self.parameters, strict=bool(self.strict)
        )


# A ``tool_choice`` that names one tool, ``{"type": ..., "name": ...}``: Responses'; Anthropic's extends it.
class NamedTool(Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    name: str | None = None


# A JSON schema the output must follow: OpenAI chat's ``response_format.json_schema`` and the Responses
# API's ``text.format`` extend it.
class SchemaFormat(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


def not_in_tools(name: str | None, param: str) -> ApiError:
    return bad_request(f"tool_choice names '{name}', which is not in 'tools'", param)


def choose_tool(name: str | None, tools: list[ToolSpec] | None, param: str) -> tuple[ToolChoice, str | None]:
    """``("function", name)`` for a choice naming one of ``tools``, else a 400 naming ``param``."""
    if not any(tool.name == name for tool in tools or []):
        raise not_in_tools(name, param)
    return "function", name


def output_format(kind: str, spec: SchemaFormat | None, owner: str, schema_path: str) -> ResponseFormat | None:
    """The wire ResponseFormat of ``kind`` (text, json_object, json_schema) with ``spec``'s schema, checked.

    :param owner: the field that holds the format (``response_format``, ``text.format``).
    :param schema_path: where the schema is below ``owner`` (``json_schema.schema``, ``schema``).
    """
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(type="json_object")
    param = f"{owner}.{schema_path}"
    if spec is None or spec.schema is None:
        raise bad_request(f"{owner} json_schema needs '{schema_path}'", param, "missing_required_parameter")
    check_schema(spec.schema, param)
    return ResponseFormat(type="json_schema", schema=spec.schema, name=spec.name or "")
