"""Pieces of llguidance Lark grammars: markers as the model's tokens, free text, JSON values, ordered fields.

llguidance lexes greedily: a free-text terminal followed by a literal never ends early to let the literal
start. So free text that ends in a marker is one lexeme (:meth:`LarkVocab.text_then`), and free text
that may not contain a marker excludes it (``A & ~B``). A marker that is one of the model's special tokens
is written ``<[id]>`` (the token itself; a special token is never part of a text lexeme).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

ANY_TEXT = "/(?s:.*)/"

TOOL_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""Tool-call JSON is written as ``json.dumps`` and chat templates' ``tojson`` write it: ``", "`` and ``": "``,
no other whitespace. The model has seen calls in this form in its prompt, and a call re-rendered from its
parsed arguments (a moved stream) reads exactly as the model wrote it."""


def regex_literal(text: str) -> str:
    """``text`` as a piece of a ``/.../`` regex (every ASCII punctuation escaped as ``\\xHH``)."""
    return "".join(c if c.isalnum() or ord(c) > 127 else f"\\x{ord(c):02X}" for c in text)


def json_value(schema: dict[str, Any], options: dict[str, Any]) -> str:
    """An inline ``%json`` value (a ``%json`` block takes no defaults: its options go in ``x-guidance``)."""
    return "%json " + json.dumps({**schema, "x-guidance": options}, separators=(",", ":"))


def ordered_fields(items: Sequence[tuple[str, bool]], separator: str) -> str:
    """A Lark expression: the ``(expression, required)`` items in their order, each optional one may be left
    out, consecutive ones joined by ``separator``; "" when none can appear."""
    if not items:
        return ""
    first_required = next((i for i, (_, required) in enumerate(items) if required), None)
    if first_required is None:  # all optional: the first one written decides where the separators go
        starts = [
            " ".join([items[i][0], *(f"({separator} {expr})?" for expr, _ in items[i + 1 :])])
            for i in range(len(items))
        ]
        return "(" + " | ".join(f"({start})" for start in starts) + ")?"
    parts = [f"({expr} {separator})?" for expr, _ in items[:first_required]]
    parts.append(items[first_required][0])
    for expr, required in items[first_required + 1 :]:
        parts.append(f"{separator} {expr}" if required else f"({separator} {expr})?")
    return " ".join(parts)


class LarkVocab:
    """What a grammar needs to know of one tokenizer: which texts are its special tokens.

    :param encode: text to token ids (no BOS).
    :param decode: token ids to text.
    :param is_special: whether a token id is a special token (never matched by text).
    :param eos_ids: the tokens that end a sequence.
    """

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        is_special: Callable[[int], bool],
        eos_ids: Sequence[int] = (),
    ) -> None:
        self._encode = encode
        self._decode = decode
        self._is_special = is_special
        self.eos_ids = list(eos_ids)

    def special_id(self, text: str) -> int | None:
        """The id of the special token ``text`` is, if it is exactly one."""
        ids = self._encode(text)
        return ids[0] if len(ids) == 1 and self._is_special(ids[0]) else None

    def is_text(self, text: str) -> bool:
        """Whether ``text`` is plain text to this tokenizer (none of its tokens is special)."""
        return not any(self._is_special(i) for i in self._encode(text))

    def literal(self, text: str) -> str:
        """``text`` as the model writes it: its special tokens as ``<[id]>``, the rest as quoted strings."""
        ids = self._encode(text)
        if not any(self._is_special(i) for i in ids):
            return json.dumps(text)
        parts: list[str] = []
        pending: list[int] = []
        for ident in ids:
            if self._is_special(ident):
                if pending:
                    parts.append(json.dumps(self._decode(pending)))
                    pending = []
                parts.append(f"<[{ident}]>")
            else:
                pending.append(ident)
        if pending:
            parts.append(json.dumps(self._decode(pending)))
        return " ".join(parts)

    def text_then(self, name: str, marker: str) -> str:
        """A rule ``name``: any text, then ``marker`` (its first occurrence); one lexeme when the marker is text."""
        terminal = name.upper()
        if self.is_text(marker):
            escaped = regex_literal(marker)
            return f"{name}: {terminal}\n{terminal}: /(?s:.*){escaped}/ & ~/(?s:.*){escaped}(?s:.+)/\n"
        return f"{name}: {terminal}? {self.literal(marker)}\n" + text_rule(terminal, [marker])


def text_rule(terminal: str, markers: Sequence[str]) -> str:
    """A terminal of free text (maybe empty) in which none of ``markers`` occurs as text."""
    excluded = [m for m in markers if m]
    if not excluded:
        return f"{terminal}: {ANY_TEXT}\n"
    pattern = "|".join(regex_literal(m) for m in excluded)
    return f"{terminal}: {ANY_TEXT} & ~/(?s:.*)({pattern})(?s:.*)/\n"
