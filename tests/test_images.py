"""Images in requests, controller side: the parts each API takes, data URLs, checked bytes, fetched URLs.

No model is needed: the image URL fetch runs against a local aiohttp server; the vision check against a
registry fed with a catalogue; the end-to-end path through a vision model is in ``test_vision.py``.
"""

from __future__ import annotations

import base64
import socket
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import openai
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from cluster_harness import single_worker_cluster
from loopback import free_port, shared_config

from mlxcluster.bus import Bus, StreamInbox
from mlxcluster.bus.image_store import ImageMissing, ImageStore, ImagesUnavailable
from mlxcluster.bus.jetstream import ObjectBucket
from mlxcluster.config import Config, ControllerSection
from mlxcluster.controller.http.anthropic_schema import MessagesRequest, messages_to_inference
from mlxcluster.controller.http.errors import ApiError
from mlxcluster.controller.http.image_addresses import NotPublicAddress, PublicAddressResolver, check_literal, is_public
from mlxcluster.controller.http.images import (
    MAX_IMAGES,
    ImageFetcher,
    ImageRef,
    check_vision,
    decode_data_url,
    parked_images,
    resolve_images,
    sniff,
)
from mlxcluster.controller.http.openai_schema import ChatCompletionRequest, chat_to_inference
from mlxcluster.controller.http.responses_schema import ResponsesRequest, responses_to_inference
from mlxcluster.controller.routing.dispatch import SUBJECT_HEADROOM, Dispatcher
from mlxcluster.controller.routing.registry import WorkerRegistry
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.protocol import (
    Capabilities,
    CatalogueModel,
    ChatMessage,
    Hardware,
    ImageInput,
    InferenceRequest,
    WorkerRegistration,
    encode,
)


