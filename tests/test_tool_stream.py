"""Tool calls streamed in pieces: the shaper fed token by token (no model), the JSON re-emitter, the merge."""

from __future__ import annotations

import json

from mlx_lm.tool_parsers import json_tools

from mlxcluster.protocol import Token, ToolCallDelta
from mlxcluster.worker.output import OutputShaper, merge_tokens
from mlxcluster.worker.tool_formats import JsonToolsFormat, MistralFormat
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


def calls_by_id(frames: list[Token]) -> dict[str, str]:
    """Each streamed call's argument pieces, concatenated."""
    out: dict[str, str] = {}
    for delta in deltas(frames):
        out[delta.id] = out.get(delta.id, "") + delta.arguments
    return out


def test_mistral_calls_stream_one_after_another_in_their_block() -> None:
    from mlx_lm.tool_parsers import mistral

    fmt = MistralFormat("[TOOL_CALLS]", "", mistral.parse_tool_call, native=True)
    text = 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Par\\u00e9is",\n "n": [1, 2.50]}[TOOL_CALLS]noop[ARGS]{}'
    plain = merge_tokens(shape(OutputShaper(tools=fmt), [text]), 0)
    assert [c.name for c in plain.tool_calls or []] == ["get_weather", "noop"]
    for size in (1, 3, 7):
        frames = shape(OutputShaper(tools=fmt, stream_calls=True), pieces_of(text, size))
        calls = [c for f in frames for c in f.tool_calls or []]
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in plain.tool_calls or []]
        assert calls_by_id(frames) == {c.id: c.arguments for c in calls}
        assert [d.name for d in deltas(frames) if d.name] == ["get_weather", "noop"]
        assert "".join(f.text for f in frames) == "Sure."
        first_call_done = next(i for i, f in enumerate(frames) if f.tool_calls)
        assert any(d.name == "noop" for f in frames[: first_call_done + 1] for d in f.tool_call_deltas or [])


CODER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "flag": {"type": "boolean"},
                    "gone": {"type": "string"},
                    "word": {"type": "string"},
                },
            },
        },
    }
]
CODER_CALL = (
    '<tool_call>\n<function=get_weather>\n<parameter=city>\nPa"ris\nline 2 </param\n</parameter>\n'
    "<parameter=days>\n3\n</parameter>\n<parameter=flag>\ntrue\n</parameter>\n<parameter=gone>\nNULL\n</parameter>\n"
    "<parameter=word>\nnullish\n</parameter>\n<parameter=free>\n{x}\n</parameter>\n</function>\n</tool_call>"
)


def test_qwen3_coder_calls_stream_their_parameters_as_json() -> None:
    from mlx_lm.tool_parsers import qwen3_coder

    from mlxcluster.worker.tool_format_params import Qwen3CoderFormat

    fmt = Qwen3CoderFormat("<tool_call>", "</tool_call>", qwen3_coder.parse_tool_call, native=True)
    text = "On it. " + CODER_CALL
    (parsed,) = merge_tokens(shape(OutputShaper(tools=fmt, tool_dicts=CODER_TOOLS), [text]), 0).tool_calls or []
    assert json.loads(parsed.arguments) == {
        "city": 'Pa"ris\nline 2 </param',
        "days": 3,
        "flag": True,
        "gone": None,
        "word": "nullish",
        "free": "{x}",
    }
    for size in (1, 3, 7):
        frames = shape(OutputShaper(tools=fmt, tool_dicts=CODER_TOOLS, stream_calls=True), pieces_of(text, size))
        (call,) = [c for f in frames for c in f.tool_calls or []]
        assert (call.name, call.arguments) == (parsed.name, parsed.arguments)
        assert calls_by_id(frames) == {call.id: call.arguments}
        city_closed = next(
            i for i, f in enumerate(frames) if '"days"' in "".join(d.arguments for d in f.tool_call_deltas or [])
        )
        assert "line 2" in "".join(d.arguments for f in frames[:city_closed] for d in f.tool_call_deltas or [])


def test_whitespace_beside_calls_is_not_content() -> None:
    call = '<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call>'
    merged = merge_tokens(shape(OutputShaper(tools=TOOLS), ["\n", "\n", call, "\n", call, "\n"]), 0)
    assert merged.text == "" and len(merged.tool_calls or []) == 2
    merged = merge_tokens(shape(OutputShaper(tools=TOOLS), ["Hi", "\n", call, "\n", " Done", "."]), 0)
    assert merged.text == "Hi\n\n Done." and len(merged.tool_calls or []) == 1
    shaper = OutputShaper(tools=TOOLS)
    assert shaper.frame("\n\n", 1, final=False) is None  # held until it is known
    final = shaper.frame("", 1, final=True)
    assert final is not None and final.text == "\n\n"  # no call was made: it was content after all
    unparsed = merge_tokens(shape(OutputShaper(tools=TOOLS), ["\n", "<tool_call>oops</tool_call>"]), 0)
    assert unparsed.text == "\n<tool_call>oops</tool_call>"


def test_a_call_held_whole_says_so_and_how_long() -> None:
    shaper = OutputShaper(tools=TOOLS)
    assert shaper.frame("Sure. <tool_call>\n{", 3, final=False) is not None
    assert shaper.holding and shaper.held_tokens == 3
    assert shaper.frame('"name": "w", ', 4, final=False) is None
    assert shaper.holding and shaper.held_tokens == 7
    frame = shaper.frame('"arguments": {}}\n</tool_call>', 5, final=False)
    assert frame is not None and frame.tool_calls and not shaper.holding and shaper.held_tokens == 0
    streamed = OutputShaper(tools=TOOLS, stream_calls=True)
    streamed.frame('<tool_call>\n{"name": "w", "arguments": {', 3, final=False)
    assert not streamed.holding  # its pieces are going out
