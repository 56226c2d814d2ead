"""OpenAI request bodies as msgspec Structs, validated into :class:`InferenceRequest`.

Every field of OpenAI's request bodies is declared: each is honoured, or refused with a 400 naming it
when set to something we do not do (:func:`refuse_unsupported`); a field OpenAI does not have is
refused too (``forbid_unknown_fields``), so nothing is silently ignored. A wrong type or value becomes
a 400 in OpenAI's error shape whose ``param`` names the field (``messages[0].role``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.controller.http.images import ImageRef
from mlxcluster.controller.http.keep_alive import KeepAlive, keep_alive_seconds
from mlxcluster.controller.http.openai_tools import (
    OpenAITool,
    ResponseFormatParam,
    ToolCallParam,
    ToolChoiceParam,
    check_logprobs,
    convert_response_format,
    convert_tool_choice,
    convert_tools,
    history_tool_calls,
)
from mlxcluster.controller.http.reasoning import effort_reasoning
from mlxcluster.protocol import ChatMessage, InferenceRequest, SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
TEXT_MAX_TOKENS = 16
"""Text completions' ``max_tokens`` when none is given (OpenAI's default)."""
MAX_TOKENS_LIMIT = 1 << 20
LOGIT_BIAS_KEY = re.compile(r"[0-9]{1,9}")
"""A ``logit_bias`` key: a token id in ASCII digits (``"²"`` passes ``str.isdigit``), below 10⁹, a sane bound
far above any vocabulary; the worker checks it against its model's."""

Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(gt=0, le=1)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)]


class StreamOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ImageUrl(Struct, kw_only=True, forbid_unknown_fields=True):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


LogitBias = dict[str, Annotated[float, Meta(ge=-100, le=100)]]
Penalty = Annotated[float, Meta(ge=-2, le=2)]


class _Common(Struct, kw_only=True, forbid_unknown_fields=True):
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
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    keep_alive: KeepAlive = None
    """How long the model stays loaded once idle (Ollama's ``keep_alive``: seconds or ``"5m"``; 0 unloads it
    after this request, negative keeps it)."""


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    max_completion_tokens: MaxTokens | None = None
    session_id: str | None = None
    tools: list[OpenAITool] | None = None
    tool_choice: ToolChoiceParam | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatParam | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # refused when set (see refuse_unsupported)
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    best_of: Annotated[int, Meta(ge=1)] | None = None


BodyType = ChatCompletionRequest | CompletionRequest
_PATH = re.compile(r" - at `\$\.?(.*)`$")


