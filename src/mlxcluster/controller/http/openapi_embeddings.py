"""The OpenAPI operation and schemas of ``POST /v1/embeddings`` (``routes_embeddings``).

Kept apart from :mod:`~mlxcluster.controller.http.openapi` (which merges them into its document). The request
body comes from the route's Struct, its ``input`` (a union msgspec cannot state) written here as the route checks it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mlxcluster.controller.http.openapi_parts import (
    INT,
    JSON,
    REF,
    SECURED,
    STR,
    Schema,
    error_response,
    json_content,
    obj,
    ref,
)
from mlxcluster.controller.http.routes_embeddings import MAX_INPUTS, EmbeddingsBody

RETRY_AFTER = {"headers": {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": STR}}}
TOKEN = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
TOKENS = {"type": "array", "items": TOKEN, "minItems": 1}
INPUT: Schema = {
    "description": f"A string, a list of strings, token ids, or lists of token ids; at most {MAX_INPUTS} inputs, "
    "none empty, each within the model's context.",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_INPUTS},
        {**TOKENS, "maxItems": MAX_INPUTS},
        {"type": "array", "items": TOKENS, "minItems": 1, "maxItems": MAX_INPUTS},
    ],
}


def schemas() -> dict[str, Schema]:
    """``EmbeddingsRequest`` and ``EmbeddingList``."""
    _, components = msgspec.json.schema_components([EmbeddingsBody], ref_template=REF)
    request: dict[str, Any] = components["EmbeddingsBody"]
    request["title"] = "EmbeddingsRequest"
    properties = request["properties"]
    properties["input"] = INPUT
    properties["dimensions"]["description"] = (
        "Keep the first n values of each vector, renormalised (Matryoshka); at most the model's vector length."
    )
    properties["prompt_name"]["description"] = (
        "A prompt of the model's sentence-transformers config put before each text (e.g. `query`); text input only. "
        "Unset: the config's `default_prompt_name` prompt, if any."
    )
    properties["encoding_format"]["description"] = "`base64`: each vector's little-endian float32 bytes."
    embedding = obj(
        {
            "object": {"const": "embedding"},
            "index": INT,
            "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}}, STR]},
        }
    )
    return {
        "EmbeddingsRequest": request,
        "EmbeddingList": obj(
            {
                "object": {"const": "list"},
                "data": {"type": "array", "items": embedding},
                "model": STR,
                "usage": obj({"prompt_tokens": INT, "total_tokens": INT}),
            }
        ),
    }


OPERATIONS: dict[str, dict[str, Schema]] = {
    "/v1/embeddings": {
        "post": {
            "summary": "OpenAI embeddings (an embedding model of the fleet: `kind` in /v1/models)",
            "security": SECURED,
            "requestBody": {"required": True, "content": {JSON: {"schema": ref("EmbeddingsRequest")}}},
            "responses": {
                "200": json_content(ref("EmbeddingList"), "One vector per input, in order; usage in tokens."),
                "400": error_response(
                    "A field is invalid (`param` names it): empty or too many inputs, an input past the model's "
                    "context, `dimensions` past its vector length, a chat model (`model_not_embedding`)."
                ),
                "401": error_response("Missing or wrong API key (when `controller.api_keys` is set)."),
                "404": error_response("No worker serves or may load the model (`model_not_found`)."),
                "413": error_response("The body exceeds `controller.max_body_bytes`, or one input NATS `max_payload`."),
                "429": {**error_response("A rate limit of the key (`tpm` counts embedding tokens)."), **RETRY_AFTER},
                "502": error_response("The worker failed the request."),
                "503": {
                    **error_response("No worker can embed now (`no_capacity`), a failed load, or not ready."),
                    **RETRY_AFTER,
                },
                "504": error_response("The request timed out (`code`: `timeout`)."),
            },
        }
    }
}
