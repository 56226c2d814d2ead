"""The prompt of a request: messages, tools and tool-call history through the model's chat template.

The prompt shows the tool-call format that is parsed and forced (:func:`~mlxcluster.worker.tool_formats.tool_format`):
where mlx-lm has a parser for the model's template (``native``), the tools go through
``apply_chat_template(..., tools=...)`` and the history in the Hugging Face shape (assistant ``tool_calls``
with their arguments as objects, ``tool`` turns); elsewhere, even if the template mentions tools, our fallback
applies: the tools described in a system message that asks for ``<tool_call>{"name": ..., "arguments": ...}
</tool_call>`` (mlx-lm's ``json_tools`` markup), earlier calls written in that markup and tool results as
``<tool_response>`` user turns (joined with the user turn next to them: turns keep alternating).

The request's ``chat_template_kwargs`` go to the template; ``reasoning.enabled`` sets ``enable_thinking``
(mlx-lm's wrapper passes it under the template's own name) unless the kwargs set it.
"""

from __future__ import annotations

import json
from typing import Any

from mlxcluster.protocol import ChatMessage, InferenceRequest, ToolSpec
from mlxcluster.worker.tool_format_base import ToolFormat

FALLBACK_TOOL_PROMPT = (
    "You can call functions. The available functions, as JSON schemas:\n{tools}\n"
    "To call one, answer with exactly:\n"
    "{start}\n"
    '{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n'
    "{end}"
)


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


def template_kwargs(request: InferenceRequest) -> dict[str, Any]:
    """Extra chat-template variables: the request's own, and its thinking switch."""
    kwargs = dict(request.chat_template_kwargs or {})
    enabled = request.reasoning.enabled if request.reasoning is not None else None
    if enabled is not None and "enable_thinking" not in kwargs and "thinking" not in kwargs:
        kwargs["enable_thinking"] = enabled
    return kwargs


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _template_message(message: ChatMessage, fmt: ToolFormat) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": fmt.history_id(call.id),
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = fmt.history_id(message.tool_call_id)
    return out


def _fallback_message(message: ChatMessage, fmt: ToolFormat) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.content}\n</tool_response>"}
    content = message.content
    for call in message.tool_calls or []:
        body = json.dumps({"name": call.name, "arguments": _arguments(call.arguments)}, ensure_ascii=False)
        content += f"{fmt.start}\n{body}\n{fmt.end}\n"
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.name:
        out["name"] = message.name
    return out


def _alternating(dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive turns of one role joined into one: tool results become user turns in the fallback, and
    templates such as Gemma's refuse two user turns in a row."""
    out: list[dict[str, Any]] = []
    for message in dicts:
        if out and out[-1]["role"] == message["role"]:
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + message["content"]}
        else:
            out.append(message)
    return out


def render_chat(tokenizer: Any, request: InferenceRequest, fmt: ToolFormat) -> list[int]:
    """Token ids of a chat request's prompt, generation prompt included; tools in ``fmt`` (the model's format)."""
    messages = request.messages or []
    use_tools = tools_enabled(request)
    has_history = any(m.tool_calls or m.role == "tool" for m in messages)
    extra = template_kwargs(request)
    if fmt.native or (not has_history and not use_tools):
        dicts = [_template_message(m, fmt) for m in messages]
        if use_tools:
            extra["tools"] = openai_tools(request.tools or [])
    else:
        dicts = _alternating([_fallback_message(m, fmt) for m in messages])
        if use_tools:
            described = "\n".join(json.dumps(t["function"]) for t in openai_tools(request.tools or []))
            system = FALLBACK_TOOL_PROMPT.format(tools=described, start=fmt.start, end=fmt.end)
            if dicts and dicts[0]["role"] == "system":
                dicts[0] = {**dicts[0], "content": dicts[0]["content"] + "\n\n" + system}
            else:
                dicts.insert(0, {"role": "system", "content": system})
    if tokenizer.has_chat_template:
        return list(tokenizer.apply_chat_template(dicts, add_generation_prompt=True, **extra))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in dicts) + "assistant:"
    return list(tokenizer.encode(text))