def parse_body(raw: bytes, body_type: type[Any]) -> Any:
    """Decode JSON into ``body_type``; errors become 400s naming the field."""
    if not raw.strip():
        raise bad_request("Request body is empty; expected a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        param = match.group(1).replace("[...]", "") if match else None  # a dict's values: the dict is named
        message = _PATH.sub("", text)
        unknown = re.match(r"Object contains unknown field `(.+)`", message)
        if unknown:
            param = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
            raise bad_request(
                f"Unrecognized request argument supplied: {param}", param, code="unknown_parameter"
            ) from None
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


def _flatten(message: Message, index: int, images: list[ImageRef] | None = None) -> tuple[str, int]:
    """Message content as text (string content or the text parts of a list) and how many images it has: an
    ``image_url`` part is added to ``images`` (``None``: refused, as for any other non-text part)."""
    if message.content is None:
        return "", 0
    if isinstance(message.content, str):
        return message.content, 0
    texts = []
    count = 0
    for part_index, part in enumerate(message.content):
        if part.type == "image_url" and part.image_url is not None and images is not None:
            where = f"messages[{index}].content[{part_index}].image_url"
            if part.image_url.detail not in (None, "auto"):
                raise bad_request(
                    f"'detail': '{part.image_url.detail}' is not supported; the model sees the image as its "
                    "processor sizes it ('auto')",
                    f"{where}.detail",
                    code="unsupported_value",
                )
            images.append(ImageRef(part.image_url.url, f"{where}.url"))
            count += 1
            continue
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"Unsupported content part type '{part.type}'; only text is supported",
                f"messages[{index}].content[{part_index}].type",
            )
        texts.append(part.text)
    return "".join(texts), count


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed", "stop")
    return [s for s in stops if s]


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """Keys as token ids (:data:`LOGIT_BIAS_KEY`); a 400 naming ``logit_bias`` for any other key."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not LOGIT_BIAS_KEY.fullmatch(key):
            raise bad_request(f"logit_bias keys must be token ids (1 to 9 ASCII digits), got {key!r}", "logit_bias")
        out[int(key)] = value
    return out


def output_limit(given: int | None, cap: int) -> tuple[int, bool]:
    """``(max_tokens, max_tokens_auto)`` for the wire: the client's limit, or when it gave none the room the
    context window leaves, at most ``cap`` (``controller.default_max_tokens``), which the worker works out."""
    return (given, False) if given is not None else (cap, True)


def _sampling(body: _Common) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_logit_bias(body.logit_bias),
    )


SERVICE_TIERS = (None, "auto", "default")


def _refuse(param: str, what: str) -> ApiError:
    return bad_request(f"'{param}' is not supported: {what}", param, code="unsupported_parameter")


def _check_common(body: _Common) -> None:
    """Refuse the shared fields set to something this server does not do."""
    if body.n != 1:
        raise bad_request("Only n=1 is supported", "n", code="unsupported_parameter")
    if body.service_tier not in SERVICE_TIERS:
        raise _refuse("service_tier", "only 'auto' and 'default' (one tier) are served")
    if body.store:
        raise _refuse("store", "completions are not stored")
    if body.metadata:
        raise _refuse("metadata", "metadata belongs to stored completions, which are not kept")


def _check_chat(body: ChatCompletionRequest) -> None:
    refused = {
        "audio": ("audio output is not supported", body.audio is not None),
        "modalities": ("only text output", body.modalities not in (None, ["text"])),
        "functions": ("deprecated; use 'tools'", body.functions is not None),
        "function_call": ("deprecated; use 'tool_choice'", body.function_call is not None),
        "prediction": ("predicted outputs are not supported", body.prediction is not None),
        "verbosity": ("not supported", body.verbosity is not None),
        "web_search_options": ("web search is not supported", body.web_search_options is not None),
    }
    for param, (what, given) in refused.items():
        if given:
            raise _refuse(param, what)
    check_logprobs(body.logprobs, body.top_logprobs)
    for index, message in enumerate(body.messages):
        for field in ("function_call", "audio"):
            if getattr(message, field) is not None:
                raise _refuse(f"messages[{index}].{field}", "not supported in history")


def chat_to_inference(
    body: ChatCompletionRequest,
    request_id: str,
    deadline: float,
    max_tokens_cap: int,
    images: list[ImageRef] | None = None,
) -> InferenceRequest:
    """Validate a chat body beyond types and build the wire request (``max_tokens_cap``: see :func:`output_limit`);
    image parts are collected into ``images`` (``None``: refused with a 400)."""
    _check_common(body)
    _check_chat(body)
    if not body.messages:
        raise bad_request("'messages' must contain at least one message", "messages")
    messages = []
    for index, message in enumerate(body.messages):
        if message.role not in ROLES:
            raise bad_request(
                f"Invalid role '{message.role}'; expected one of {', '.join(ROLES)}", f"messages[{index}].role"
            )
        role = "system" if message.role == "developer" else message.role
        text, image_count = _flatten(message, index, images)
        content = text or (message.refusal or "")
        messages.append(
            ChatMessage(
                role=role,
                content=content,
                images=image_count,
                name=message.name,
                tool_calls=history_tool_calls(message.tool_calls, f"messages[{index}].tool_calls"),
                tool_call_id=message.tool_call_id,
            )
        )
    max_tokens, auto = output_limit(body.max_completion_tokens or body.max_tokens, max_tokens_cap)
    reasoning = effort_reasoning(body.reasoning_effort, "reasoning_effort")
    tools = convert_tools(body.tools, "tools")
    choice, tool_name = convert_tool_choice(body.tool_choice, tools, "tool_choice")
    return InferenceRequest(
        request_id=request_id,
        model=body.model,
        messages=messages,
        sampling=_sampling(body),
        max_tokens=max_tokens,
        stop=_stop_list(body.stop),
        seed=body.seed,
        stream=body.stream,
        session_id=body.session_id or body.prompt_cache_key or body.user or body.safety_identifier,
        deadline=deadline,
        tools=tools,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        response_format=convert_response_format(body.response_format, "response_format"),
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        chat_template_kwargs=body.chat_template_kwargs or None,
        keep_alive=keep_alive_seconds(body.keep_alive),
        reasoning=reasoning,
        max_tokens_auto=auto,
    )


def completion_to_inference(body: CompletionRequest, request_id: str, deadline: float) -> InferenceRequest:
    """Validate a text-completion body and build the wire request."""
    _check_common(body)
    if body.echo:
        raise _refuse("echo", "the prompt is not echoed back")
    if body.best_of not in (None, 1):
        raise _refuse("best_of", "only best_of=1")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("Exactly one prompt is supported per request", "prompt")
        prompt = prompt[0]
    if body.suffix:
        raise bad_request("'suffix' is not supported", "suffix")
    return InferenceRequest(
        keep_alive=keep_alive_seconds(body.keep_alive),
        request_id=request_id,
        model=body.model,
        prompt=prompt,
        sampling=_sampling(body),
        max_tokens=body.max_tokens or TEXT_MAX_TOKENS,
        stop=_stop_list(body.stop),
        seed=body.seed,
        stream=body.stream,
        session_id=body.user,
        deadline=deadline,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
    )


def include_usage(body: _Common) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


FinishReason = Literal["stop", "length", "tool_calls"]


def openai_finish_reason(reason: str, tool_calls: bool = False) -> FinishReason:
    """Map the worker's finish reason onto OpenAI's (``cancelled`` only reaches a gone client)."""
    if reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


__all__ = ["ApiError", "ChatCompletionRequest", "CompletionRequest", "parse_body"]
