"""Tool calls streamed in pieces: the shaper fed token by token (no model), the JSON re-emitter, the merge."""

from __future__ import annotations

import json

from mlx_lm.tool_parsers import json_tools

from mlxcluster.protocol import Token, ToolCallDelta
from mlxcluster.worker.output import OutputShaper, merge_tokens
from mlxcluster.worker.tool_formats import JsonToolsFormat
from mlxcluster.worker.tool_stream import JsonCallStreamer

TOOLS = JsonToolsFormat("<tool_call>", "</tool_call>", json_tools.parse_tool_call, native=True)
CALL = '<tool_call>\n{"name": "w", "arguments": {"city": "Par\\u00e9is", "n": [1, 2.50, true], "o": {}}}\n</tool_call>'


def pieces_of(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def shape(shaper: OutputShaper, pieces: list[str]) -> list[Token]:
    frames = [shaper.frame(piece, 1, final=False) for piece in pieces]
    frames.append(shaper.frame("", 0, final=True))
    return [f for f in frames if f is not None]


def deltas(frames: list[Token]) -> list[ToolCallDelta]:
    return [d for f in frames for d in f.tool_call_deltas or []]


def buffered(pieces: list[str]) -> Token:
    return merge_tokens(shape(OutputShaper(tools=TOOLS), pieces), 0)


def test_a_call_fed_token_by_token_streams_its_arguments_in_pieces() -> None:
    for size in (1, 3, 7):
        pieces = ["Sure. ", *pieces_of(CALL, size), " done"]
        frames = shape(OutputShaper(tools=TOOLS, stream_calls=True), pieces)
        sent = deltas(frames)
        head, rest = sent[0], sent[1:]
        assert head.name == "w" and head.arguments == "" and head.id.startswith("call_")
        assert len(rest) > 3 and all(not d.name and d.id == head.id for d in rest)
        arguments = "".join(d.arguments for d in rest)
        calls = [c for f in frames for c in f.tool_calls or []]
        assert [(c.id, c.name, c.arguments) for c in calls] == [(head.id, "w", arguments)]
        assert json.loads(arguments) == {"city": "Paréis", "n": [1, 2.5, True], "o": {}}
        # the same text as the buffered (non-streamed) result, which the stream flag leaves as it was
        plain = buffered(pieces)
        assert plain.tool_call_deltas is None and plain.tool_calls is not None
        assert plain.tool_calls[0].arguments == arguments
        assert "".join(f.text for f in frames) == plain.text == "Sure.  done"
        # the head is sent before the call's end marker has come
        closing = next(i for i, f in enumerate(frames) if f.tool_calls)
        assert any(f.tool_call_deltas for f in frames[:closing])


def test_what_is_not_a_streamable_call_is_parsed_whole_as_before() -> None:
    for text in (
        '<tool_call>{"arguments": {"a": 1}, "name": "w"}</tool_call>',  # another key order
        '<tool_call>[{"name": "w", "arguments": {}}]</tool_call>',  # a list of calls
        "<tool_call>{oops</tool_call>",  # not a call: shown as text
    ):
        pieces = pieces_of(text, 2)
        frames = shape(OutputShaper(tools=TOOLS, stream_calls=True), pieces)
        assert deltas(frames) == []
        merged, plain = merge_tokens(frames, 0), buffered(pieces)
        assert merged.text == plain.text
        assert [(c.name, c.arguments) for c in merged.tool_calls or []] == [
            (c.name, c.arguments) for c in plain.tool_calls or []
        ]


def test_a_call_cut_by_the_end_keeps_exactly_what_was_streamed() -> None:
    frames = shape(OutputShaper(tools=TOOLS, stream_calls=True), pieces_of(CALL[:52], 2))
    arguments = "".join(d.arguments for d in deltas(frames))
    calls = [c for f in frames for c in f.tool_calls or []]
    assert len(calls) == 1 and calls[0].arguments == arguments and arguments.startswith('{"city": "Par')
    assert "".join(f.text for f in frames) == ""  # no half call shown as text after its pieces went out


def test_only_the_first_call_streams_when_parallel_calls_are_off() -> None:
    two = CALL + CALL.replace('"w"', '"v"')
    frames = shape(OutputShaper(tools=TOOLS, stream_calls=True, parallel=False), pieces_of(two, 3))
    assert [d.name for d in deltas(frames) if d.name] == ["w"]
    assert [c.name for f in frames for c in f.tool_calls or []] == ["w"]


def test_arguments_are_written_as_json_dumps_writes_them() -> None:
    raw = '{ "name":"f" ,\n "arguments" :{"a":{"b":[ ]},"c":"\\"q\\"\\/","d":1e3,"e":"\\ud83d\\ude00","f":-0}}\n'
    for size in (1, 2, 5):
        streamer, sent = JsonCallStreamer(), []
        for piece in pieces_of(raw, size):
            sent.extend(d.arguments for d in streamer.feed(piece))
        assert [c.name for c in streamer.calls] == ["f"] and streamer.complete
        assert "".join(sent) == json.dumps(json.loads(raw)["arguments"], ensure_ascii=False)


def test_merging_frames_joins_a_calls_pieces_but_keeps_its_head() -> None:
    frames = shape(OutputShaper(tools=TOOLS, stream_calls=True), pieces_of(CALL, 4))
    merged = merge_tokens(frames, 0)
    assert merged.tool_call_deltas is not None
    head, body = merged.tool_call_deltas
    assert head.name == "w" and body.arguments == merged.tool_calls[0].arguments  # type: ignore[index]


def test_a_stream_lost_inside_a_streamed_call_is_not_moved() -> None:
    from mlxcluster.controller.routing.migration import LostMidStream, StreamSoFar
    from mlxcluster.protocol import Error, InferenceRequest

    lost = LostMidStream("w1", "offline", Error(code="worker_lost", message="worker w1 went offline"))
    frames = shape(OutputShaper(tools=TOOLS, stream_calls=True), pieces_of(CALL, 4))
    closing = next(i for i, f in enumerate(frames) if f.tool_calls)
    so_far = StreamSoFar(InferenceRequest(request_id="r", model="m", max_tokens=64))
    for frame in frames[:closing]:
        so_far.relayed(frame)
    ending = so_far.ending(lost, 3, client_gone=False)
    assert isinstance(ending, Error) and "tool call" in ending.message and not ending.retryable
    so_far.relayed(frames[closing])  # the call's end came: the stream may move again
    assert so_far.ending(lost, 3, client_gone=False) is None
