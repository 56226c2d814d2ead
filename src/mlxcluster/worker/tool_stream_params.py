"""Streams a ``qwen3_coder`` call (``<function=name>`` then ``<parameter=p>\\nvalue\\n</parameter>`` blocks) as JSON.

The arguments are re-emitted as ``json.dumps(arguments, ensure_ascii=False)`` writes the parse of the whole
call: mlx-lm's parser converts each value by its parameter's declared type. A string value (a parameter
declared a string, or not declared at all) streams as it arrives, escaped; the parser's conversions are
respected: one leading and one trailing newline are not part of the value, and a value that is just ``null``
(any case) is None. Any other value is held until its ``</parameter>`` and converted by mlx-lm's own parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mlxcluster.protocol import ToolCallDelta
from mlxcluster.worker.tool_stream import CallStreamer, StreamedCall

_FUNCTION = "<function="
_PARAMETER = "<parameter="
_PARAMETER_END = "</parameter>"
_FUNCTION_END = "</function>"
_NAME = re.compile(r"\s*([^\s<>]+)>")
_STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}
"""The parameter types mlx-lm's qwen3_coder parser leaves as text."""


def _is_prefix(text: str, word: str) -> bool:
    return word.startswith(text.lower())


def _held_tail(text: str) -> int:
    """Length of the longest suffix of ``text`` that may be the start of a value's closing."""
    for closing in ("\n" + _PARAMETER_END, _PARAMETER_END):
        for length in range(min(len(closing), len(text)), 0, -1):
            if text.endswith(closing[:length]):
                return length
    return 0


class CoderCallStreamer(CallStreamer):
    """One qwen3_coder call, committed once its function's name has closed.

    :param parser: mlx-lm's qwen3_coder ``parse_tool_call``; :param tools: the tools as it takes them."""

    def __init__(self, parser: Any, tools: list[dict[str, Any]]) -> None:
        super().__init__()
        self.parser = parser
        self.tools = tools
        self.buffer = ""
        self.given_up = False
        self.params = 0
        self.param: str | None = None
        self.value = ""
        self.opened = False
        """The current string value's opening quote went out."""
        self._sent_chars = 0
        self.done = False

    def feed(self, text: str) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        if self.given_up or self.done:
            return out
        self.buffer += text
        while self.buffer and not self.given_up and not self.done:
            if not self.calls:
                if not self._head(out):
                    break
            elif self.param is None:
                if not self._between(out):
                    break
            elif not self._value(out):
                break
        return out

    @property
    def _call(self) -> StreamedCall:
        return self.calls[0]

    def _head(self, out: list[ToolCallDelta]) -> bool:
        stripped = self.buffer.lstrip()
        if not stripped.startswith(_FUNCTION):
            self.given_up = not _FUNCTION.startswith(stripped)
            return False
        name = _NAME.match(stripped, len(_FUNCTION))
        if name is None:
            self.given_up = bool(re.search(r"[\s<]", stripped[len(_FUNCTION) :]))
            return False
        self._start(name.group(1), out)
        self.buffer = stripped[name.end() :]
        return True

    def _between(self, out: list[ToolCallDelta]) -> bool:
        """Between parameters: the next one's name, or the function's end."""
        starts = [(self.buffer.find(m), m) for m in (_PARAMETER, _FUNCTION_END) if m in self.buffer]
        if not starts:
            return False
        at, marker = min(starts)
        if marker == _FUNCTION_END:
            self._piece(self._call, "}" if self.params else "{}", out)
            self.done = True
            return False
        name = _NAME.match(self.buffer, at + len(_PARAMETER))
        if name is None:
            return False
        self.param, self.value, self.opened, self._sent_chars = name.group(1), "", False, 0
        self.buffer = self.buffer[name.end() :]
        return True

    def _value(self, out: list[ToolCallDelta]) -> bool:
        end = self.buffer.find(_PARAMETER_END)
        if end >= 0:
            self.value += self.buffer[:end]
            self.buffer = self.buffer[end + len(_PARAMETER_END) :]
            self._close_value(out)
            return True
        if self._is_string():
            keep = _held_tail(self.buffer)
            self.value += self.buffer[: len(self.buffer) - keep]
            self.buffer = self.buffer[len(self.buffer) - keep :]
            self._stream_string(out)
        return False

    def _is_string(self) -> bool:
        for tool in self.tools:
            function = tool.get("function") or {}
            if function.get("name") == self._call.name:
                config = ((function.get("parameters") or {}).get("properties") or {}).get(self.param)
                return not config or str(config.get("type", "")).strip().lower() in _STRING_TYPES
        return True

    def _key(self) -> str:
        self.params += 1
        return ("{" if self.params == 1 else ", ") + json.dumps(self.param, ensure_ascii=False) + ": "

    def _stream_string(self, out: list[ToolCallDelta]) -> None:
        text = self.value[1:] if self.value.startswith("\n") else self.value
        if not self.value or (self.value == "\n") or _is_prefix(text, "null"):
            return  # its first newline, or a null, is not known yet
        if not self.opened:
            self.opened = True
            self._piece(self._call, self._key() + '"', out)
        self._piece(self._call, json.dumps(text[self._sent_chars :], ensure_ascii=False)[1:-1], out)
        self._sent_chars = len(text)

    def _close_value(self, out: list[ToolCallDelta]) -> None:
        text = self.value[1:] if self.value.startswith("\n") else self.value
        text = text[:-1] if text.endswith("\n") else text
        if self.opened:
            self._piece(self._call, json.dumps(text[self._sent_chars :], ensure_ascii=False)[1:-1] + '"', out)
        else:
            value = self._convert()
            if self.given_up:
                return
            self._piece(self._call, self._key() + json.dumps(value, ensure_ascii=False), out)
        self.param = None

    def _convert(self) -> Any:
        """The current value as mlx-lm's parser reads it (by its parameter's declared type)."""
        call = f"{_FUNCTION}{self._call.name}>{_PARAMETER}{self.param}>{self.value}{_PARAMETER_END}{_FUNCTION_END}"
        try:
            return self.parser(call, self.tools)["arguments"][self.param]
        except Exception:  # noqa: BLE001 - the parser raises anything; the whole call's parse decides
            self.given_up = True
            return None
