"""Hand-written bad input for the HTTP API, beyond the field checks of ``test_api.py``: bytes that are not
UTF-8, JSON nested deeper than the decoder's stack, numbers out of every range, bodies that are too big in
each way (``max_body_bytes``, a gzip bomb, chunked, NATS ``max_payload``), unicode edge cases echoed back
byte for byte, content-part lists, odd paths and query strings. Nothing may answer 5xx.

One controller and one echo worker serve the whole module (module-scoped event loop), so the many
small cases stay cheap.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from cluster_harness import Cluster, RunningController, sse_events
from loopback import make_config

from mlxcluster.embedded import EmbeddedNatsServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
MAX_BODY = 1024 * 1024
MAX_PAYLOAD = 64 * 1024


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def controller() -> AsyncIterator[RunningController]:
    """A controller (1 MiB bodies) and an echo worker on a nats-server with a 64 KiB max_payload."""
    config = make_config(
        nats={"max_payload": MAX_PAYLOAD},
        controller={"max_body_bytes": MAX_BODY},
        discovery={"heartbeat_interval_ms": 200, "offline_timeout_ms": 5000},
    )
    async with EmbeddedNatsServer(config.nats), Cluster(config) as cluster:
        await cluster.start_worker("w1")
        running = await cluster.start_controller()
        await running.wait_online("w1")
        yield running


async def send(
    controller: RunningController, path: str, body: Any, *, method: str = "POST", headers: dict[str, str] | None = None
) -> tuple[int, Any, str]:
    """Send ``body`` (bytes as they are, anything else as JSON); return (status, JSON or None, text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    async with controller.session().request(method, controller.url + path, data=data, headers=all_headers) as resp:
        text = await resp.text(errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return resp.status, parsed, text


def chat(content: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}], **fields}


def assert_error(status: int, body: Any, expected: int, *, code: str | None = None, param: str | None = None) -> None:
    assert status == expected, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert error["type"] == ("invalid_request_error" if expected < 500 else "server_error")
    if code is not None:
        assert error["code"] == code, body
    if param is not None:
        assert error["param"] == param, body


# --- bytes and JSON that the decoder must refuse cleanly -----------------------------------------

NOT_JSON = [
    pytest.param(
        b'{"model": "echo", "messages": [{"role": "user", "content": "\xff\xfe"}]}', id="invalid-utf8-in-string"
    ),
    pytest.param(b"\xff\xfe{}", id="invalid-utf8-outside-strings"),
    pytest.param(b'{"model": "echo", "messages": [{"role": "user", "content": "\\ud800"}]}', id="lone-surrogate"),
    pytest.param(b'{"model": "echo", "messages": [{"role": "user", "content": "a\\udfffb"}]}', id="lone-low-surrogate"),
    pytest.param(b'\xef\xbb\xbf{"model": "echo", "messages": []}', id="utf8-bom"),
    pytest.param(b'{"model": "echo", "messages": [], "temperature": NaN}', id="nan-literal"),
    pytest.param(b'{"model": "echo", "messages": [], "temperature": Infinity}', id="infinity-literal"),
    pytest.param(b'{"model": "echo"} trailing', id="trailing-garbage"),
    pytest.param(b'{"model": "echo", "messages": [}', id="truncated"),
    pytest.param(b"model=echo&messages=hi", id="form-encoded"),
    pytest.param(b"\x00" * 64, id="nul-bytes"),
    pytest.param(b"null", id="top-level-null"),
    pytest.param(b'"just a string"', id="top-level-string"),
    pytest.param(b"12345678901234567890123456789", id="top-level-huge-number"),
    pytest.param(b"   \n\t  ", id="whitespace-only"),
]


@pytest.mark.parametrize("raw", NOT_JSON)
async def test_undecodable_bodies_are_400(controller: RunningController, raw: bytes) -> None:
    for path in (CHAT, TEXT):
        status, body, _ = await send(controller, path, raw)
        assert_error(status, body, 400)


