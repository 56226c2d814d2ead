"""Anthropic ``POST /v1/messages`` request bodies, converted to an InferenceRequest.

Content blocks: ``text``, ``tool_use`` (assistant history), ``tool_result`` (user turns) and
``thinking`` (assistant history, not rendered: templates drop past thinking). ``thinking`` (the request's)
turns the template's thinking on or off with a budget (:mod:`mlxcluster.controller.http.reasoning`).
``image`` blocks (user turns, ``base64`` or ``url`` sources) go to a vision model (see
:mod:`mlxcluster.controller.http.images`). Documents, server tools and MCP servers are refused with a 400
naming them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

from mlxcluster.controller.http.errors import ApiError, bad_request
from mlxcluster.controller.http.images import ImageRef
from mlxcluster.controller.http.keep_alive import KeepAlive, keep_alive_seconds
from mlxcluster.controller.http.openai_schema import MAX_STOP_SEQUENCES, MaxTokens, TopP
from mlxcluster.controller.http.reasoning import ThinkingConfig, anthropic_thinking
from mlxcluster.controller.http.tool_schema import FunctionDef, NamedTool, check_schema, choose_tool
from mlxcluster.protocol import ChatMessage, InferenceRequest, ResponseFormat, SamplingParams, ToolCall, ToolSpec


class AnthropicMessage(Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str | list[dict[str, Any]]


class AnthropicTool(FunctionDef, kw_only=True):  # the function's fields flat, its schema named input_schema
    parameters: dict[str, Any] | None = field(default=None, name="input_schema")
    type: str | None = None
    cache_control: dict[str, Any] | None = None


class AnthropicToolChoice(NamedTool, kw_only=True):
    disable_parallel_tool_use: bool | None = None


class OutputFormat(Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    format: OutputFormat | None = None
    effort: str | None = None


class MessagesRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/messages``; the fields after ``chat_template_kwargs`` are refused when set."""

    model: Annotated[str, Meta(min_length=1, max_length=512)]
    max_tokens: MaxTokens
    messages: list[AnthropicMessage]
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    thinking: ThinkingConfig | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    keep_alive: KeepAlive = None
    """How long the model stays loaded once idle (Ollama's ``keep_alive``: seconds or ``"5m"``; 0 unloads it
    after this request, negative keeps it)."""
    """Our extension (``mlx_lm.server``'s field): variables for the chat template."""
    service_tier: str | None = None
    container: Any = None
    cache_control: dict[str, Any] | None = None
    """Accepted: the workers' prompt cache reuses prefixes on its own."""
    output_config: OutputConfig | None = None
    mcp_servers: list[Any] | None = None
    context_management: Any = None
    diagnostics: Any = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


def _refuse(param: str, what: str) -> ApiError:
    return bad_request(f"'{param}' is not supported: {what}", param, code="unsupported_parameter")


