"""Streams tool calls while they are generated: their arguments re-emitted as JSON, piece by piece.

A :class:`CallStreamer` is fed one call block's text as it arrives (the text after the start marker) and
returns :class:`~mlxcluster.protocol.ToolCallDelta` s: a call's head (id and name) once the text is seen to be
a call, then pieces of its arguments in the form ``json.dumps(arguments, ensure_ascii=False)`` writes
(:class:`CanonicalJson`: whitespace dropped, ``", "`` and ``": "`` separators, each string escape and number
written as json.dumps writes it), so that the pieces of a call that parses concatenate to the same text as the
buffered (non-streamed) result. At the block's end, :meth:`CallStreamer.finish` gives the final calls with
exactly the argument text streamed. Text that does not start the way a streamer expects (another key order,
a list of calls, another family's syntax) is never streamed: it is parsed whole at its end marker.

- :class:`JsonCallStreamer`: ``{"name": ..., "arguments": {...}}`` (json_tools and our fallback);
- :class:`MistralCallStreamer`: ``name[ARGS]{...}``, repeated (mistral: the block runs to the end of output);
- ``qwen3_coder``'s: :mod:`~mlxcluster.worker.tool_stream_params`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from mlxcluster.protocol import ToolCall, ToolCallDelta

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')
_MISTRAL_HEAD = re.compile(r"([\w-]+)\s*\[ARGS\]\s*")
"""mlx-lm's mistral parser's call header."""
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
        self.rest = ""
        """The text fed after the value closed (not part of it)."""

    def feed(self, text: str) -> str:
        out: list[str] = []
        for at, char in enumerate(text):
            if self.complete:
                self.rest += text[at:]
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


@dataclass
class StreamedCall:
    """One call whose head was sent: the argument text sent so far."""

    id: str
    name: str
    sent: str = ""


class CallStreamer:
    """The streaming state of one call block: the calls it has started (see the module's docstring)."""

    def __init__(self) -> None:
        self.calls: list[StreamedCall] = []

    def feed(self, text: str) -> list[ToolCallDelta]:
        """Deltas for ``text`` more of the block's text."""
        raise NotImplementedError

    def _start(self, name: str, out: list[ToolCallDelta]) -> StreamedCall:
        call = StreamedCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name)
        self.calls.append(call)
        out.append(ToolCallDelta(id=call.id, name=name))
        return call

    @staticmethod
    def _piece(call: StreamedCall, piece: str, out: list[ToolCallDelta]) -> None:
        if piece:
            call.sent += piece
            out.append(ToolCallDelta(id=call.id, arguments=piece))

    def finish(self, parsed: list[ToolCall] | None) -> tuple[list[ToolCall], list[ToolCallDelta]] | None:
        """The block's final calls and the last deltas, given its parse (None: nothing was streamed).

        A streamed call carries exactly the argument text streamed: the parse's, when the parse of that call
        extends it (the rest goes out as a last delta), else the text so far (a call cut by the end of the
        output, as OpenAI does). Parsed calls beyond the streamed ones follow whole."""
        if not self.calls:
            return None
        calls: list[ToolCall] = []
        deltas: list[ToolCallDelta] = []
        for index, call in enumerate(self.calls):
            match = parsed[index] if parsed is not None and index < len(parsed) else None
            if match is not None and match.name == call.name and match.arguments.startswith(call.sent):
                self._piece(call, match.arguments[len(call.sent) :], deltas)
            calls.append(ToolCall(id=call.id, name=call.name, arguments=call.sent))
        calls.extend((parsed or [])[len(self.calls) :])
        return calls, deltas


class JsonCallStreamer(CallStreamer):
    """One ``{"name": ..., "arguments": {...}}`` call: committed once its name is parsed and its arguments
    object has opened."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = ""
        self.given_up = False
        self._arguments = CanonicalJson()

    @property
    def complete(self) -> bool:
        return self._arguments.complete

    def feed(self, text: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if self.given_up:
            return out
        if self.calls:
            self._piece(self.calls[0], self._arguments.feed(text), out)
            return out
        self.raw += text
        head = _HEAD.match(self.raw)
        if head is None:
            stripped = self.raw.lstrip()
            self.given_up = bool(stripped and stripped[0] != "{") or len(self.raw) > _HEAD_LIMIT
            return out
        try:
            name = json.loads(head.group(1))
        except ValueError:
            self.given_up = True
            return out
        call = self._start(name, out)
        self._piece(call, self._arguments.feed(self.raw[head.end() :]), out)
        return out


class MistralCallStreamer(CallStreamer):
    """``name[ARGS]{...}`` calls, one after another in one block; each committed once its arguments object
    has opened. :param limit: most calls to stream (None: all)."""

    def __init__(self, *, limit: int | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.raw = ""
        self.given_up = False
        self._arguments: CanonicalJson | None = None

    def feed(self, text: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        while text and not self.given_up:
            if self._arguments is not None:
                self._piece(self.calls[-1], self._arguments.feed(text), out)
                if not self._arguments.complete:
                    break
                text, self._arguments = self._arguments.rest, None
                continue
            if self.limit is not None and len(self.calls) >= self.limit:
                break
            self.raw += text
            text = ""
            if not self.calls and self.raw.lstrip()[:1] in ("[", "{"):
                self.given_up = True  # the JSON list form: parsed whole at the end
                break
            head = _MISTRAL_HEAD.search(self.raw)
            if head is None or len(self.raw) == head.end():
                self.given_up = head is None and len(self.raw) > _HEAD_LIMIT
                break
            if self.raw[head.end()] != "{":
                self.given_up = True
                break
            self._start(head.group(1), out)
            self._arguments = CanonicalJson()
            text, self.raw = self.raw[head.end() :], ""
        return out
