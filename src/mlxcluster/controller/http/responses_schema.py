"""``POST /v1/responses`` request bodies: the Struct, the input items, and the conversion to an InferenceRequest.

Served stateless, as Dynamo and Ollama do: ``previous_response_id`` (and ``store: true``,
``conversation``, ``background``) are refused with a 400, because no response is kept. Send the
history as input items instead: messages, ``function_call`` and ``function_call_output`` items
(``reasoning`` items are accepted and not rendered, as chat templates drop past thinking).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.controller.http.images import ImageRef
from mlxcluster.controller.http.keep_alive import KeepAlive, keep_alive_seconds
from mlxcluster.controller.http.openai_schema import MaxTokens, Temperature, TopP, output_limit
from mlxcluster.controller.http.reasoning import ReasoningOptions, responses_reasoning
from mlxcluster.controller.http.tool_schema import (
    FunctionDef,
    NamedTool,
    SchemaFormat,
    choose_tool,
    not_in_tools,
    output_format,
)
from mlxcluster.protocol import ChatMessage, InferenceRequest, ResponseFormat, SamplingParams, ToolCall, ToolSpec


class FunctionTool(FunctionDef, kw_only=True):  # the function's fields flat, beside ``type``
    type: str
    name: str = ""


class TextFormat(SchemaFormat, kw_only=True):  # the schema's fields flat, beside ``type``
    type: Literal["text", "json_object", "json_schema"]


class TextOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/responses``; the fields after ``safety_identifier`` are refused when set."""

    model: Annotated[str, Meta(min_length=1, max_length=512)]
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    """How long the model stays loaded once idle (Ollama's ``keep_alive``: seconds or ``"5m"``; 0 unloads it
    after this request, negative keeps it)."""
    """Our extension (``mlx_lm.server``'s field): variables for the chat template."""
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    truncation: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    include: list[str] | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    prompt: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None


def _refuse(param: str, what: str) -> ApiError:
    return bad_request(f"'{param}' is not supported: {what}", param, code="unsupported_parameter")


def check_refused(body: ResponsesRequest) -> None:
    refused = {
        "previous_response_id": (
            "responses are not stored; send the earlier turns as input items",
            body.previous_response_id is not None,
        ),
        "store": ("responses are not stored", bool(body.store)),
        "conversation": ("conversations are not stored", body.conversation is not None),
        "background": ("no background mode", bool(body.background)),
        "include": ("no extra output data", bool(body.include)),
        "max_tool_calls": ("not supported", body.max_tool_calls is not None),
        "top_logprobs": ("not supported on /v1/responses; use chat completions", body.top_logprobs is not None),
        "prompt": ("no stored prompts", body.prompt is not None),
        "stream_options": ("not supported", body.stream_options is not None),
        "metadata": ("metadata belongs to stored responses", bool(body.metadata)),
        "service_tier": ("one tier", body.service_tier not in (None, "auto", "default")),
        "truncation": ("only 'disabled'", body.truncation not in (None, "disabled")),
        "text.verbosity": ("not supported", body.text is not None and body.text.verbosity is not None),
    }
    for param, (what, given) in refused.items():
        if given:
            raise _refuse(param, what)


