"""The shape every tool-call format has (:class:`ToolFormat`) and what the formats share.

A format is a model family's tool-call markup: markers, mlx-lm's parser, the grammar of one call block, the
text of a call as the model writes it, an argument streamer. The families are in
:mod:`~mlxcluster.worker.tool_formats` and :mod:`~mlxcluster.worker.tool_format_params`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from mlxcluster.json_grammar import GrammarError
from mlxcluster.protocol import ToolCall, ToolSpec
from mlxcluster.worker.lark_text import LarkVocab
from mlxcluster.worker.tool_stream import CallStreamer

log = logging.getLogger(__name__)

ToolParser = Callable[[str, Any], Any]
ANY_OBJECT: dict[str, Any] = {"type": "object"}


_DEFS = ("$defs", "definitions")


def hoist_defs(schema: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``schema`` without its ``$defs`` / ``definitions``, and those definitions renamed ``prefix`` + name, each
    ``$ref`` to them rewritten to ``#/$defs/<new name>``: a schema's definitions can then sit at the root of a
    document that nests it (several tools' arguments in one call schema, one parameter's value on its own)."""

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {key: rewrite(value) for key, value in node.items() if key not in _DEFS or node is not schema}
            ref = out.get("$ref")
            if isinstance(ref, str):
                for key in _DEFS:
                    if ref.startswith(f"#/{key}/"):
                        out["$ref"] = f"#/$defs/{prefix}{ref[len(key) + 3 :]}"
            return out
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    defs = {f"{prefix}{name}": rewrite(value) for key in _DEFS for name, value in (schema.get(key) or {}).items()}
    return rewrite(schema), defs


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def arguments_text(arguments: Any) -> str:
    """Parsed arguments as the JSON text a ToolCall carries (``json.dumps``' form, as streamed)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def canonical_arguments(call: ToolCall) -> str:
    """A call's argument text as a parse would give it (``json.dumps``' form), or as it is when not JSON."""
    value = arguments_value(call)
    return call.arguments if isinstance(value, str) else arguments_text(value)


def arguments_value(call: ToolCall) -> Any:
    """A call's arguments as a value (its text when that is not JSON)."""
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


class ToolFormat:
    """A model family's tool-call markup.

    :param start: the marker that opens a call block; :param end: the one that closes it ("": end of output).
    :param parser: mlx-lm's parser for the family (``parse_tool_call(text, tools)``).
    :param native: the chat template renders the tools (else our fallback system prompt announces them).
    """

    name = "parsed"
    constrainable = False
    """Its calls can be forced, constrained (``strict``) and re-rendered (a moved stream)."""
    separator = ""
    """What may come between two forced calls (a Lark expression)."""
    text_after_calls = True
    """Free text may follow a call (not so where a call runs to the end of the output)."""
    calls_in_one_block = False
    """Several calls are written inside one block (pythonic ``[a(), b()]``), not one block each."""

    def __init__(self, start: str, end: str, parser: ToolParser, *, native: bool, name: str = "") -> None:
        self.start = start
        self.end = end
        self.parser = parser
        self.native = native
        if name:
            self.name = name

    def parse(self, text: str, tools: list[dict[str, Any]] | None) -> list[ToolCall] | None:
        """The calls in one call block's text (between the markers), or None when it does not parse."""
        try:
            parsed = self.parser(text, tools)
        except Exception as exc:  # noqa: BLE001 - parsers raise anything on malformed text
            log.debug("tool call did not parse: %s", exc)
            return None
        calls = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            calls.append(ToolCall(id=call_id(), name=item["name"], arguments=arguments_text(item.get("arguments", {}))))
        return calls

    def body_rules(self, tools: Sequence[ToolSpec], strict: Sequence[bool], vocab: LarkVocab, *, several: bool) -> str:
        """Lark rules defining ``body``: one call block after its start marker, its end marker included.

        ``strict[i]``: tool i's arguments follow its parameters schema (else any arguments of the format's
        shape); ``several``: the block may hold several calls (formats that write them in one block)."""
        raise GrammarError(f"tool calls of this model's format ({self.name}) cannot be constrained")

    def render_call(self, call: ToolCall) -> str:
        """The exact text of ``call`` as the model writes it, markers included."""
        raise GrammarError(f"tool calls of this model's format ({self.name}) cannot be written back")

    def streamer(self, tools: list[dict[str, Any]], *, limit: int | None) -> CallStreamer | None:
        """A streamer of one call block's calls (None: the block is parsed whole at its end)."""
        return None

    def history_id(self, ident: str) -> str:
        """A call id as the chat template wants it in the history."""
        return ident
