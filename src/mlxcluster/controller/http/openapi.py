"""The controller's OpenAPI 3.1 document, served at ``GET /openapi.json`` (no API key needed).

Request bodies are generated from the msgspec Structs the routes decode (``msgspec.json.schema_components``),
then tightened with the checks the routes make after decoding (roles, one prompt, ``n == 1``...), so the
document says what the server accepts. Paths, responses and the error shape are written here. An operation
is listed only when the app has its route, so ``/metrics`` appears when an exporter plugin serves it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from mlxcluster import __version__
from mlxcluster.api import WorkerView
from mlxcluster.controller.http import openapi_embeddings, openapi_keys
from mlxcluster.controller.http.anthropic_schema import MessagesRequest
from mlxcluster.controller.http.openai_schema import (
    LOGIT_BIAS_KEY,
    MAX_STOP_SEQUENCES,
    ROLES,
    ChatCompletionRequest,
    CompletionRequest,
)
from mlxcluster.controller.http.openapi_parts import (
    BOOL,
    INT,
    JSON,
    NULLABLE_NUM,
    NULLABLE_STR,
    NUM,
    PUBLIC,
    REF,
    SECURED,
    STR,
    STRINGS,
    Schema,
    error_response,
    json_content,
    obj,
    ref,
)
from mlxcluster.controller.http.reasoning import EFFORTS, MAX_BUDGET
from mlxcluster.controller.http.responses import json_response
from mlxcluster.controller.http.responses_schema import ResponsesRequest
from mlxcluster.controller.routing.registry import RegistryStats

OPENAPI_PATH = "/openapi.json"
OPENAPI_CACHE = web.AppKey("openapi_cache", dict)

routes = web.RouteTableDef()

FINISH = {"enum": ["stop", "length", "tool_calls"]}
TOP_LOGPROB = obj({"token": STR, "logprob": NUM, "bytes": {"type": ["array", "null"], "items": INT}})
CHAT_LOGPROBS = {
    "anyOf": [
        {"type": "null"},
        obj(
            {
                "content": {
                    "type": "array",
                    "items": obj(
                        {
                            "token": STR,
                            "logprob": NUM,
                            "bytes": {"type": ["array", "null"], "items": INT},
                            "top_logprobs": {"type": "array", "items": TOP_LOGPROB},
                        }
                    ),
                }
            }
        ),
    ]
}
TEXT_LOGPROBS = {
    "anyOf": [
        {"type": "null"},
        obj(
            {
                "tokens": {"type": "array", "items": STR},
                "token_logprobs": {"type": "array", "items": NUM},
                "top_logprobs": {"type": "array", "items": {"type": "object", "additionalProperties": NUM}},
                "text_offset": {"type": "array", "items": INT},
            }
        ),
    ]
}
TOOL_CALL = obj(
    {"id": STR, "type": {"const": "function"}, "function": obj({"name": STR, "arguments": STR})},
)
UNAUTHORIZED = error_response("Missing or wrong API key (when `controller.api_keys` is set).")
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": STR}}

# --- response schemas (hand-written: they are built as dicts in the routes) --------------------

RESPONSE_SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        {
            "error": obj(
                {"message": STR, "type": STR, "param": NULLABLE_STR, "code": NULLABLE_STR},
            )
        },
    ),
    "Usage": obj(
        {
            "prompt_tokens": INT,
            "completion_tokens": INT,
            "total_tokens": INT,
            "prompt_tokens_details": obj({"cached_tokens": INT, "image_tokens": INT}, required=["cached_tokens"]),
            "completion_tokens_details": obj({"reasoning_tokens": INT}),
        }
    ),
    "ChatCompletion": obj(
        {
            "id": STR,
            "object": {"const": "chat.completion"},
            "created": INT,
            "model": STR,
            "choices": {
                "type": "array",
                "items": obj(
                    {
                        "index": INT,
                        "message": {
                            **obj({"role": {"const": "assistant"}, "content": NULLABLE_STR}),
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": NULLABLE_STR,
                                "tool_calls": {"type": "array", "items": TOOL_CALL},
                                "reasoning_content": STR,
                            },
                        },
                        "logprobs": CHAT_LOGPROBS,
                        "finish_reason": FINISH,
                    }
                ),
            },
            "usage": ref("Usage"),
        }
    ),
    "TextCompletion": obj(
        {
            "id": STR,
            "object": {"const": "text_completion"},
            "created": INT,
            "model": STR,
            "choices": {
                "type": "array",
                "items": obj({"index": INT, "text": STR, "logprobs": TEXT_LOGPROBS, "finish_reason": FINISH}),
            },
            "usage": ref("Usage"),
        }
    ),
    "Response": {
        **obj(
            {
                "id": STR,
                "object": {"const": "response"},
                "created_at": INT,
                "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]},
                "model": STR,
                "output": {"type": "array", "items": {"type": "object", "required": ["type", "id"]}},
            }
        ),
        "description": "Output items: `reasoning`, `message` (`output_text` parts) and `function_call`.",
    },
    "AnthropicMessage": obj(
        {
            "id": STR,
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "model": STR,
            "content": {"type": "array", "items": {"type": "object", "required": ["type"]}},
            "stop_reason": {"enum": ["end_turn", "max_tokens", "tool_use"]},
            "stop_sequence": {"type": "null"},
            "usage": {"type": "object", "required": ["input_tokens", "output_tokens"]},
        }
    ),
    "AnthropicError": obj(
        {"type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"]}},
    ),
    "Model": obj(
        {
            "id": STR,
            "object": {"const": "model"},
            "created": INT,
            "owned_by": STR,
            "kind": {"enum": ["chat", "embedding"]},
            "vision": BOOL,
            "size_bytes": INT,
            "context_length": INT,
            "dimensions": INT,
            "loaded_on": STRINGS,
            "available_on": STRINGS,
        }
    ),
    "ModelList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}}),
    "Health": obj(
        {"status": {"enum": ["ok", "degraded"]}, "state": STR, "time": NUM, "reason": STR},
        required=["status", "state", "time"],
    ),
    "Readiness": obj({"ready": BOOL, "state": STR, "workers_online": INT}),
    "ClusterStatus": obj(
        {
            "controller_id": STR,
            "version": STR,
            "mode": {
                "enum": ["controller", "worker", "dual"],
                "description": "How the node was started (`[cluster] mode` / `run --mode`): `controller`, or `dual` "
                "for the controller of a `run --mode dual` node (embedded NATS and local workers).",
            },
            "state": STR,
            "uptime_s": NUM,
            "balancer": STR,
            "workers": ref("RegistryStats"),
            "models": {"type": "array", "items": STR},
            "requests": {
                **obj(
                    {
                        "total": INT,
                        "in_flight": INT,
                        "retries": INT,
                        "failed": INT,
                        "completed": INT,
                        "errors": INT,
                        "migrations": INT,
                        "migrations_failed": INT,
                        "success_rate": {
                            **NULLABLE_NUM,
                            "description": "Share of this controller's dispatched requests that succeeded over the "
                            "last `success_rate_window_s` seconds (five minutes): ok / (ok + failed), requests the "
                            "client cancelled or that were refused before dispatch not counted; null when none "
                            "finished in the window.",
                        },
                        "success_rate_window_s": NUM,
                    }
                ),
                "description": "This controller's counters since it started (`success_rate`: over the window).",
            },
            "cache_index": {"type": ["object", "null"], "additionalProperties": INT},
            "controllers": {"type": "array", "items": {"type": "object"}},
            "tier": {"type": ["object", "null"], "additionalProperties": INT},
            "nats": obj(
                {
                    "connected": BOOL,
                    "server": NULLABLE_STR,
                    "max_payload": {"type": ["integer", "null"]},
                    "invalid_messages_total": INT,
                    "state": {
                        "enum": ["connected", "disconnected", "reconnecting", "closed"],
                        "description": "The connection's last event.",
                    },
                    "state_since": NUM,
                    "reconnects": INT,
                    "disconnects": INT,
                    "slow_consumer_drops": {
                        **INT,
                        "description": "Messages dropped because a subscription could not keep up.",
                    },
                }
            ),
            "shared_state": {
                "type": "boolean",
                "description": "Keys and usage in NATS JetStream (false: per controller).",
            },
            "shared": {
                "anyOf": [
                    obj(
                        {
                            "replicas": INT,
                            "keys_bucket": STR,
                            "usage_stream": STR,
                            "usage_bucket": STR,
                            "invalid_records": INT,
                            "usage_unsent": INT,
                        }
                    ),
                    {"type": "null"},
                ]
            },
        }
    ),
    "Worker": {
        "allOf": [
            ref("WorkerView"),
            obj({"breaker": {"enum": ["closed", "open", "half_open"]}}),
            obj(
                {
                    "hardware": {"type": ["object", "null"]},
                    "capabilities": {"type": ["object", "null"]},
                    "registered_at": NULLABLE_NUM,
                    "cpu_percent": NULLABLE_NUM,
                    "rss_bytes": {"type": ["integer", "null"]},
                    "drained": BOOL,
                    "avg_latency_ms": NULLABLE_NUM,
                    "avg_ttft_ms": NULLABLE_NUM,
                    "speculation": {
                        "anyOf": [
                            obj(
                                {
                                    "steps": INT,
                                    "drafted": INT,
                                    "accepted": INT,
                                    "model_drafted": INT,
                                    "model_accepted": INT,
                                    "acceptance_rate": NUM,
                                    "model_acceptance_rate": NUM,
                                }
                            ),
                            {"type": "null"},
                        ],
                        "description": "Speculative decoding since the worker started, every count and "
                        "`acceptance_rate` = accepted / drafted (0 before any was drafted); `model_drafted` and "
                        "`model_accepted` the part the draft model drafted (the rest prompt lookup), "
                        "`model_acceptance_rate` their ratio; null: it does not speculate.",
                    },
                }
            ),
        ]
    },
    "WorkerList": obj(
        {
            "workers": {"type": "array", "items": ref("Worker")},
            "total": {**INT, "description": "The workers listed (after the filters)."},
        }
    ),
    "WorkerChange": obj(
        {
            "id": STR,
            "status": STR,
            "inflight": INT,
            "settings": obj({"drained": BOOL, "priority": INT, "tags": {"type": "array", "items": STR}}),
        }
    ),
    "WorkerSettings": {
        "type": "object",
        "properties": {
            "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
            "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 64}, "maxItems": 32},
            "drained": BOOL,
        },
        "additionalProperties": False,
        "minProperties": 1,
    },
    "RequestRecord": obj(
        {
            "id": STR,
            "key": NULLABLE_STR,
            "model": STR,
            "worker": NULLABLE_STR,
            "state": STR,
            "started": NUM,
            "controller": NULLABLE_STR,
        },
    ),
    "RequestList": obj(
        {
            "time": NUM,
            "in_flight": {"type": "array", "items": ref("RequestRecord")},
            "recent": {"type": "array", "items": ref("RequestRecord")},
            "recent_capacity": {"type": ["integer", "null"]},
            "controllers": {"type": "array", "items": STR},
            "unreachable": {"type": "array", "items": STR},
        }
    ),
    "MemoryParts": obj({"budget_bytes": INT, "weights_bytes": INT, "prompt_cache_bytes": INT, "kv_bytes": INT}),
    "HeldModel": obj(
        {
            "model": STR,
            "state": {"enum": ["loading", "loaded", "unloading"]},
            "weights_bytes": INT,
            "last_used": NULLABLE_NUM,
            "expires_at": NULLABLE_NUM,
            "pinned": BOOL,
            "in_flight": INT,
        }
    ),
    "CatalogueModel": obj(
        {
            "name": STR,
            "kind": {"enum": ["chat", "embedding"]},
            "vision": BOOL,
            "source": STR,
            "weights_bytes": INT,
            "kv_bytes_per_token": INT,
            "kv_fixed_bytes": INT,
            "context_length": INT,
            "dimensions": INT,
        },
        ["name", "kind", "weights_bytes"],
    ),
    "WorkerModels": obj(
        {
            "worker": STR,
            "status": STR,
            "hostname": NULLABLE_STR,
            "memory": {"anyOf": [{"type": "null"}, ref("MemoryParts")]},
            "models": {"type": "array", "items": ref("HeldModel")},
            "catalogue": {"type": "array", "items": ref("CatalogueModel")},
        }
    ),
    "ClusterModels": obj({"workers": {"type": "array", "items": ref("WorkerModels")}}),
    "PlacementCandidate": obj(
        {
            "worker": STR,
            "fits": BOOL,
            "reason": STR,
            "loaded": BOOL,
            "budget_bytes": INT,
            "free_bytes": INT,
            "evict": STRINGS,
            "free_after_bytes": INT,
            "load": INT,
        },
        ["worker", "fits", "reason"],
    ),
    "Placement": obj(
        {
            "model": STR,
            "worker": NULLABLE_STR,
            "weights_bytes": INT,
            "kv_bytes_per_token": INT,
            "context_length": INT,
            "loaded_on": STRINGS,
            "candidates": {"type": "array", "items": ref("PlacementCandidate")},
            "forced": BOOL,
            "warning": STR,
        },
        ["model", "worker", "candidates"],
    ),
    "ModelLoad": {
        "type": "object",
        "properties": {
            "worker": {"type": "string", "description": "Load it there (default: where placement says)."},
            "keep_alive": {
                "type": ["number", "string"],
                "description": 'Seconds or a duration (`"5m"`); 0 unloads after use, negative never.',
            },
            "pin": BOOL,
            "force": {"type": "boolean", "description": "Past the memory check, with a warning."},
        },
        "additionalProperties": False,
    },
    "ModelLoaded": obj(
        {
            "model": STR,
            "worker": STR,
            "state": {"type": ["object", "null"]},
            "memory": {"anyOf": [{"type": "null"}, ref("MemoryParts")]},
            "evicted": STRINGS,
            "warning": NULLABLE_STR,
        }
    ),
    "ModelUnload": {
        "type": "object",
        "properties": {"worker": {"type": "string", "description": "Only there (default: every worker holding it)."}},
        "additionalProperties": False,
    },
    "ModelUnloaded": obj(
        {
            "model": STR,
            "unloaded": STRINGS,
            "results": {"type": "array", "items": obj({"worker": STR, "ok": BOOL, "message": STR})},
        }
    ),
    "KeyList": obj(
        {
            "keys": {
                "type": "array",
                "items": obj(
                    {
                        "name": STR,
                        "admin": BOOL,
                        "source": {"enum": ["api", "config"]},
                        "revoked": BOOL,
                        "expires_at": NULLABLE_NUM,
                        "usage": {"type": "object"},
                    }
                ),
            }
        }
    ),
}

SSE = {
    "text/event-stream": {
        "schema": obj(
            {"data": {"type": "string", "description": "A chunk as JSON, an error object, or `[DONE]` (the last)."}},
            ["data"],
        ),
    }
}


def _completion_operation(summary: str, request: str, response: str, error: str = "Error") -> Schema:
    def error_response(description: str) -> Schema:
        return json_content(ref(error), description)

    return {
        "summary": summary,
        "security": SECURED,
        "requestBody": {"required": True, "content": {JSON: {"schema": ref(request)}}},
        "responses": {
            "200": {
                "description": "The completion (JSON), or, when `stream` is true, server-sent events: one chunk "
                "per event, an error object in OpenAI's shape if the stream fails after it started, then `[DONE]`.",
                "content": {JSON: {"schema": ref(response)}, **SSE},
            },
            "400": error_response("The body is not valid JSON or a field is invalid; `param` names the field."),
            "401": UNAUTHORIZED,
            "404": error_response("No online worker serves the model (`code`: `model_not_found`)."),
            "413": error_response(
                "The body exceeds `controller.max_body_bytes`, or the encoded request exceeds NATS `max_payload`."
            ),
            "502": error_response("The worker failed the request."),
            "503": {
                **error_response(
                    "No worker has capacity (`no_capacity`), the controller is not ready (`not_ready`), or the "
                    "object store failed while parking the request's images (`images_unavailable`)."
                ),
                "headers": RETRY_AFTER,
            },
            "504": error_response("The request timed out (`code`: `timeout`)."),
        },
    }


def _op(
    summary: str, responses: dict[str, Schema], *, secured: bool = True, parameters: list[Schema] | None = None
) -> Schema:
    """One operation; a secured one may also answer 401."""
    operation: Schema = {"summary": summary, "security": SECURED if secured else PUBLIC}
    if parameters:
        operation["parameters"] = parameters
    operation["responses"] = {**responses, **({"401": UNAUTHORIZED} if secured else {})}
    return operation


def _text(media_type: str, description: str) -> Schema:
    return {"description": description, "content": {media_type: {"schema": STR}}}


MODEL_PARAM = {"name": "model", "in": "path", "required": True, "schema": STR}
WORKER_ID_PARAM = {"name": "worker_id", "in": "path", "required": True, "schema": STR}
WORKER_QUERY = [
    {"name": "status", "in": "query", "schema": {"enum": ["online", "degraded", "draining", "offline"]}},
    {"name": "model", "in": "query", "schema": STR},
    {"name": "tag", "in": "query", "schema": STR},
]
REQUEST_QUERY = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    {
        "name": "state",
        "in": "query",
        "schema": {"enum": ["routing", "waiting", "streaming", "ok", "error", "cancelled"]},
    },
    {"name": "key", "in": "query", "schema": STR},
]
WORKER_CHANGE: dict[str, Schema] = {
    "200": json_content(ref("WorkerChange"), "The worker's status and settings now."),
    "403": error_response("Not an admin key (`admin_required`)."),
    "404": error_response("No such worker (`worker_not_found`)."),
}
WS_SUMMARY = "Chat and text completions over a WebSocket (JSON messages, requests multiplexed by `id`)"

OPERATIONS: dict[str, dict[str, Schema]] = {
    "/v1/chat/completions": {
        "post": _completion_operation("OpenAI chat completions", "ChatCompletionRequest", "ChatCompletion")
    },
    "/v1/completions": {
        "post": _completion_operation("OpenAI text completions", "CompletionRequest", "TextCompletion")
    },
    **openapi_embeddings.OPERATIONS,
    "/v1/responses": {
        "post": {
            **_completion_operation("OpenAI Responses API (stateless)", "ResponsesRequest", "Response"),
            "description": "`previous_response_id`, `store: true` and `conversation` are refused with a 400: "
            "nothing is stored; send the history as input items. A stream sends named events "
            "(`response.created` ... `response.completed`) and no `[DONE]`.",
        }
    },
    "/v1/messages": {
        "post": {
            **_completion_operation(
                "Anthropic Messages API", "MessagesRequest", "AnthropicMessage", error="AnthropicError"
            ),
            "description": "Errors use Anthropic's shape. `x-api-key` is accepted like a Bearer key. A stream "
            "sends named events (`message_start` ... `message_stop`).",
        }
    },
    "/v1/models": {
        "get": _op(
            "Every model loaded or loadable in the fleet", {"200": json_content(ref("ModelList"), "The models.")}
        )
    },
    "/v1/models/{model}": {
        "get": _op(
            "One model",
            {"200": json_content(ref("Model"), "The model."), "404": error_response("No online worker serves it.")},
            parameters=[MODEL_PARAM],
        )
    },
    "/v1/ws": {
        "get": _op(
            WS_SUMMARY,
            {
                "101": {"description": "The WebSocket upgrade."},
                "400": error_response("Not a WebSocket upgrade request."),
            },
        )
    },
    "/health": {"get": _op("Liveness", {"200": json_content(ref("Health"), "The process answers.")}, secured=False)},
    "/ready": {
        "get": _op(
            "Readiness: ready and at least one worker online",
            {
                "200": json_content(ref("Readiness"), "Ready."),
                "503": json_content(ref("Readiness"), "Not ready (no worker online, draining, or bus down)."),
            },
            secured=False,
        )
    },
    "/api/cluster/status": {
        "get": _op(
            "Controller state, worker counts, request counters", {"200": json_content(ref("ClusterStatus"), "OK")}
        )
    },
    "/api/cluster/workers": {
        "get": _op(
            "Known workers, filtered by status, model or tag",
            {"200": json_content(ref("WorkerList"), "The workers."), "400": error_response("Unknown `status`.")},
            parameters=WORKER_QUERY,
        )
    },
    "/api/cluster/workers/{worker_id}": {
        "get": _op(
            "One worker",
            {
                "200": json_content(ref("Worker"), "The worker."),
                "404": error_response("No such worker (`worker_not_found`)."),
            },
            parameters=[WORKER_ID_PARAM],
        )
    },
    "/api/cluster/workers/{worker_id}/drain": {
        "post": _op(
            "Drain a worker (admin key): no new work, running streams finish",
            WORKER_CHANGE,
            parameters=[WORKER_ID_PARAM],
        )
    },
    "/api/cluster/workers/{worker_id}/resume": {
        "post": _op("Undo a drain (admin key)", WORKER_CHANGE, parameters=[WORKER_ID_PARAM])
    },
    "/api/cluster/workers/{worker_id}/settings": {
        "post": {
            **_op(
                "Set a worker's priority, tags or drained flag (admin key)",
                {**WORKER_CHANGE, "400": error_response("A bad field (`param` names it).")},
                parameters=[WORKER_ID_PARAM],
            ),
            "requestBody": {"required": True, "content": {JSON: {"schema": ref("WorkerSettings")}}},
        }
    },
    "/api/cluster/workers/{worker_id}/forget": {
        "post": _op(
            "Forget an offline worker and its settings (admin key)",
            {
                "200": json_content(obj({"id": STR, "forgotten": BOOL}), "Forgotten."),
                "403": error_response("Not an admin key (`admin_required`)."),
                "404": error_response("No such worker (`worker_not_found`)."),
                "409": error_response("The worker is not offline (`worker_not_offline`)."),
            },
            parameters=[WORKER_ID_PARAM],
        )
    },
    "/api/cluster/requests": {
        "get": _op(
            "Requests in flight and the latest finished ones, of every controller of the tier",
            {
                "200": json_content(ref("RequestList"), "The requests."),
                "400": error_response("A bad `limit` or `state`."),
            },
            parameters=REQUEST_QUERY,
        )
    },
    "/api/cluster/models": {
        "get": _op(
            "Per worker: memory budget parts, the models it holds and its catalogue",
            {"200": json_content(ref("ClusterModels"), "The workers' models.")},
            parameters=[{"name": "model", "in": "query", "schema": STR}],
        )
    },
    "/api/cluster/placement": {
        "get": _op(
            "Where a model would load now and why",
            {
                "200": json_content(ref("Placement"), "The placement."),
                "400": error_response("No `model`, or a bad `force`."),
                "404": error_response("No worker serves or may load the model (`model_not_found`)."),
            },
            parameters=[
                {"name": "model", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1}},
                {"name": "force", "in": "query", "schema": BOOL},
                {"name": "worker", "in": "query", "schema": STR},
            ],
        )
    },
    "/api/cluster/models/{model}/load": {
        "post": {
            **_op(
                "Load a model now (admin key); answers once it serves",
                {
                    "200": json_content(ref("ModelLoaded"), "Loaded."),
                    "400": error_response("A bad field (`param` names it)."),
                    "403": error_response("Not an admin key (`admin_required`)."),
                    "404": error_response("No worker serves or may load the model, or no such `worker`."),
                    "409": error_response("It fits on no worker (`no_room`)."),
                    "503": error_response("The load failed (`model_load_failed`)."),
                },
                parameters=[MODEL_PARAM],
            ),
            "requestBody": {"required": False, "content": {JSON: {"schema": ref("ModelLoad")}}},
        }
    },
    "/api/cluster/models/{model}/unload": {
        "post": {
            **_op(
                "Unload a model (admin key); answers once its requests ended",
                {
                    "200": json_content(ref("ModelUnloaded"), "Unloaded."),
                    "400": error_response("A bad field (`param` names it)."),
                    "403": error_response("Not an admin key (`admin_required`)."),
                    "404": error_response("No worker serves or may load the model."),
                    "409": error_response("No worker unloaded it (`unload_failed`)."),
                },
                parameters=[MODEL_PARAM],
            ),
            "requestBody": {"required": False, "content": {JSON: {"schema": ref("ModelUnload")}}},
        }
    },
    "/api/cluster/keys": {
        "get": _op(
            "API keys with limits and usage (admin key; never a key value)",
            {
                "200": json_content(ref("KeyList"), "The keys."),
                "403": error_response("Not an admin key (`admin_required`)."),
            },
        ),
        "post": openapi_keys.CREATE_KEY,
    },
    **openapi_keys.OPERATIONS,
    "/metrics": {
        "get": _op("Metrics (from an exporter plugin)", {"200": _text("text/plain", "Metrics.")}, secured=False)
    },
    "/": {"get": _op("The dashboard page", {"200": _text("text/html", "The page.")}, secured=False)},
    "/dashboard": {"get": _op("The dashboard page", {"200": _text("text/html", "The page.")}, secured=False)},
    OPENAPI_PATH: {
        "get": _op("This document", {"200": json_content({"type": "object"}, "OpenAPI 3.1.")}, secured=False)
    },
}


def request_schemas() -> dict[str, Schema]:
    """Component schemas of the request bodies, from the Structs, tightened by the routes' own checks."""
    _, components = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest, ResponsesRequest, MessagesRequest, WorkerView, RegistryStats],
        ref_template=REF,
    )
    chat, text = components["ChatCompletionRequest"]["properties"], components["CompletionRequest"]["properties"]
    chat["messages"]["minItems"] = 1
    components["Message"]["properties"]["role"] = {"enum": list(ROLES)}
    components["ContentPart"] = {
        "oneOf": [
            obj({"type": {"const": "text"}, "text": STR}),
            obj(
                {"type": {"const": "image_url"}, "image_url": {"$ref": REF.format(name="ImageUrl")}},
            )
            | {
                "description": "Vision models only (a text-only model answers 400); a data: URL, or http(s) when "
                "controller.image_fetch allows it."
            },
        ]
    }
    for props in (chat, text):
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 1, "default": 1}
        props["stop"]["anyOf"][1]["maxItems"] = MAX_STOP_SEQUENCES
    text["prompt"]["anyOf"][1].update(minItems=1, maxItems=1)
    refused = "Not supported: refused with a 400 naming it when set."
    for name in (
        "audio",
        "functions",
        "function_call",
        "prediction",
        "verbosity",
        "web_search_options",
    ):
        chat[name] = {"type": "null", "default": None, "description": refused}
    chat["modalities"] = {"anyOf": [{"const": ["text"]}, {"type": "null"}], "default": None}
    for props in (chat, text):
        props["store"] = {"enum": [False, None], "default": None, "description": "Completions are not stored."}
        props["metadata"] = {"type": ["object", "null"], "maxProperties": 0, "default": None}
        props["service_tier"] = {"enum": ["auto", "default", None], "default": None}
    _reasoning_fields(chat, components["ResponsesRequest"]["properties"], components["MessagesRequest"]["properties"])
    for props in (chat, text):
        bias = props["logit_bias"]["anyOf"][0]
        bias["propertyNames"] = {"pattern": f"^{LOGIT_BIAS_KEY.pattern}$"}
        bias["description"] = "Token id (ASCII digits) → bias; an id beyond the model's vocabulary is a 400."
    text["echo"] = {"const": False, "default": False, "description": refused}
    text["best_of"] = {"enum": [1, None], "default": None, "description": "Only 1."}
    responses = components["ResponsesRequest"]["properties"]
    for name in (
        "previous_response_id",
        "conversation",
        "max_tool_calls",
        "top_logprobs",
        "prompt",
        "stream_options",
    ):
        responses[name] = {"type": "null", "default": None, "description": refused}
    responses["store"] = {"enum": [False, None], "default": None, "description": "Responses are not stored."}
    responses["background"] = {"enum": [False, None], "default": None}
    responses["include"] = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}], "default": None}
    responses["metadata"] = {"type": ["object", "null"], "maxProperties": 0, "default": None}
    responses["service_tier"] = {"enum": ["auto", "default", None], "default": None}
    responses["truncation"] = {"enum": ["disabled", None], "default": None}
    messages = components["MessagesRequest"]["properties"]
    for name in (
        "container",
        "context_management",
        "diagnostics",
        "inference_geo",
        "speed",
        "user_profile_id",
        "workspace_id",
    ):
        messages[name] = {"type": "null", "default": None, "description": refused}
    messages["mcp_servers"] = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}], "default": None}
    messages["service_tier"] = {"enum": ["auto", "standard_only", None], "default": None}
    messages["stop_sequences"]["anyOf"][0]["maxItems"] = MAX_STOP_SEQUENCES
    text["suffix"] = {"anyOf": [{"const": ""}, {"type": "null"}], "default": None, "description": "Not supported."}
    return components


