"""OpenAI request bodies as msgspec Structs, validated into :class:`InferenceRequest`.

Unknown fields are ignored (clients send many optional ones); a wrong type or value becomes a 400
in OpenAI's error shape whose ``param`` names the field (``messages[0].role``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from mlxcluster.controller.errors import ApiError, bad_request
from mlxcluster.protocol import ChatMessage, InferenceRequest, SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_LIMIT = 1 << 20

Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(gt=0, le=1)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)]


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class Message(Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Common(Struct, kw_only=True):
    """Fields shared by chat and text completions."""

    model: Annotated[str, Meta(min_length=1, max_length=512)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0, le=10)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Annotated[int, Meta(ge=1)] = 1
    user: str | None = None


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    max_completion_tokens: MaxTokens | None = None
    session_id: str | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


BodyType = ChatCompletionRequest | CompletionRequest
_PATH = re.compile(r" - at `\$\.?(.*)`$")


def parse_body(raw: bytes, body_type: type[BodyType]) -> Any:
    """Decode JSON into ``body_type``; errors become 400s naming the field."""
    if not raw.strip():
        raise bad_request("Request body is empty; expected a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        param = match.group(1) if match else None
        message = _PATH.sub("", text)
        missing = re.match(r"Object missing required field `(.+)`", message)
        if missing:
            param = f"{param}.{missing.group(1)}" if param else missing.group(1)
            raise bad_request(
                f"Missing required parameter: '{param}'", param, code="missing_required_parameter"
            ) from None
        raise bad_request(f"Invalid value for '{param}': {message.replace('`', '')}", param) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    except UnicodeDecodeError as exc:  # msgspec raises this, not DecodeError, for bad UTF-8 inside a string
        raise bad_request(
            f"Request body is not valid UTF-8: {exc.reason} at byte {exc.start}", code="invalid_json"
        ) from None
    except RecursionError:  # JSON nested deeper than the decoder's recursion limit
        raise bad_request("Request body is nested too deeply", code="invalid_json") from None


def _flatten(message: Message, index: int) -> str:
    """Message content as text (string content or the text parts of a list)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part_index, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"Unsupported content part type '{part.type}'; only text is supported",
                f"messages[{index}].content[{part_index}].type",
            )
        texts.append(part.text)
    return "".join(texts)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed", "stop")
    return [s for s in stops if s]


def _sampling(body: _Common) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
    )


def _check_n(body: _Common) -> None:
    if body.n != 1:
        raise bad_request("Only n=1 is supported", "n")


def chat_to_inference(body: ChatCompletionRequest, request_id: str, deadline: float) -> InferenceRequest:
    """Validate a chat body beyond types and build the wire request."""
    _check_n(body)
    if not body.messages:
        raise bad_request("'messages' must contain at least one message", "messages")
    messages = []
    for index, message in enumerate(body.messages):
        if message.role not in ROLES:
            raise bad_request(
                f"Invalid role '{message.role}'; expected one of {', '.join(ROLES)}", f"messages[{index}].role"
            )
        role = "system" if message.role == "developer" else message.role
        messages.append(ChatMessage(role=role, content=_flatten(message, index), name=message.name))
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    return InferenceRequest(
        request_id=request_id,
        model=body.model,
        messages=messages,
        sampling=_sampling(body),
        max_tokens=max_tokens,
        stop=_stop_list(body.stop),
        seed=body.seed,
        stream=body.stream,
        session_id=body.session_id or body.user,
        deadline=deadline,
    )


def completion_to_inference(body: CompletionRequest, request_id: str, deadline: float) -> InferenceRequest:
    """Validate a text-completion body and build the wire request."""
    _check_n(body)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("Exactly one prompt is supported per request", "prompt")
        prompt = prompt[0]
    if body.suffix:
        raise bad_request("'suffix' is not supported", "suffix")
    return InferenceRequest(
        request_id=request_id,
        model=body.model,
        prompt=prompt,
        sampling=_sampling(body),
        max_tokens=body.max_tokens or 16,
        stop=_stop_list(body.stop),
        seed=body.seed,
        stream=body.stream,
        session_id=body.user,
        deadline=deadline,
    )


def include_usage(body: _Common) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


FinishReason = Literal["stop", "length"]


def openai_finish_reason(reason: str) -> FinishReason:
    """Map the worker's finish reason onto OpenAI's (``cancelled`` only reaches a gone client)."""
    return "length" if reason == "length" else "stop"


__all__ = ["ApiError", "ChatCompletionRequest", "CompletionRequest", "parse_body"]
