"""Shapes a request's generated text into Token frames: content, reasoning, tool calls and logprobs.

Text arrives in pieces (after stop-string filtering). Text between the model's thinking markers
becomes ``reasoning``; text between its tool-call markers is parsed with mlx-lm's tool parser for
the model's family into :class:`~mlxcluster.protocol.ToolCall` s (a call that does not parse is
passed on as content, never dropped). A tail that could be the start of a marker is held back until
it is resolved, as the stop filter does for stop strings.

With ``stream_calls`` (a streamed request, a JSON tool-call format) a call is also sent while it is
generated, as :class:`~mlxcluster.protocol.ToolCallDelta` pieces (see :mod:`mlxcluster.worker.tool_stream`):
once its name is parsed and its arguments object has opened it is committed, and its final ToolCall
carries exactly the argument text streamed (the same text as the buffered result for a call that parses;
the text so far when the output ends inside the call, e.g. at ``max_tokens``, as OpenAI does).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from mlxcluster.protocol import Token, TokenLogprob, ToolCall, ToolCallDelta, ToolSpec
from mlxcluster.worker.tool_stream import CallStreamer

log = logging.getLogger(__name__)

ToolParser = Callable[[str, Any], Any]


def _partial_tail(buffer: str, marker: str) -> int:
    """Length of the longest suffix of ``buffer`` that is a proper prefix of ``marker``."""
    for length in range(min(len(marker) - 1, len(buffer)), 0, -1):
        if buffer.endswith(marker[:length]):
            return length
    return 0


def parse_tool_calls(text: str, parse: ToolParser, tools: list[dict[str, Any]] | None) -> list[ToolCall] | None:
    """The calls in one tool-call block, or None when it does not parse."""
    try:
        parsed = parse(text, tools)
    except Exception as exc:  # noqa: BLE001 - parsers raise anything on malformed text
        log.debug("tool call did not parse: %s", exc)
        return None
    calls = []
    for item in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        text_args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=item["name"], arguments=text_args))
    return calls


class OutputShaper:
    """Per-request splitter of generated text into content, reasoning and tool calls.

    :param think: ``(start, end)`` thinking markers, or None.
    :param in_reasoning: the prompt ends inside a thinking block (the template opened it).
    :param tools: ``(start, end, parse, tool_dicts)`` when tool calls are to be parsed, else None.
    :param parallel: several calls may be returned; when False, calls after the first are dropped.
    :param stream_calls: send calls in pieces while they are generated (JSON call formats only).
    """

    def __init__(
        self,
        *,
        think: tuple[str, str] | None = None,
        in_reasoning: bool = False,
        tools: tuple[str, str, ToolParser, list[dict[str, Any]]] | None = None,
        parallel: bool = True,
        stream_calls: bool = False,
    ) -> None:
        self.think = think
        self.parallel = parallel
        self.tools = tools
        self.state = "reasoning" if in_reasoning and think else "content"
        self._held = ""
        self._call_text = ""
        self._logprobs: list[TokenLogprob] = []
        self.made_tool_call = False
        self.stream_calls = stream_calls
        self._streamer: CallStreamer | None = None
        self._deltas: list[ToolCallDelta] = []

    def add_logprob(self, entry: TokenLogprob) -> None:
        self._logprobs.append(entry)

    def frame(self, text: str, count: int, *, final: bool) -> Token | None:
        """The Token frame for the text of ``count`` more tokens (None: nothing to send yet)."""
        content, reasoning, calls = self._split(text, final)
        logprobs = self._logprobs or None
        deltas, self._deltas = self._deltas, []
        if not (content or reasoning or calls or deltas or (final and logprobs)):
            return None
        self._logprobs = []
        return Token(
            text=content,
            count=count,
            reasoning=reasoning,
            tool_calls=calls or None,
            logprobs=logprobs,
            tool_call_deltas=deltas or None,
        )

    def _markers(self) -> list[str]:
        if self.state == "reasoning" and self.think:
            return [self.think[1]]
        if self.state == "tool" and self.tools:
            return [self.tools[1]]
        found = []
        if self.think:
            found.append(self.think[0])
        if self.tools:
            found.append(self.tools[0])
        return found

    def _split(self, text: str, final: bool) -> tuple[str, str, list[ToolCall]]:
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCall] = []
        buffer = self._held + text
        self._held = ""
        while buffer:
            markers = self._markers()
            hits = [(buffer.find(m), m) for m in markers if m and m in buffer]
            if hits:
                at, marker = min(hits)
                self._take(buffer[:at], content, reasoning)
                buffer = buffer[at + len(marker) :]
                self._switch(marker, content, calls)
                continue
            keep = 0 if final else max((_partial_tail(buffer, m) for m in markers if m), default=0)
            self._take(buffer[: len(buffer) - keep], content, reasoning)
            self._held = buffer[len(buffer) - keep :]
            break
        if final:
            self._finish(content, calls)
        return "".join(content), "".join(reasoning), calls

    def _take(self, text: str, content: list[str], reasoning: list[str]) -> None:
        if not text:
            return
        if self.state == "reasoning":
            reasoning.append(text)
        elif self.state == "tool":
            self._call_text += text
            self._stream(text)
        else:
            content.append(text)

    def _switch(self, marker: str, content: list[str], calls: list[ToolCall]) -> None:
        if self.state == "reasoning":
            self.state = "content"
        elif self.state == "tool":
            self._close_call(content, calls)
            self.state = "content"
        elif self.think and marker == self.think[0]:
            self.state = "reasoning"
        else:
            self.state = "tool"
            self._call_text = ""
            if self.stream_calls and (self.parallel or not self.made_tool_call):
                self._streamer = CallStreamer()

    def _stream(self, text: str) -> None:
        streamer = self._streamer
        if streamer is None:
            return
        started, piece = streamer.feed(text)
        if started:
            assert streamer.name is not None
            self._deltas.append(ToolCallDelta(id=streamer.id, name=streamer.name))
        if piece:
            self._deltas.append(ToolCallDelta(id=streamer.id, arguments=piece))

    def _streamed_call(self, parsed: list[ToolCall] | None) -> ToolCall | None:
        """The final ToolCall of a call that was streamed (None: it was not; parse it as before)."""
        streamer, self._streamer = self._streamer, None
        if streamer is None or streamer.name is None:
            return None
        arguments = streamer.sent
        if parsed is not None and len(parsed) == 1 and parsed[0].arguments.startswith(arguments):
            rest = parsed[0].arguments[len(arguments) :]  # nothing, unless the parse completed what was cut
            if rest:
                self._deltas.append(ToolCallDelta(id=streamer.id, arguments=rest))
            arguments += rest
        return ToolCall(id=streamer.id, name=streamer.name, arguments=arguments)

    def _close_call(self, content: list[str], calls: list[ToolCall]) -> None:
        assert self.tools is not None
        start, end, parse, tool_dicts = self.tools
        parsed = parse_tool_calls(self._call_text, parse, tool_dicts)
        streamed = self._streamed_call(parsed)
        if streamed is not None:
            self._add_calls([streamed], calls)
        elif parsed is None:
            content.append(start + self._call_text + end)
        else:
            self._add_calls(parsed, calls)
        self._call_text = ""

    def _add_calls(self, parsed: list[ToolCall], calls: list[ToolCall]) -> None:
        if not self.parallel:
            parsed = [] if self.made_tool_call else parsed[:1]
        calls.extend(parsed)
        self.made_tool_call = self.made_tool_call or bool(parsed)

    def _finish(self, content: list[str], calls: list[ToolCall]) -> None:
        """End of output: an unclosed call is parsed if it can be (EOS right after the JSON), else shown."""
        if self.state == "tool" and self.tools is not None:
            parsed = parse_tool_calls(self._call_text, self.tools[2], self.tools[3])
            streamed = self._streamed_call(parsed)
            if streamed is not None:
                self._add_calls([streamed], calls)
            elif parsed is None:
                content.append(self.tools[0] + self._call_text)
            else:
                self._add_calls(parsed, calls)
            self._call_text = ""
            self.state = "content"


def tool_dicts(tools: list[ToolSpec] | None) -> list[dict[str, Any]]:
    """Tools as mlx-lm's parsers take them (OpenAI's ``{"type": "function", "function": {...}}``)."""
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools or []
    ]


def merge_tokens(frames: list[Token], seq: int = 0) -> Token:
    """Coalesce consecutive Token frames into one (text, reasoning, calls and logprobs concatenated).

    Engines leave ``seq`` alone: the worker's stream writer (:class:`mlxcluster.bus.ReplyWriter`) numbers frames."""
    if len(frames) == 1:
        first = frames[0]
        return Token(
            text=first.text,
            count=first.count,
            seq=seq,
            reasoning=first.reasoning,
            tool_calls=first.tool_calls,
            logprobs=first.logprobs,
            tool_call_deltas=first.tool_call_deltas,
        )
    calls = [c for f in frames for c in f.tool_calls or []]
    logprobs = [e for f in frames for e in f.logprobs or []]
    deltas: list[ToolCallDelta] = []
    for delta in (d for f in frames for d in f.tool_call_deltas or []):
        last = deltas[-1] if deltas else None
        if last is not None and not last.name and not delta.name and last.id == delta.id:  # the same call's pieces
            deltas[-1] = ToolCallDelta(id=delta.id, arguments=last.arguments + delta.arguments)
        else:
            deltas.append(delta)
    return Token(
        text="".join(f.text for f in frames),
        count=sum(f.count for f in frames),
        seq=seq,
        reasoning="".join(f.reasoning for f in frames),
        tool_calls=calls or None,
        logprobs=logprobs or None,
        tool_call_deltas=deltas or None,
    )