@pytest.mark.parametrize("depth", [50, 10_000, 200_000])
async def test_deeply_nested_json_is_refused_or_served_never_500(controller: RunningController, depth: int) -> None:
    """Nesting in a free-form field (a tool's schema) and in a typed one: shallow is served, deep is a 400."""
    nested = "[" * depth + "]" * depth
    tool = f'{{"type": "function", "function": {{"name": "f", "parameters": {{"type": "object", "x-n": {nested}}}}}}}'
    ignored = f'{{"model": "echo", "messages": [{{"role": "user", "content": "deep"}}], "tools": [{tool}]}}'
    typed = f'{{"model": "echo", "messages": [{{"role": "user", "content": "deep"}}], "stop": {nested}}}'
    status, body, _ = await send(controller, CHAT, ignored.encode())
    if depth <= 50:
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == "deep"
    else:
        assert_error(status, body, 400, code="invalid_json")
        assert "nested too deeply" in body["error"]["message"]
    status, body, _ = await send(controller, CHAT, typed.encode())
    assert_error(status, body, 400)


async def test_duplicate_keys_take_the_last_value(controller: RunningController) -> None:
    raw = b'{"model": "nope", "model": "echo", "messages": [{"role": "user", "content": "dup"}]}'
    status, body, _ = await send(controller, CHAT, raw)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "dup"


async def test_content_type_is_not_required_to_be_json(controller: RunningController) -> None:
    """The body is parsed as JSON whatever the Content-Type says (as OpenAI's API does)."""
    status, body, _ = await send(controller, CHAT, chat("typed as text"), headers={"Content-Type": "text/plain"})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "typed as text"


# --- numbers out of range and wrong types ---------------------------------------------------------