def tiny_png() -> bytes:
    """A valid 1×1 PNG, written by hand (no Pillow on the controller)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b"")
    )


PNG = tiny_png()
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def status_of(exc: pytest.ExceptionInfo[ApiError]) -> tuple[int, str | None, str | None]:
    return exc.value.status, exc.value.param, exc.value.code


def test_sniff_knows_the_formats_by_their_first_bytes() -> None:
    assert sniff(PNG) == "image/png"
    assert sniff(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff(b"GIF89a...") == "image/gif"
    assert sniff(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert sniff(b"RIFF\0\0\0\0WAVEfmt ") is None
    assert sniff(b"BM....") == "image/bmp"
    assert sniff(b"%PDF-1.7") is None


def test_data_urls_decode_and_bad_ones_are_400s_naming_the_field() -> None:
    image = decode_data_url(PNG_URL, "p")
    assert image.media_type == "image/png" and image.data == PNG
    with pytest.raises(ApiError) as exc:
        decode_data_url("data:image/png;base64,%%%", "messages[0].content[1].image_url.url")
    assert status_of(exc) == (400, "messages[0].content[1].image_url.url", "invalid_image")
    with pytest.raises(ApiError) as exc:
        decode_data_url("data:image/png;base64," + base64.b64encode(b"just some text").decode(), "x")
    assert status_of(exc) == (400, "x", "invalid_image")
    assert "not a PNG, JPEG, GIF, WebP or BMP image" in exc.value.message
    with pytest.raises(ApiError) as exc:
        decode_data_url("data:image/png," + "abc", "x")
    assert status_of(exc) == (400, "x", "invalid_value")


def chat(content: object, **fields: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], **fields}
    return msgspec.convert(body, ChatCompletionRequest)


def test_openai_image_parts_are_collected_or_refused_as_before() -> None:
    parts = [
        {"type": "text", "text": "What is "},
        {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "auto"}},
        {"type": "text", "text": "this?"},
    ]
    refs: list[ImageRef] = []
    inference = chat_to_inference(chat(parts), "r", 0.0, 64, images=refs)
    assert inference.messages is not None and inference.messages[0].content == "What is this?"
    assert inference.messages[0].images == 1
    assert refs == [ImageRef(PNG_URL, "messages[0].content[1].image_url.url")]
    with pytest.raises(ApiError) as exc:  # a caller that takes no images (the WebSocket) keeps the 400
        chat_to_inference(chat(parts), "r", 0.0, 64)
    assert status_of(exc)[:2] == (400, "messages[0].content[1].type")
    for detail in ("low", "high"):  # not honoured: refused, never ignored
        parts[1] = {"type": "image_url", "image_url": {"url": PNG_URL, "detail": detail}}
        with pytest.raises(ApiError) as exc:
            chat_to_inference(chat(parts), "r", 0.0, 64, images=[])
        assert status_of(exc) == (400, "messages[0].content[1].image_url.detail", "unsupported_value")


def test_anthropic_image_blocks_and_responses_input_images_are_collected() -> None:
    data = base64.b64encode(PNG).decode()
    body = msgspec.convert(
        {
            "model": "m",
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.org/a.png"}},
                        {"type": "text", "text": "Compare."},
                    ],
                }
            ],
        },
        MessagesRequest,
    )
    refs: list[ImageRef] = []
    inference = messages_to_inference(body, "r", 0.0, refs)
    assert inference.messages is not None and inference.messages[0].images == 2
    assert refs == [
        ImageRef(PNG_URL, "messages[0].content[0].source.data"),
        ImageRef("https://example.org/a.png", "messages[0].content[1].source.url"),
    ]
    bad = msgspec.convert(
        {
            "model": "m",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "id": "f"}}]}],
        },
        MessagesRequest,
    )
    with pytest.raises(ApiError) as exc:
        messages_to_inference(bad, "r", 0.0, [])
    assert status_of(exc)[:2] == (400, "messages[0].content[0].source.type")

    responses = msgspec.convert(
        {
            "model": "m",
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "What?"}, {"type": "input_image", "image_url": PNG_URL}],
                }
            ],
        },
        ResponsesRequest,
    )
    refs = []
    inference = responses_to_inference(responses, "r", 0.0, 64, refs)
    assert inference.messages is not None and inference.messages[0].images == 1
    assert refs == [ImageRef(PNG_URL, "input[0].content[1].image_url")]
    no_url = msgspec.convert(
        {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
        ResponsesRequest,
    )
    with pytest.raises(ApiError) as exc:
        responses_to_inference(no_url, "r", 0.0, 64, [])
    assert status_of(exc)[:2] == (400, "input[0].content[0].image_url")
    for extra, param in (({"detail": "auto"}, None), ({"detail": "high"}, "detail"), ({"crop": [0, 0]}, "crop")):
        part = {"type": "input_image", "image_url": PNG_URL, **extra}
        body = msgspec.convert({"model": "m", "input": [{"role": "user", "content": [part]}]}, ResponsesRequest)
        if param is None:
            responses_to_inference(body, "r", 0.0, 64, [])
            continue
        with pytest.raises(ApiError) as exc:
            responses_to_inference(body, "r", 0.0, 64, [])
        assert status_of(exc)[:2] == (400, f"input[0].content[0].{param}")


def registry_with(models: dict[str, bool]) -> WorkerRegistry:
    registry = WorkerRegistry(Config())
    catalogue = [CatalogueModel(name=name, vision=vision) for name, vision in models.items()]
    registry.on_registration(
        WorkerRegistration(
            worker_id="w1",
            hostname="h",
            hardware=Hardware(),
            capabilities=Capabilities(models=list(models), catalogue=catalogue),
        )
    )
    return registry


async def test_only_a_vision_model_takes_images() -> None:
    registry = registry_with({"text": False, "eyes": True})
    refs = [ImageRef(PNG_URL, "messages[0].content[0].image_url.url")]
    check_vision(registry, "eyes", refs)
    check_vision(registry, "unknown", refs)  # dispatch answers its 404
    with pytest.raises(ApiError) as exc:
        check_vision(registry, "text", refs)
    assert status_of(exc) == (400, "messages[0].content[0].image_url.url", "unsupported_content")
    assert "'text' takes only text" in exc.value.message
    fetcher = ImageFetcher(ControllerSection())
    assert await resolve_images(registry, fetcher, "eyes", []) is None
    images = await resolve_images(registry, fetcher, "eyes", refs)
    assert images is not None and images[0].data == PNG
    with pytest.raises(ApiError) as exc:
        await resolve_images(registry, fetcher, "eyes", refs * (MAX_IMAGES + 1))
    assert exc.value.status == 400
    with pytest.raises(ApiError) as exc:
        await resolve_images(registry, fetcher, "eyes", [ImageRef("file:///etc/passwd", "u")])
    assert status_of(exc)[:2] == (400, "u")


LARGE = PNG + bytes(6 << 20)
"""An image of several MB: more than one read of the response's buffer."""