AUTO_MAX_TOKENS = (
    "Unset: the room the model's context window leaves after the prompt, at most `controller.default_max_tokens`."
)
TEMPLATE_KWARGS = {
    "type": ["object", "null"],
    "default": None,
    "description": "Variables for the chat template, as `mlx_lm.server` takes them (e.g. `enable_thinking`).",
}
NO_THINKING = "A model whose chat template has no thinking answers 400 naming this field."


def _reasoning_fields(chat: Schema, responses: Schema, messages: Schema) -> None:
    """The reasoning fields of the three APIs, as the routes check them (``controller/http/reasoning.py``)."""
    effort = {"enum": [*EFFORTS, None], "default": None}
    chat["reasoning_effort"] = {**effort, "description": f"`none`/`minimal`: thinking off. {NO_THINKING}"}
    auto_summary = {"enum": ["auto", None], "default": None, "description": "No summary is written."}
    responses["reasoning"] = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"effort": effort, "summary": auto_summary, "generate_summary": auto_summary},
                "additionalProperties": False,
            },
            {"type": "null"},
        ],
        "default": None,
        "description": f"`effort` as chat's `reasoning_effort`. {NO_THINKING}",
    }
    messages["thinking"] = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "type": {"const": "enabled"},
                    "budget_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_BUDGET},
                },
                "required": ["type", "budget_tokens"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"type": {"const": "disabled"}},
                "required": ["type"],
                "additionalProperties": False,
            },
            {"type": "null"},
        ],
        "default": None,
        "description": f"`budget_tokens` must be less than `max_tokens`. {NO_THINKING}",
    }
    for props in (chat, responses, messages):
        props["chat_template_kwargs"] = TEMPLATE_KWARGS
    for props, name in ((chat, "max_tokens"), (chat, "max_completion_tokens"), (responses, "max_output_tokens")):
        props[name]["description"] = AUTO_MAX_TOKENS


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document for the routes ``app`` has."""
    served: dict[str, set[str]] = {}
    for route in app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        served.setdefault(canonical, set()).add(route.method.lower())
    paths = {
        path: {method: op for method, op in operations.items() if method in served.get(path, ())}
        for path, operations in OPERATIONS.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlxcluster controller",
            "version": __version__,
            "description": "OpenAI-compatible inference API and cluster API. Routes under /v1 and /api need "
            "`Authorization: Bearer <key>` (or `x-api-key: <key>`, as Anthropic's clients send it) when "
            "`controller.api_keys` is set; errors use OpenAI's shape (Anthropic's on /v1/messages). Every "
            "request field is honoured or refused with a 400 naming it; unknown fields are refused too.",
        },
        "paths": {path: ops for path, ops in paths.items() if ops},
        "components": {
            "schemas": {
                **request_schemas(),
                **RESPONSE_SCHEMAS,
                **openapi_keys.schemas(),
                **openapi_embeddings.schemas(),
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


def setup(app: web.Application) -> None:
    """Add ``GET /openapi.json``; the document is built on first use, when every route is in place."""
    app[OPENAPI_CACHE] = {}
    app.add_routes(routes)


@routes.get(OPENAPI_PATH)
async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document (public: it holds no data)."""
    cache = request.app[OPENAPI_CACHE]
    if "document" not in cache:
        cache["document"] = build_document(request.app)
    return json_response(cache["document"])