OUT_OF_RANGE = [
    pytest.param({"max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param({"max_tokens": 2**64}, "max_tokens", id="max-tokens-2**64"),
    pytest.param({"max_tokens": -(2**63) - 1}, "max_tokens", id="max-tokens-below-int64"),
    pytest.param({"max_tokens": 10.5}, "max_tokens", id="max-tokens-fraction"),
    pytest.param({"max_tokens": True}, "max_tokens", id="max-tokens-bool"),
    pytest.param({"max_tokens": [10]}, "max_tokens", id="max-tokens-list"),
    pytest.param({"max_completion_tokens": -5}, "max_completion_tokens", id="max-completion-tokens-negative"),
    pytest.param({"max_completion_tokens": 2**40}, "max_completion_tokens", id="max-completion-tokens-huge"),
    pytest.param({"temperature": -0.1}, "temperature", id="temperature-negative"),
    pytest.param({"temperature": "hot"}, "temperature", id="temperature-str"),
    pytest.param({"top_p": 1.0000001}, "top_p", id="top-p-above-1"),
    pytest.param({"top_k": -1}, "top_k", id="top-k-negative"),
    pytest.param({"min_p": 2}, "min_p", id="min-p-above-1"),
    pytest.param({"repetition_penalty": 0}, "repetition_penalty", id="repetition-penalty-zero"),
    pytest.param({"seed": 1.5}, "seed", id="seed-fraction"),
    pytest.param({"n": 0}, "n", id="n-zero"),
    pytest.param({"n": 2**70}, "n", id="n-huge"),
    pytest.param({"model": ""}, "model", id="model-empty"),
    pytest.param({"model": "m" * 513}, "model", id="model-too-long"),
    pytest.param({"model": None}, "model", id="model-null"),
    pytest.param({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", id="stream-options"),
    pytest.param({"stop": [None]}, "stop", id="stop-null-item"),
    pytest.param({"user": 7}, "user", id="user-int"),
]


@pytest.mark.parametrize(("fields", "param"), OUT_OF_RANGE)
async def test_out_of_range_and_mistyped_fields_are_400(
    controller: RunningController, fields: dict[str, Any], param: str
) -> None:
    status, body, _ = await send(controller, CHAT, chat("x", **fields))
    assert_error(status, body, 400)
    assert body["error"]["param"].startswith(param.split(".")[0]), body
    text_fields = {k: v for k, v in fields.items() if k != "max_completion_tokens"}
    if text_fields:
        status, body, _ = await send(controller, TEXT, {"model": "echo", "prompt": "x", **text_fields})
        assert_error(status, body, 400)


@pytest.mark.parametrize(
    ("literal", "param"),
    [
        ('"max_tokens": 1e400', "max_tokens"),
        ('"max_tokens": 1e2', "max_tokens"),
        ('"temperature": 1e400', "temperature"),
        ('"temperature": -1e-400', None),  # -0.0: in range
        ('"seed": ' + "9" * 5000, "seed"),
        ('"top_k": -0', None),
    ],
)
async def test_json_number_literals(controller: RunningController, literal: str, param: str | None) -> None:
    """Numbers as JSON text (Python's json cannot write 1e400): out of range is a 400, never a 5xx."""
    raw = f'{{"model": "echo", "messages": [{{"role": "user", "content": "n"}}], {literal}}}'.encode()
    status, body, _ = await send(controller, CHAT, raw)
    if param is None:
        assert status == 200, body
    else:
        assert_error(status, body, 400, param=param)


async def test_extreme_but_valid_numbers_are_served(controller: RunningController) -> None:
    fields = {"max_tokens": 1 << 20, "seed": 2**64 - 1, "top_k": 2**62, "temperature": 0, "top_p": 1e-300}
    status, body, _ = await send(controller, CHAT, chat("big numbers", **fields))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "big numbers"
    for seed in (-(2**63), 2**200):  # any integer: the mlx sampler folds it into 64 bits
        status, body, _ = await send(controller, CHAT, chat("odd seed", seed=seed))
        assert status == 200, body


# --- messages, roles, content parts ---------------------------------------------------------------

MESSAGE_CASES = [
    pytest.param([{"role": None, "content": "x"}], "messages[0].role", id="role-null"),
    pytest.param([{"role": "", "content": "x"}], "messages[0].role", id="role-empty"),
    pytest.param([{"role": "USER", "content": "x"}], "messages[0].role", id="role-upper-case"),
    pytest.param([{"role": "user\u0000", "content": "x"}], "messages[0].role", id="role-with-nul"),
    pytest.param([{"role": "user", "content": "x"}, {"role": "function"}], "messages[1].role", id="role-function"),
    pytest.param(["user: hi"], "messages[0]", id="message-is-a-string"),
    pytest.param([None], "messages[0]", id="message-is-null"),
    pytest.param([{"role": "user", "content": {"text": "x"}}], "messages[0].content", id="content-object"),
    pytest.param(
        [{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0].type", id="part-no-type"
    ),
    pytest.param([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].type", id="part-no-text"),
    pytest.param(
        [{"role": "user", "content": [{"type": "text", "text": None}]}], "messages[0].content[0].type", id="text-null"
    ),
    pytest.param(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}],
            }
        ],
        "messages[0].content[1].image_url.url",  # echo is not a vision model
        id="text-then-image",
    ),
    pytest.param([{"role": "user", "content": ["bare string part"]}], "messages[0].content[0]", id="part-is-a-string"),
    pytest.param([{"role": "user", "content": "x", "name": 5}], "messages[0].name", id="name-int"),
]


@pytest.mark.parametrize(("messages", "param"), MESSAGE_CASES)
async def test_bad_messages_are_400_naming_the_place(
    controller: RunningController, messages: list[Any], param: str
) -> None:
    status, body, _ = await send(controller, CHAT, {"model": "echo", "messages": messages})
    assert_error(status, body, 400, param=param)


async def test_content_parts_and_empty_content_are_served(controller: RunningController) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": " two"}, {"type": "text", "text": ""}]
    status, body, _ = await send(controller, CHAT, chat(parts))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "one two"
    # Nothing to echo: the echo engine answers its own name; the point is a clean 200, not a 5xx.
    for empty in ([], "", None):
        status, body, _ = await send(controller, CHAT, chat(empty))
        assert status == 200, (empty, body)
    history = [
        {"role": "system", "content": None},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b"},
    ]
    status, body, _ = await send(controller, CHAT, {"model": "echo", "messages": history})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "b"


async def test_many_messages_and_many_parts(controller: RunningController) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "p"}] * 50}] * 200 + [chat("last")["messages"][0]]
    status, body, _ = await send(controller, CHAT, {"model": "echo", "messages": messages})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "last"


