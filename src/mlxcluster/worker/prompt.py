"""The prompt of a request: messages, tools and tool-call history through the model's chat template.

A template that knows tools (it mentions ``tools``) gets them through ``apply_chat_template(...,
tools=...)`` and the history in the Hugging Face shape (assistant ``tool_calls``, ``tool`` turns).
A template that does not gets a fallback: the tools described in a system message that asks for
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (mlx-lm's ``json_tools`` markup), earlier
calls written in that markup and tool results as ``<tool_response>`` user turns.
"""

from __future__ import annotations

import json
from typing import Any

from mlxcluster.protocol import ChatMessage, InferenceRequest, ToolSpec
from mlxcluster.worker.grammar import TOOL_CALL_END, TOOL_CALL_START

FALLBACK_TOOL_PROMPT = (
    "You can call functions. The available functions, as JSON schemas:\n{tools}\n"
    "To call one, answer with exactly:\n"
    + TOOL_CALL_START
    + '\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n'
    + TOOL_CALL_END
)


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders ``tools`` (mlx-lm also knows its tool-call markup then)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def tools_enabled(request: InferenceRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


def openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters or {"type": "object", "properties": {}},
            },
        }
        for tool in tools
    ]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _template_message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _fallback_message(message: ChatMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.content}\n</tool_response>"}
    content = message.content
    for call in message.tool_calls or []:
        body = json.dumps({"name": call.name, "arguments": _arguments(call.arguments)})
        content += f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}\n"
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name:
        out["name"] = message.name
    return out


def render_chat(tokenizer: Any, request: InferenceRequest) -> list[int]:
    """Token ids of a chat request's prompt, generation prompt included."""
    messages = request.messages or []
    use_tools = tools_enabled(request)
    native = template_supports_tools(tokenizer)
    has_history = any(m.tool_calls or m.role == "tool" for m in messages)
    if native or (not has_history and not use_tools):
        dicts = [_template_message(m) for m in messages]
        extra = {"tools": openai_tools(request.tools or [])} if use_tools and native else {}
    else:
        dicts = [_fallback_message(m) for m in messages]
        extra = {}
        if use_tools:
            described = "\n".join(json.dumps(t["function"]) for t in openai_tools(request.tools or []))
            system = FALLBACK_TOOL_PROMPT.format(tools=described)
            if dicts and dicts[0]["role"] == "system":
                dicts[0] = {**dicts[0], "content": dicts[0]["content"] + "\n\n" + system}
            else:
                dicts.insert(0, {"role": "system", "content": system})
    if tokenizer.has_chat_template:
        extra = {**(request.chat_template_kwargs or {}), **extra}
        return list(tokenizer.apply_chat_template(dicts, add_generation_prompt=True, **extra))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in dicts) + "assistant:"
    return list(tokenizer.encode(text))


def tool_markup(tokenizer: Any) -> tuple[str, str, Any]:
    """``(start, end, parse)``: the model's tool-call markers and mlx-lm parser, or the json_tools fallback."""
    if template_supports_tools(tokenizer) and getattr(tokenizer, "has_tool_calling", False):
        return tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser
    from mlx_lm.tool_parsers import json_tools

    return json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call
