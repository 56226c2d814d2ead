"""The pieces every part of the OpenAPI document is written with: schema fragments, references, responses.

Shared by :mod:`~mlxcluster.controller.http.openapi` and :mod:`~mlxcluster.controller.http.openapi_keys`.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]
REF = "#/components/schemas/{name}"
JSON = "application/json"
SECURED: list[dict[str, list[str]]] = [{"bearerAuth": []}]
PUBLIC: list[dict[str, list[str]]] = []

INT = {"type": "integer"}
STR = {"type": "string"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
NULLABLE_STR = {"type": ["string", "null"]}
NULLABLE_INT = {"type": ["integer", "null"]}
NULLABLE_NUM = {"type": ["number", "null"]}
STRINGS = {"type": "array", "items": STR}


def ref(name: str) -> Schema:
    """A reference to the component schema ``name``."""
    return {"$ref": REF.format(name=name)}


def json_content(schema: Schema, description: str) -> Schema:
    """A response (or body) of JSON in ``schema``."""
    return {"description": description, "content": {JSON: {"schema": schema}}}


def error_response(description: str) -> Schema:
    """A response carrying the API's error shape."""
    return json_content(ref("Error"), description)


def obj(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    """An object schema; every property required unless ``required`` says which."""
    return {"type": "object", "properties": properties, "required": required or list(properties)}