@pytest.fixture
async def image_server() -> AsyncIterator[str]:
    port = free_port()

    async def png(_request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def big(_request: web.Request) -> web.Response:
        return web.Response(body=PNG + b"\0" * 4096, content_type="image/png")

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})  # chunked: no Content-Length
        await response.prepare(request)
        for start in range(0, len(LARGE), 1 << 20):
            await response.write(LARGE[start : start + (1 << 20)])
        await response.write_eof()
        return response

    async def moved(_request: web.Request) -> web.Response:  # to a host not in the allowed list
        raise web.HTTPFound(f"http://localhost:{port}/a.png")

    app = web.Application()
    app.router.add_get("/a.png", png)
    app.router.add_get("/big.png", big)
    app.router.add_get("/large.png", large)
    app.router.add_get("/moved.png", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_image_urls_are_fetched_only_when_allowed(image_server: str) -> None:
    url = f"{image_server}/a.png"
    with pytest.raises(ApiError) as exc:
        await ImageFetcher(ControllerSection()).fetch(url, "u")
    assert status_of(exc) == (400, "u", "unsupported_value") and "image_fetch is off" in exc.value.message
    with pytest.raises(ApiError) as exc:
        await ImageFetcher(ControllerSection(image_fetch=True, image_fetch_hosts=["example.org"])).fetch(url, "u")
    assert "not in controller.image_fetch_hosts" in exc.value.message
    lan = {"image_fetch": True, "image_fetch_private": True}  # the test's image server is on 127.0.0.1
    fetcher = ImageFetcher(ControllerSection(**lan, image_fetch_hosts=["127.0.0.1"]))
    anywhere = ImageFetcher(ControllerSection(**lan, image_fetch_hosts=["*"], image_fetch_max_bytes=1024))
    try:
        assert (await fetcher.fetch(url, "u")).data == PNG
        assert (await anywhere.fetch(url, "u")).data == PNG
        assert (await fetcher.fetch(f"{image_server}/large.png", "u")).data == LARGE  # read to its end
        for path in ("big.png", "large.png"):  # with and without a Content-Length
            with pytest.raises(ApiError) as exc:
                await anywhere.fetch(f"{image_server}/{path}", "u")
            assert "image_fetch_max_bytes" in exc.value.message
        with pytest.raises(ApiError) as exc:  # an allowed host's redirect is not followed (to any host)
            await fetcher.fetch(f"{image_server}/moved.png", "messages[0].content[0].image_url.url")
        assert status_of(exc)[:2] == (400, "messages[0].content[0].image_url.url")
        assert "redirect (HTTP 302)" in exc.value.message
        with pytest.raises(ApiError) as exc:
            await fetcher.fetch(f"{image_server}/missing.png", "u")
        assert "HTTP 404" in exc.value.message
        with pytest.raises(ApiError) as exc:
            await fetcher.fetch(f"http://127.0.0.1:{free_port()}/a.png", "u")
        assert "could not be fetched" in exc.value.message
    finally:
        await fetcher.close()
        await anywhere.close()
    await fetcher.close()  # closed already: nothing to do


async def test_addresses_that_are_not_public_are_refused_by_default(image_server: str) -> None:
    """A literal loopback address, and a name that resolves to one, whatever the allowed hosts say; allowed with
    ``image_fetch_private``. (The server is there: the refusal is not a failed connection.)"""
    port = image_server.rsplit(":", 1)[1]
    public_only = ImageFetcher(ControllerSection(image_fetch=True, image_fetch_hosts=["*"]))
    lan = ImageFetcher(ControllerSection(image_fetch=True, image_fetch_hosts=["*"], image_fetch_private=True))
    try:
        for host, why in (("127.0.0.1", "'127.0.0.1' is not a public address"), ("localhost", "resolves to")):
            with pytest.raises(ApiError) as exc:
                await public_only.fetch(f"http://{host}:{port}/a.png", "messages[0].content[1].image_url.url")
            assert status_of(exc)[:2] == (400, "messages[0].content[1].image_url.url")
            assert why in exc.value.message and "image_fetch_private is off" in exc.value.message
        assert (await lan.fetch(f"http://localhost:{port}/a.png", "u")).data == PNG
    finally:
        await public_only.close()
        await lan.close()


def test_only_global_unicast_addresses_are_public() -> None:
    refused = ["127.0.0.1", "10.1.2.3", "192.168.0.9", "172.16.5.4", "169.254.169.254", "100.64.0.1", "0.0.0.0"]
    refused += ["::1", "fe80::1%eth0", "fd00::1", "::ffff:127.0.0.1", "224.0.0.1", "not-an-address"]
    assert [a for a in refused if is_public(a)] == []
    assert all(is_public(a) for a in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"))
    check_literal("images.example.org")  # a name: the resolver judges its addresses
    check_literal("8.8.8.8")
    with pytest.raises(NotPublicAddress, match="'10.0.0.1' is not a public address"):
        check_literal("10.0.0.1")


async def test_the_resolver_passes_public_names_and_refuses_mixed_ones() -> None:
    class Fixed(AbstractResolver):  # stands in for DNS, which this machine may not have
        def __init__(self, addresses: list[str]) -> None:
            self.addresses = addresses
            self.closed = False

        async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[Any]:
            return [
                {"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
                for a in self.addresses
            ]

        async def close(self) -> None:
            self.closed = True

    public = PublicAddressResolver(Fixed(["93.184.215.14"]))
    assert [r["host"] for r in await public.resolve("images.example.org", 80)] == ["93.184.215.14"]
    mixed = PublicAddressResolver(Fixed(["93.184.215.14", "10.0.0.7"]))
    with pytest.raises(NotPublicAddress, match="'rebound.example.org' resolves to 10.0.0.7"):
        await mixed.resolve("rebound.example.org", 80)
    await mixed.close()
    assert mixed.inner.closed  # type: ignore[attr-defined]


async def test_a_text_only_model_keeps_the_400_through_the_api(cluster_config: Config, nats_server) -> None:
    async with single_worker_cluster(cluster_config) as cluster:
        client = cluster.controller.client()
        with pytest.raises(openai.BadRequestError) as exc:
            await client.chat.completions.create(
                model="echo",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]}],
            )
        assert exc.value.body["code"] == "unsupported_content"
        assert exc.value.body["param"] == "messages[0].content[0].image_url.url"
        models = await client.models.list()
        assert [(m.id, m.model_extra["vision"]) for m in models.data] == [("echo", False)]


