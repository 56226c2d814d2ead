"""The OpenAPI operations and schemas of the shared-state routes (``routes_keys``): keys at runtime and usage.

Kept apart from :mod:`~mlxcluster.controller.http.openapi` (which merges them into its document) so neither
module grows past a readable size. Request bodies come from the routes' own Structs.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mlxcluster.controller.http.openapi_parts import (
    BOOL,
    INT,
    JSON,
    NULLABLE_INT,
    NULLABLE_NUM,
    REF,
    SECURED,
    STR,
    Schema,
    error_response,
    json_content,
    obj,
    ref,
)
from mlxcluster.controller.http.routes_keys import KeyChange, KeyCreate

RECORD_FIELDS: dict[str, Schema] = {
    "name": STR,
    "models": {"type": "array", "items": STR},
    "rpm": NULLABLE_INT,
    "tpm": NULLABLE_INT,
    "max_concurrent": NULLABLE_INT,
    "admin": BOOL,
    "expires_at": NULLABLE_NUM,
    "created_at": {"type": "number"},
    "updated_at": {"type": "number"},
    "revoked": BOOL,
    "revoked_at": NULLABLE_NUM,
    "source": {"enum": ["api", "config"]},
    "generation": INT,
}
TOTALS_FIELDS: dict[str, Schema] = {
    name: INT for name in ("requests", "errors", "cancelled", "prompt_tokens", "cached_tokens", "completion_tokens")
}
USAGE_ROW = {
    "type": "object",
    "properties": {"day": STR, "model": STR, **TOTALS_FIELDS},
    "required": ["day", *TOTALS_FIELDS],
}

SCHEMAS: dict[str, Schema] = {
    "KeyRecord": obj(RECORD_FIELDS),
    "KeyWithValue": obj({**RECORD_FIELDS, "key": {**STR, "description": "The key's value: shown this once."}}),
    "KeyUsage": obj(
        {
            "key": STR,
            "since": {"type": ["string", "null"]},
            "by": {"enum": ["day", "model"]},
            **TOTALS_FIELDS,
            "rows": {"type": "array", "items": USAGE_ROW},
        }
    ),
}

NAME_PARAM = {"name": "name", "in": "path", "required": True, "schema": STR}
UNAUTHORIZED = error_response("Missing or wrong API key.")
NOT_ADMIN = error_response("Not an admin key (`admin_required`).")
SHARED_OFF = "or the controller runs without shared state (`shared_state_off`)"


UNAVAILABLE = {
    **error_response("JetStream did not answer (a bucket's leader being elected): `shared_state_unavailable`; retry."),
    "headers": {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": STR}},
}


def _op(summary: str, responses: dict[str, Schema], **extra: Any) -> Schema:
    answers = {**responses, "401": UNAUTHORIZED, "503": UNAVAILABLE}
    return {"summary": summary, "security": SECURED, **extra, "responses": answers}


def _body(name: str) -> Schema:
    return {"required": True, "content": {JSON: {"schema": ref(name)}}}


OPERATIONS: dict[str, dict[str, Schema]] = {
    "/api/cluster/keys/{name}": {
        "patch": _op(
            "Change a key's limits, models, role or expiry (admin key); `null` removes a limit",
            {
                "200": json_content(ref("KeyRecord"), "The key as changed."),
                "400": error_response("A bad field (`param` names it)."),
                "403": NOT_ADMIN,
                "404": error_response("No such key (`key_not_found`)."),
                "409": error_response(f"The key comes from a config file (`key_conflict`), {SHARED_OFF}."),
            },
            parameters=[NAME_PARAM],
            requestBody=_body("KeyChange"),
        )
    },
    "/api/cluster/keys/{name}/revoke": {
        "post": _op(
            "Revoke a key on every controller (admin key); its record and usage stay",
            {
                "200": json_content(ref("KeyRecord"), "The revoked key."),
                "403": NOT_ADMIN,
                "404": error_response("No such key (`key_not_found`)."),
                "409": error_response(f"The key comes from a config file (`key_conflict`), {SHARED_OFF}."),
            },
            parameters=[NAME_PARAM],
        )
    },
    "/api/cluster/keys/{name}/rotate": {
        "post": _op(
            "Give a key a new value, answered once (admin key); the old value is refused from now on",
            {
                "200": json_content(ref("KeyWithValue"), "The key and its new value."),
                "403": NOT_ADMIN,
                "404": error_response("No such key (`key_not_found`)."),
                "409": error_response(
                    f"The key is revoked or comes from a config file (`key_conflict`), {SHARED_OFF}."
                ),
            },
            parameters=[NAME_PARAM],
        )
    },
    "/api/cluster/usage": {
        "get": _op(
            "A key's usage per day (or per day and model), kept in JetStream across restarts",
            {
                "200": json_content(ref("KeyUsage"), "Totals and rows; `requests` counts those answered in full."),
                "400": error_response("No `key`, a bad `since` or `by`, or an unknown parameter (`param` names it)."),
                "403": error_response("A non-admin key asked for another key's usage (`admin_required`)."),
                "404": error_response("No such key (`key_not_found`)."),
                "409": error_response(
                    "Usage is not kept: the controller runs without shared state (`shared_state_off`)."
                ),
            },
            parameters=[
                {"name": "key", "in": "query", "schema": STR, "description": "Default: the caller's own key."},
                {"name": "since", "in": "query", "schema": STR, "description": "A day YYYY-MM-DD or unix seconds."},
                {"name": "by", "in": "query", "schema": {"enum": ["day", "model"]}},
            ],
        )
    },
}

CREATE_KEY: Schema = _op(
    "Create an API key (admin key); its value is answered once, in `key`",
    {
        "201": json_content(ref("KeyWithValue"), "The key and its value."),
        "400": error_response("A bad field (`param` names it)."),
        "403": NOT_ADMIN,
        "409": error_response(f"A key of that name exists (`key_conflict`), {SHARED_OFF}."),
    },
    requestBody=_body("KeyCreate"),
)
"""``POST /api/cluster/keys`` (the path's ``GET`` is in the main document)."""


def schemas() -> dict[str, Schema]:
    """The component schemas of these operations: request bodies from the Structs, responses from above."""
    _, components = msgspec.json.schema_components([KeyCreate, KeyChange], ref_template=REF)
    return {**components, **SCHEMAS}
