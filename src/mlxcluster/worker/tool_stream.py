"""Streams one JSON tool call (``{"name": ..., "arguments": {...}}``) while it is being generated.

:class:`CallStreamer` is fed the call's text as it arrives. Nothing is sent until the text is seen to be a
call: its name is parsed and its ``arguments`` object has opened. From then on the call is committed and
the arguments are re-emitted piece by piece in the form ``json.dumps(arguments, ensure_ascii=False)``
writes (whitespace dropped, ``", "`` and ``": "`` separators, each string escape and number written as
json.dumps writes it), so that the pieces of a call that parses concatenate to the same text as the
buffered (non-streamed) result. A call whose text does not start that way (another key order, a list of
calls, another family's syntax) is never streamed: it is parsed whole at its end marker, as before.
"""

from __future__ import annotations

import json
import re
import uuid

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')
_SPACE = " \t\r\n"
_HEAD_LIMIT = 1024
"""Text seen without a call head after which the call is no longer a candidate for streaming."""


def _string_piece(escape: str) -> str:
    """One escape sequence (or character) of a JSON string as json.dumps writes it."""
    try:
        return json.dumps(json.loads(f'"{escape}"'), ensure_ascii=False)[1:-1]
    except ValueError:
        return escape


def _scalar(text: str) -> str:
    """A number or literal as json.dumps writes the value it parses to."""
    try:
        return json.dumps(json.loads(text))
    except ValueError:
        return text


class CanonicalJson:
    """Re-emits one JSON value fed in pieces, in json.dumps' default form; ``complete`` once it has closed."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = ""
        self.scalar = ""
        self.complete = False

    def feed(self, text: str) -> str:
        out: list[str] = []
        for char in text:
            if self.complete:
                break
            if self.in_string:
                self._string_char(char, out)
                continue
            if self.scalar and (char in _SPACE or char in '{}[],:"'):
                out.append(_scalar(self.scalar))
                self.scalar = ""
            if char in _SPACE:
                continue
            if char == '"':
                self.in_string = True
                out.append(char)
            elif char in "{[":
                self.depth += 1
                out.append(char)
            elif char in "}]":
                self.depth -= 1
                out.append(char)
                self.complete = self.depth <= 0
            elif char == ",":
                out.append(", ")
            elif char == ":":
                out.append(": ")
            else:
                self.scalar += char
        return "".join(out)

    def _string_char(self, char: str, out: list[str]) -> None:
        if not self.escape:
            if char == "\\":
                self.escape = char
                return
            self.in_string = char != '"'
            out.append(char if char == '"' else _string_piece(char))
            return
        escape = self.escape = self.escape + char
        if escape[1] != "u" or (len(escape) == 6 and not _high_surrogate(escape[2:6])) or len(escape) == 12:
            out.append(_string_piece(escape))
            self.escape = ""
        elif (len(escape) == 7 and char != "\\") or (len(escape) == 8 and char != "u"):
            out.append(_string_piece(escape[:6]))  # a lone high surrogate: what follows is read again
            self.escape = ""
            for again in escape[6:]:
                self._string_char(again, out)


def _high_surrogate(digits: str) -> bool:
    return (
        len(digits) == 4 and all(c in "0123456789abcdefABCDEF" for c in digits) and 0xD800 <= int(digits, 16) <= 0xDBFF
    )


class CallStreamer:
    """One call's streaming state: the name once known, the argument text sent so far."""

    def __init__(self) -> None:
        self.id = f"call_{uuid.uuid4().hex[:24]}"
        self.raw = ""
        self.name: str | None = None
        self.sent = ""
        self.given_up = False
        self._arguments = CanonicalJson()

    @property
    def started(self) -> bool:
        """The call's head was sent: it is committed."""
        return self.name is not None

    @property
    def complete(self) -> bool:
        return self._arguments.complete

    def feed(self, text: str) -> tuple[bool, str]:
        """``(just_started, argument_piece)`` for ``text`` more of the call's text."""
        if self.given_up:
            return False, ""
        if self.name is not None:
            piece = self._arguments.feed(text)
            self.sent += piece
            return False, piece
        self.raw += text
        head = _HEAD.match(self.raw)
        if head is None:
            stripped = self.raw.lstrip()
            self.given_up = bool(stripped and stripped[0] != "{") or len(self.raw) > _HEAD_LIMIT
            return False, ""
        try:
            name = json.loads(head.group(1))
        except ValueError:
            self.given_up = True
            return False, ""
        self.name = name
        piece = self._arguments.feed(self.raw[head.end() :])
        self.sent = piece
        return True, piece