async def test_bad_prompts(controller: RunningController) -> None:
    for prompt, param in ([], "prompt"), ([None], "prompt[0]"), (5, "prompt"), ({"text": "x"}, "prompt"):
        status, body, _ = await send(controller, TEXT, {"model": "echo", "prompt": prompt})
        assert_error(status, body, 400, param=param)
    status, body, _ = await send(controller, TEXT, {"model": "echo", "prompt": ""})
    assert status == 200, body


# --- unicode edge cases, echoed back exactly ------------------------------------------------------

UNICODE_WORDS = [
    pytest.param("a\u0000b", id="nul"),
    pytest.param("\u0001\u001b[31mred\u001b[0m\u007f", id="control-and-ansi"),
    pytest.param(
        "\u202eevil\u202c \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627", id="rtl-override-hebrew-arabic"
    ),
    pytest.param(
        "\U0001f600 \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1fa\U0001f1f3 \U0001f44d\U0001f3fd",
        id="emoji-zwj-flags",
    ),
    pytest.param("e\u0301 \u0065\u0301\u0302\u0303\u0304\u0305 Z\u0351\u0352\u0357\u035b", id="combining-marks"),
    pytest.param("\ufeffbom \u200bzero-width \u2060joiner", id="invisible"),
    pytest.param("\U0010ffff \ufffe \uffff \U000e0041", id="noncharacters-and-tags"),
    pytest.param("\u1100\u1161\u11a8 \u0ba8\u0bbf \u0e01\u0e33", id="jamo-tamil-thai"),
    pytest.param("𝕋𝕙𝕖 \u00df\u0130\u0131 \ufb01", id="math-alnum-casefold"),
    pytest.param('\\ " / \\u0000 </script>', id="json-and-html-specials"),
]