def _text_blocks(blocks: Any, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    texts = []
    for index, block in enumerate(blocks if isinstance(blocks, list) else []):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else None
            raise bad_request(f"Unsupported content block type '{kind}'; only text", f"{where}[{index}].type")
        texts.append(block["text"])
    return "".join(texts)


def _image(block: dict[str, Any], at: str) -> ImageRef:
    """An ``image`` block's source (``base64`` or ``url``) as an image reference."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if isinstance(source, dict) and kind == "base64" and isinstance(source.get("data"), str):
        return ImageRef(f"data:{source.get('media_type', 'image/png')};base64,{source['data']}", f"{at}.source.data")
    if isinstance(source, dict) and kind == "url" and isinstance(source.get("url"), str):
        return ImageRef(source["url"], f"{at}.source.url")
    raise bad_request(f"Unsupported image source type '{kind}'; expected base64 or url", f"{at}.source.type")


def _turns(message: AnthropicMessage, where: str, images: list[ImageRef] | None = None) -> list[ChatMessage]:
    """One Anthropic message as chat turns: tool results become ``tool`` turns, tool uses assistant calls,
    ``image`` blocks of a user turn are added to ``images`` (``None``: refused)."""
    if message.role not in ("user", "assistant"):
        raise bad_request(f"Invalid role '{message.role}'; expected user or assistant", f"{where}.role")
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    turns: list[ChatMessage] = []
    texts: list[str] = []
    calls: list[ToolCall] = []
    image_count = 0
    for index, block in enumerate(message.content):
        at = f"{where}.content[{index}]"
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "image" and message.role == "user" and images is not None:
            images.append(_image(block, at))
            image_count += 1
        elif kind == "tool_use" and message.role == "assistant":
            calls.append(
                ToolCall(
                    id=str(block.get("id", "")),
                    name=str(block.get("name", "")),
                    arguments=json.dumps(block.get("input", {})),
                )
            )
        elif kind == "tool_result" and message.role == "user":
            content = _text_blocks(block.get("content", ""), f"{at}.content")
            if block.get("is_error"):
                content = f"Error: {content}"
            turns.append(ChatMessage(role="tool", content=content, tool_call_id=str(block.get("tool_use_id", ""))))
        elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
            continue
        else:
            raise bad_request(f"Unsupported content block type '{kind}' in a {message.role} turn", f"{at}.type")
    if texts or calls or image_count:
        turns.append(
            ChatMessage(role=message.role, content="".join(texts), tool_calls=calls or None, images=image_count)
        )
    return turns


def _tools(body: MessagesRequest) -> list[ToolSpec] | None:
    specs = []
    for index, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise bad_request(f"Only custom (client) tools are supported, not '{tool.type}'", f"tools[{index}].type")
        specs.append(tool.spec(f"tools[{index}].input_schema"))
    return specs or None


def _choice(body: MessagesRequest, tools: list[ToolSpec] | None) -> tuple[Any, str | None, bool]:
    choice = body.tool_choice
    if choice is None:
        return "auto", None, True
    parallel = not choice.disable_parallel_tool_use
    if choice.type in ("auto", "none"):
        return choice.type, None, parallel
    if choice.type == "any":
        if not tools:
            raise bad_request("tool_choice 'any' needs 'tools'", "tool_choice")
        return "required", None, parallel
    if choice.type == "tool":
        return (*choose_tool(choice.name, tools, "tool_choice.name"), parallel)
    raise bad_request(f"Unknown tool_choice type '{choice.type}'", "tool_choice.type")


def messages_to_inference(
    body: MessagesRequest, request_id: str, deadline: float, images: list[ImageRef] | None = None
) -> InferenceRequest:
    """Validate a Messages body and build the wire request; image blocks are collected into ``images``."""
    refused = {
        "service_tier": ("one tier", body.service_tier not in (None, "auto", "standard_only")),
        "container": ("no code-execution containers", body.container is not None),
        "mcp_servers": ("no MCP servers", bool(body.mcp_servers)),
        "context_management": ("not supported", body.context_management is not None),
        "diagnostics": ("not supported", body.diagnostics is not None),
        "inference_geo": ("one location", body.inference_geo is not None),
        "speed": ("one speed", body.speed is not None),
        "user_profile_id": ("no user profiles", body.user_profile_id is not None),
        "workspace_id": ("no workspaces", body.workspace_id is not None),
        "output_config.effort": (
            "no effort setting; 'thinking' controls the reasoning",
            body.output_config is not None and body.output_config.effort is not None,
        ),
    }
    for param, (what, given) in refused.items():
        if given:
            raise _refuse(param, what)
    if not body.messages:
        raise bad_request("'messages' must contain at least one message", "messages")
    stops = [s for s in body.stop_sequences or [] if s]
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed", "stop_sequences")
    messages = [ChatMessage(role="system", content=_text_blocks(body.system, "system"))] if body.system else []
    for index, message in enumerate(body.messages):
        messages.extend(_turns(message, f"messages[{index}]", images))
    tools = _tools(body)
    choice, name, parallel = _choice(body, tools)
    user = (body.metadata or {}).get("user_id")
    fmt = body.output_config.format if body.output_config else None
    if fmt is not None:
        check_schema(fmt.schema, "output_config.format.schema")
    reasoning = anthropic_thinking(body.thinking, body.max_tokens)
    return InferenceRequest(
        request_id=request_id,
        model=body.model,
        messages=messages,
        sampling=SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
        ),
        max_tokens=body.max_tokens,
        stop=stops,
        stream=body.stream,
        session_id=user if isinstance(user, str) else None,
        deadline=deadline,
        tools=tools,
        tool_choice=choice,
        tool_name=name,
        parallel_tool_calls=parallel,
        response_format=ResponseFormat(type="json_schema", schema=fmt.schema) if fmt is not None else None,
        chat_template_kwargs=body.chat_template_kwargs or None,
        keep_alive=keep_alive_seconds(body.keep_alive),
        reasoning=reasoning,
    )
