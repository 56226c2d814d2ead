"""JSON schemas as llguidance grammars: what the controller checks where a schema arrives and the worker enforces.

A neutral module (it imports nothing of ours), so the controller can refuse a schema the workers could not
enforce without importing worker code. llguidance's JSON strings already are strict JSON: no raw control
character (U+0000-U+001F, nor U+007F) inside a string, only the escapes ``\\" \\\\ \\b \\f \\n \\r \\t`` and
``\\u00XX``; :data:`JSON_OPTIONS` only takes the free whitespace away.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
"""Compact JSON (no free whitespace): a small model at temperature > 0 cannot wander off in blanks."""


class GrammarError(ValueError):
    """A schema, grammar or tool request that cannot be enforced; the message names the problem.

    :param param: the request field at fault (``tool_choice``, ``tools``, ``response_format``...), when known.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def json_schema_grammar(schema: dict[str, Any], *, param: str | None = None) -> str:
    """The llguidance grammar of a JSON schema (raises :class:`GrammarError` if it cannot be built)."""
    import llguidance

    try:
        grammar: str = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        return grammar
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid JSON schema: {exc}", param=param) from None


def validate_grammar(grammar: str, *, param: str | None = None) -> None:
    """Check a grammar without a tokenizer (used by the controller where a schema arrives)."""
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"unsupported schema: {problem}", param=param)