@pytest.mark.parametrize("text", UNICODE_WORDS)
async def test_unicode_is_echoed_back_exactly(controller: RunningController, text: str) -> None:
    """Sent escaped (``ensure_ascii``) and raw UTF-8, non-streamed and streamed, as chat and as a prompt."""
    for ensure_ascii in (True, False):
        raw = json.dumps(chat(text), ensure_ascii=ensure_ascii).encode()
        status, body, _ = await send(controller, CHAT, raw)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == text
    status, body, _ = await send(controller, TEXT, {"model": "echo", "prompt": text, "max_tokens": 100})
    assert status == 200, body
    assert body["choices"][0]["text"] == text
    async with controller.session().post(controller.url + CHAT, json=chat(text, stream=True)) as resp:
        assert resp.status == 200
        events = [event async for event in sse_events(resp)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


async def test_unicode_in_model_names_paths_and_headers(controller: RunningController) -> None:
    weird_model = "mod\u0000el-\U0001f600-\u202e"
    status, body, _ = await send(controller, CHAT, {**chat("x"), "model": weird_model})
    assert_error(status, body, 404, code="model_not_found")
    assert weird_model in body["error"]["message"]
    for path in (
        "/v1/models/%F0%9F%98%80",
        "/v1/models/%00",
        "/v1/models/%ff%fe",
        "/v1/models/..%2F..%2Fetc%2Fpasswd",
        "/api/cluster/workers/%E2%80%AE",
        "/api/cluster/workers/w1%00",
    ):
        status, body, text = await send(controller, path, None, method="GET")
        assert status == 404, (path, text)
        assert body is not None and "error" in body, (path, text)
    for query in (
        "status=%00",
        "status=%ff",
        "status=online&status=offline",
        "model=" + "x" * 4000,
        "tag=%F0%9F%98%80",
    ):
        status, body, text = await send(controller, f"/api/cluster/workers?{query}", None, method="GET")
        assert status in (200, 400), (query, text)
    status, _, _ = await send(controller, CHAT, chat("x"), headers={"x-request-id": "\u00e9\u00e9"})
    assert status == 200


# --- size limits -------------------------------------------------------------------------------


async def test_body_size_limits_in_every_form(controller: RunningController) -> None:
    """Over ``max_body_bytes`` as a plain body, chunked with no length, or a gzip bomb: 413, never buffered."""
    oversized = json.dumps(chat("x" * (MAX_BODY + 10))).encode()
    status, body, _ = await send(controller, CHAT, oversized)
    assert_error(status, body, 413, code="payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 4096 + 10):
            yield b" " * 4096

    async with controller.session().post(controller.url + CHAT, data=chunks()) as resp:
        assert resp.status == 413, await resp.text()

    bomb = gzip.compress(b'{"model": "echo", "pad": "' + b"0" * (64 * MAX_BODY) + b'"}')
    assert len(bomb) < MAX_BODY // 8
    status, body, _ = await send(controller, CHAT, bomb, headers={"Content-Encoding": "gzip"})
    assert_error(status, body, 413, code="payload_too_large")

    small = gzip.compress(json.dumps(chat("zipped words")).encode())
    status, body, _ = await send(controller, CHAT, small, headers={"Content-Encoding": "gzip"})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "zipped words"


async def test_body_that_cannot_be_read_is_400_not_500(controller: RunningController) -> None:
    for encoding in ("gzip", "deflate", "br"):
        status, body, text = await send(
            controller, CHAT, b"definitely not compressed", headers={"Content-Encoding": encoding}
        )
        assert 400 <= status < 500, (encoding, status, text)
        if body is not None:  # an encoding aiohttp cannot decode at all is refused before our handler runs
            assert_error(status, body, 400, code="invalid_body")


async def test_raw_http_garbage_never_gets_a_500(controller: RunningController) -> None:
    """Broken chunking, a lying Content-Length, junk request lines: refused by the HTTP layer, never a 5xx."""
    port = controller.port
    requests = [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: \x00\x01\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # a TLS ClientHello on the HTTP port
        b"GARBAGE\r\n\r\n",
    ]
    for raw in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            head = await asyncio.wait_for(reader.read(200), 5)
        finally:
            writer.close()
        if head:  # the server may also just close the connection
            status = int(head.split(b" ", 2)[1])
            assert 400 <= status < 500, (raw[:40], head)
    status, _, _ = await send(controller, "/health", None, method="GET")
    assert status == 200


async def test_prompt_over_nats_max_payload_is_413_naming_it(controller: RunningController) -> None:
    """Under ``max_body_bytes`` but over the bus's ``max_payload``: 413 at once, streamed or not, chat or text."""
    assert controller.bus.max_payload == MAX_PAYLOAD
    words = " ".join(["word"] * (MAX_PAYLOAD // 4))  # ~80 KB: fits the HTTP limit, not a NATS message
    served_before = controller.ctx.dispatcher.stats.requests
    for path, body in (
        (CHAT, chat(words)),
        (CHAT, chat(words, stream=True)),
        (TEXT, {"model": "echo", "prompt": words}),
        (TEXT, {"model": "echo", "prompt": [words], "stream": True}),
        (CHAT, {"model": "echo", "messages": [{"role": "user", "content": words[:40_000]}] * 2}),
    ):
        status, data, _ = await send(controller, path, body)
        assert_error(status, data, 413, code="payload_too_large")
        assert "max_payload" in data["error"]["message"] and str(MAX_PAYLOAD) in data["error"]["message"]
    assert controller.ctx.dispatcher.stats.requests == served_before  # refused before dispatch
    # Escapes do not fool the check: 10,000 NULs are 60,000 bytes on the wire either way.
    status, data, _ = await send(controller, CHAT, chat("\u0000" * 11_000))
    assert_error(status, data, 413, code="payload_too_large")
    status, data, _ = await send(controller, CHAT, chat("\u0000" * 9_000))
    assert status == 200, data
