"""``POST /v1/embeddings``, OpenAI-shaped.

``input`` is a string, a list of strings, a list of token ids or a list of token-id lists (at most
:data:`MAX_INPUTS`, OpenAI's limit); ``encoding_format`` ``float`` (JSON numbers) or ``base64`` (each vector's
little-endian float32 bytes, as OpenAI sends them and its clients ask by default); ``dimensions`` keeps the
first values of each vector, renormalised (Matryoshka), up to the model's vector length. Our extensions:
``prompt_name`` (a prompt of the model's sentence-transformers config put before each text, e.g. Qwen3-Embedding's
``query`` instruction) and ``keep_alive``. A chat model is refused here (400 naming ``model``), as an embedding
model is by the chat routes.
"""

from __future__ import annotations

import array
import base64
import sys
import time
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from mlxcluster.controller.http.context import CONTROLLER, ControllerContext
from mlxcluster.controller.http.errors import ApiError, bad_request, model_not_found
from mlxcluster.controller.http.generation import check_ready
from mlxcluster.controller.http.keep_alive import KeepAlive, keep_alive_seconds
from mlxcluster.controller.http.middleware import new_request_id
from mlxcluster.controller.http.openai_schema import parse_body
from mlxcluster.controller.http.responses import json_response
from mlxcluster.protocol import EmbedRequest

routes = web.RouteTableDef()

MAX_INPUTS = 2048
"""Inputs one request may carry (OpenAI's limit)."""


class EmbeddingsBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The request body; ``input`` is checked by :func:`inputs` (a union msgspec cannot state)."""

    model: str
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None
    prompt_name: str | None = None
    keep_alive: KeepAlive = None


def inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """``input`` as texts or token lists (exactly one is set); a 400 naming ``input`` for anything else."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise bad_request("input: expected a string, a list of strings, token ids or lists of token ids", "input")
    if not value:
        raise bad_request("input: must not be empty", "input")
    if all(_token(item) for item in value):
        return None, [value]  # one input, however long (the model's context bounds it)
    if len(value) > MAX_INPUTS:
        raise bad_request(f"input: {len(value)} inputs; at most {MAX_INPUTS} per request", "input", "too_many_inputs")
    if all(isinstance(item, str) for item in value):
        empty = next((i for i, item in enumerate(value) if not item), None)
        if empty is not None:
            raise bad_request(f"input[{empty}]: must not be an empty string", "input")
        return value, None
    if all(isinstance(item, list) and all(_token(t) for t in item) for item in value):
        empty = next((i for i, item in enumerate(value) if not item), None)
        if empty is not None:
            raise bad_request(f"input[{empty}]: must not be an empty list of token ids", "input")
        return None, value
    raise bad_request(
        "input: expected a string, a list of strings, token ids or lists of token ids (not a mix)", "input"
    )


def _token(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 2**31


def _floats(vector: bytes) -> list[float]:
    values = array.array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """OpenAI embeddings: one vector per input, usage in prompt tokens."""
    ctx: ControllerContext = request.app[CONTROLLER]
    body: EmbeddingsBody = parse_body(await request.read(), EmbeddingsBody)
    texts, tokens = inputs(body.input)
    keep_alive = keep_alive_seconds(body.keep_alive)
    check_ready(ctx)
    entry = ctx.registry.catalogue_entry(body.model)
    if entry is None and not ctx.registry.has_model(body.model):
        raise model_not_found(body.model)
    if entry is None or entry.kind != "embedding":
        raise ApiError(
            400,
            f"'{body.model}' is a chat model: it does not make embeddings; use an embedding model "
            "(/v1/models lists each model's kind)",
            param="model",
            code="model_not_embedding",
        )
    if body.dimensions is not None and entry.dimensions and body.dimensions > entry.dimensions:
        raise bad_request(
            f"dimensions: {body.dimensions} is more than '{body.model}' gives ({entry.dimensions})", "dimensions"
        )
    embed = EmbedRequest(
        request_id=f"embd-{new_request_id()}",
        model=body.model,
        texts=texts,
        tokens=tokens,
        dimensions=body.dimensions,
        prompt_name=body.prompt_name,
        deadline=time.time() + ctx.config.controller.request_timeout_s,
        keep_alive=keep_alive,
    )
    result = await ctx.embedder.embed(embed, entry.dimensions)
    as_base64 = body.encoding_format == "base64"
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": base64.b64encode(vector).decode("ascii") if as_base64 else _floats(vector),
        }
        for index, vector in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return json_response({"object": "list", "data": data, "model": body.model, "usage": usage})
