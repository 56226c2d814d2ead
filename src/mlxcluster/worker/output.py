"""Shapes a request's generated text into Token frames: content, reasoning, tool calls and logprobs.

Text arrives in pieces (after stop-string filtering). Text between the model's thinking markers
becomes ``reasoning``; text between its tool-call markers is parsed by the model's tool format
(:mod:`~mlxcluster.worker.tool_formats`, mlx-lm's parser) into :class:`~mlxcluster.protocol.ToolCall` s (a
call that does not parse is passed on as content, never dropped). A tail that could be the start of a
marker is held back until it is resolved, as the stop filter does for stop strings.

Where tools are offered, content that is only whitespace (before, between or after calls) is held until it is
known: it goes out with the next real text, and is dropped at the end if the output made calls (OpenAI's
``content`` is then null, not ``"\\n"``).

With ``stream_calls`` (a streamed request, a format with an argument streamer) a call is also sent while it
is generated, as :class:`~mlxcluster.protocol.ToolCallDelta` pieces (see :mod:`mlxcluster.worker.tool_stream`);
its final ToolCall carries exactly the argument text streamed. A call that is not streamed is held whole:
:attr:`OutputShaper.holding` says so, and :attr:`OutputShaper.held_tokens` how many tokens it holds (the
engine keeps the controller's silence timer fed with them).
"""

from __future__ import annotations

from typing import Any

from mlxcluster.protocol import Token, TokenLogprob, ToolCall, ToolCallDelta, ToolSpec
from mlxcluster.worker.tool_format_base import ToolFormat
from mlxcluster.worker.tool_stream import CallStreamer


def _partial_tail(buffer: str, marker: str) -> int:
    """Length of the longest suffix of ``buffer`` that is a proper prefix of ``marker``."""
    for length in range(min(len(marker) - 1, len(buffer)), 0, -1):
        if buffer.endswith(marker[:length]):
            return length
    return 0


class OutputShaper:
    """Per-request splitter of generated text into content, reasoning and tool calls.

    :param think: ``(start, end)`` thinking markers, or None.
    :param in_reasoning: the prompt ends inside a thinking block (the template opened it).
    :param tools: the model's tool format when tool calls are to be parsed, else None.
    :param tool_dicts: the request's tools as mlx-lm's parsers take them (:func:`tool_dicts`).
    :param parallel: several calls may be returned; when False, calls after the first are dropped.
    :param stream_calls: send calls in pieces while they are generated (formats with a streamer).
    """

    def __init__(
        self,
        *,
        think: tuple[str, str] | None = None,
        in_reasoning: bool = False,
        tools: ToolFormat | None = None,
        tool_dicts: list[dict[str, Any]] | None = None,
        parallel: bool = True,
        stream_calls: bool = False,
    ) -> None:
        self.think = think
        self.parallel = parallel
        self.tools = tools
        self.tool_dicts = tool_dicts or []
        self.state = "reasoning" if in_reasoning and think else "content"
        self._held = ""
        self._blank = ""
        """Whitespace-only content not sent yet (tools offered: it may be what separates calls)."""
        self._call_text = ""
        self._logprobs: list[TokenLogprob] = []
        self.made_tool_call = False
        self.stream_calls = stream_calls
        self._streamer: CallStreamer | None = None
        self._deltas: list[ToolCallDelta] = []
        self.held_tokens = 0

    @property
    def holding(self) -> bool:
        """Whether a call's text is being held whole (not streamed) until it is complete."""
        return self.state == "tool" and (self._streamer is None or not self._streamer.calls)

    def add_logprob(self, entry: TokenLogprob) -> None:
        self._logprobs.append(entry)

    def frame(self, text: str, count: int, *, final: bool) -> Token | None:
        """The Token frame for the text of ``count`` more tokens (None: nothing to send yet)."""
        content, reasoning, calls = self._split(text, final)
        self.held_tokens = self.held_tokens + count if self.holding else 0
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

    def advance(self, text: str) -> None:
        """Take ``text`` as already said (a moved stream's continuation): the state follows it (in reasoning,
        in content, calls made), nothing of it is sent again."""
        streaming, self.stream_calls = self.stream_calls, False
        self._split(text, False)
        self.stream_calls = streaming
        self._held = self._blank = ""
        self._deltas = []
        self._logprobs = []

    def _markers(self) -> list[str]:
        if self.state == "reasoning" and self.think:
            return [self.think[1]]
        if self.state == "tool" and self.tools:
            return [self.tools.end]
        found = []
        if self.think:
            found.append(self.think[0])
        if self.tools:
            found.append(self.tools.start)
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
        elif self.tools is not None and not (self._blank + text).strip():
            self._blank += text
        else:
            content.append(self._blank + text)
            self._blank = ""

    def _switch(self, marker: str, content: list[str], calls: list[ToolCall]) -> None:
        if self.state == "reasoning":
            self.state = "content"
        elif self.state == "tool":
            self._close_call(content, calls)
            self.state = "content"
        elif self.think and marker == self.think[0]:
            self.state = "reasoning"
        else:
            assert self.tools is not None
            self.state = "tool"
            self._call_text = ""
            if self.stream_calls and (self.parallel or not self.made_tool_call):
                self._streamer = self.tools.streamer(self.tool_dicts, limit=None if self.parallel else 1)

    def _stream(self, text: str) -> None:
        if self._streamer is not None:
            self._deltas.extend(self._streamer.feed(text))

    def _close_call(self, content: list[str], calls: list[ToolCall], *, closed: bool = True) -> None:
        """The end of a call block (``closed``: by its end marker, else by the end of the output)."""
        assert self.tools is not None
        parsed = self.tools.parse(self._call_text, self.tool_dicts)
        streamer, self._streamer = self._streamer, None
        streamed = streamer.finish(parsed) if streamer is not None else None
        if streamed is not None:
            final, deltas = streamed
            self._deltas.extend(deltas)
            self._add_calls(final, calls)
        elif parsed is None:
            content.append(self._blank + self.tools.start + self._call_text + (self.tools.end if closed else ""))
            self._blank = ""
        else:
            self._add_calls(parsed, calls)
        self._call_text = ""

    def _add_calls(self, parsed: list[ToolCall], calls: list[ToolCall]) -> None:
        if not self.parallel:
            parsed = [] if self.made_tool_call else parsed[:1]
        calls.extend(parsed)
        self.made_tool_call = self.made_tool_call or bool(parsed)

    def _finish(self, content: list[str], calls: list[ToolCall]) -> None:
        """End of output: an unclosed call is parsed if it can be (EOS right after the JSON), else shown; held
        whitespace goes out unless calls were made."""
        if self.state == "tool" and self.tools is not None:
            self._close_call(content, calls, closed=False)
            self.state = "content"
        if self._blank and not self.made_tool_call:
            content.append(self._blank)
        self._blank = ""


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