def big_request(size: int = 20_000) -> InferenceRequest:
    return InferenceRequest(
        request_id="req-1",
        model="eyes",
        messages=[ChatMessage(role="user", content="What?", images=2)],
        images=[
            ImageInput(media_type="image/png", data=PNG + bytes(size)),
            ImageInput(media_type="image/png", data=PNG),
        ],
    )


async def test_without_jetstream_images_stay_inline_for_the_413(bus: Bus, cluster_config: Config) -> None:
    dispatcher = Dispatcher(
        bus=bus,
        registry=WorkerRegistry(cluster_config),
        balancer=None,  # type: ignore[arg-type]
        config=cluster_config.controller,
        inbox=StreamInbox(bus, "c1"),
    )
    request = big_request(bus.max_payload)
    async with parked_images(ImageStore(bus), bus.max_payload, request):
        assert request.images is not None and request.images[0].data.startswith(PNG)
        assert request.images[0].object is None
        with pytest.raises(ApiError) as exc:
            dispatcher.check_size(request)
        assert status_of(exc) == (413, None, "payload_too_large")
    async with parked_images(None, 16384, request):
        assert request.images[0].data.startswith(PNG)


class FailingBucket(ObjectBucket):
    """A bucket whose ``put`` of ``fail_at`` fails (a store that is full or stops answering)."""

    def __init__(self, fail_at: str, error: Exception) -> None:
        self.fail_at, self.error = fail_at, error
        self.stored: dict[str, bytes] = {}

    async def put(self, name: str, data: bytes) -> None:
        if name == self.fail_at:
            raise self.error
        self.stored[name] = data

    async def delete(self, name: str) -> None:
        if name == "cannot-delete":
            raise nats.errors.TimeoutError
        del self.stored[name]