def _content_text(content: Any, where: str, images: list[ImageRef] | None = None) -> tuple[str, int]:
    """Content as text and how many ``input_image`` parts it has (added to ``images``; ``None``: refused)."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of parts", where)
    texts = []
    count = 0
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image" and images is not None:
            _check_input_image(part, f"{where}[{index}]")
            if not isinstance(part.get("image_url"), str):
                raise bad_request(
                    "input_image needs 'image_url' (a data: or http(s): URL); file ids are not stored here",
                    f"{where}[{index}].image_url",
                )
            images.append(ImageRef(part["image_url"], f"{where}[{index}].image_url"))
            count += 1
            continue
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise bad_request(
                f"Unsupported content part type '{kind}'; only text is supported", f"{where}[{index}].type"
            )
        texts.append(part["text"])
    return "".join(texts), count


INPUT_IMAGE_KEYS = ("type", "image_url", "detail", "file_id")
"""The keys of an ``input_image`` part (``file_id`` is then refused: nothing is stored here)."""


def _check_input_image(part: dict[str, Any], where: str) -> None:
    """A 400 naming an ``input_image`` key we do not know, or a ``detail`` other than ``auto``."""
    for key in part:
        if key not in INPUT_IMAGE_KEYS:
            raise bad_request(f"Unknown input_image field '{key}'", f"{where}.{key}")
    detail = part.get("detail")
    if detail is not None and detail != "auto":
        raise bad_request(
            f"'detail': {detail!r} is not supported; the model sees the image as its processor sizes it ('auto')",
            f"{where}.detail",
            code="unsupported_value",
        )


def _str_field(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(
            f"Missing required parameter: '{where}.{key}'", f"{where}.{key}", "missing_required_parameter"
        )
    return value


def input_messages(body: ResponsesRequest, images: list[ImageRef] | None = None) -> list[ChatMessage]:
    """The instructions and input items as chat turns (function calls joined onto one assistant turn); a user
    turn's ``input_image`` parts are added to ``images``."""
    messages = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    if isinstance(body.input, str):
        return [*messages, ChatMessage(role="user", content=body.input)]
    for index, item in enumerate(body.input):
        where = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"Invalid role '{role}'", f"{where}.role")
            role = "system" if role == "developer" else role
            text, count = _content_text(item.get("content", ""), f"{where}.content", images if role == "user" else None)
            messages.append(ChatMessage(role=role, content=text, images=count))
        elif kind == "function_call":
            call = ToolCall(
                id=_str_field(item, "call_id", where),
                name=_str_field(item, "name", where),
                arguments=_str_field(item, "arguments", where),
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)
            else:
                messages.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output, f"{where}.output")[0]
            messages.append(ChatMessage(role="tool", content=text, tool_call_id=_str_field(item, "call_id", where)))
        elif kind != "reasoning":
            raise bad_request(f"Unsupported input item type '{kind}'", f"{where}.type", "unsupported_item")
    if not messages:
        raise bad_request("'input' must contain at least one item", "input")
    return messages


def _tools(body: ResponsesRequest) -> list[ToolSpec] | None:
    specs = []
    for index, tool in enumerate(body.tools or []):
        if tool.type != "function" or not tool.name:
            raise bad_request(f"Only function tools are supported (got '{tool.type}')", f"tools[{index}].type")
        specs.append(tool.spec(f"tools[{index}].parameters"))
    return specs or None


def _tool_choice(body: ResponsesRequest, tools: list[ToolSpec] | None) -> tuple[Any, str | None]:
    choice = body.tool_choice
    if choice is None:
        return "auto", None
    if isinstance(choice, NamedTool):
        if choice.type != "function":
            raise not_in_tools(choice.name, "tool_choice")
        return choose_tool(choice.name, tools, "tool_choice")
    if choice == "required" and not tools:
        raise bad_request("tool_choice 'required' needs 'tools'", "tool_choice")
    return choice, None


def _format(body: ResponsesRequest) -> ResponseFormat | None:
    fmt = body.text.format if body.text else None
    return None if fmt is None else output_format(fmt.type, fmt, "text.format", "schema")


def responses_to_inference(
    body: ResponsesRequest,
    request_id: str,
    deadline: float,
    max_tokens_cap: int,
    images: list[ImageRef] | None = None,
) -> InferenceRequest:
    """Validate a Responses body and build the wire request (``max_tokens_cap``: see ``output_limit``); image
    parts are collected into ``images``."""
    check_refused(body)
    tools = _tools(body)
    choice, name = _tool_choice(body, tools)
    max_tokens, auto = output_limit(body.max_output_tokens, max_tokens_cap)
    return InferenceRequest(
        request_id=request_id,
        model=body.model,
        messages=input_messages(body, images),
        sampling=SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
        ),
        max_tokens=max_tokens,
        max_tokens_auto=auto,
        stream=body.stream,
        session_id=body.prompt_cache_key or body.user or body.safety_identifier,
        deadline=deadline,
        tools=tools,
        tool_choice=choice,
        tool_name=name,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        response_format=_format(body),
        chat_template_kwargs=body.chat_template_kwargs or None,
        keep_alive=keep_alive_seconds(body.keep_alive),
        reasoning=responses_reasoning(body.reasoning),
    )