class StoreOver(ImageStore):
    """An image store over a given bucket."""

    def __init__(self, bucket: ObjectBucket) -> None:
        self._given = bucket

    async def bucket(self) -> ObjectBucket:
        return self._given


@pytest.mark.parametrize("error", [nats.errors.TimeoutError(), nats.js.errors.APIError(description="full")])
async def test_a_store_failing_mid_park_is_a_503_and_drops_what_was_parked(error: Exception) -> None:
    bucket = FailingBucket("req-1-1", error)
    with pytest.raises(ApiError) as exc:
        async with parked_images(StoreOver(bucket), 16384, big_request()):
            raise AssertionError("the request must not run")
    assert status_of(exc) == (503, None, "images_unavailable") and exc.value.retry_after is not None
    assert bucket.stored == {}  # the first image, parked before the failure, is deleted
    bucket.stored = {"a": b"", "b": b""}
    await StoreOver(bucket).drop(["a", "cannot-delete", "b"])  # one failing delete does not stop the others
    assert bucket.stored == {}


async def test_a_worker_without_jetstream_cannot_read_parked_images(bus: Bus) -> None:
    request = big_request()
    assert request.images is not None
    request.images[0].object, request.images[0].data = "req-1-0", b""
    with pytest.raises(ImagesUnavailable, match="cannot be read"):
        await ImageStore(bus).fetch(request)


async def test_images_too_large_for_a_message_are_parked_and_fetched(tmp_path: Path) -> None:
    config = shared_config(str(tmp_path), controller={"shared_state": False})
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    try:
        controller_bus = await Bus.connect(config.nats, name="test-controller", attempts=5)
        worker_bus = await Bus.connect(config.nats, name="test-worker", attempts=5)
        store, worker_store = ImageStore(controller_bus), ImageStore(worker_bus)
        request = big_request()
        small = big_request(0)
        async with parked_images(store, len(encode(small)) + SUBJECT_HEADROOM + 1, small):
            assert small.images is not None and all(image.object is None for image in small.images)  # fits: inline
        async with parked_images(store, 16384, request):
            assert request.images is not None
            assert [image.object for image in request.images] == ["req-1-0", "req-1-1"]
            assert len(encode(request)) < 1024
            received = msgspec.json.decode(encode(request), type=InferenceRequest)
            await worker_store.fetch(received)
            assert received.images is not None
            assert [image.data for image in received.images] == [PNG + bytes(20_000), PNG]
            assert received.images[0].object is None
            await worker_store.fetch(received)  # nothing parked any more: nothing to do
        again = msgspec.json.decode(encode(request), type=InferenceRequest)
        with pytest.raises(ImageMissing, match="req-1-0"):  # deleted when the request ended
            await worker_store.fetch(again)
        await controller_bus.close()
        await worker_bus.close()
    finally:
        await server.stop()
