"""Vision models through mlx-vlm (the ``vision`` extra): a tiny random-weight Qwen2-VL built offline.

The engine alone (an image changes the greedy output, a bad image is refused, usage counts image tokens, the
prompt cache serves a next turn, what it does not do is refused), then the cluster: the official ``openai``
client with an image in a chat message (plain and streamed), Anthropic and Responses images, ``/v1/models``.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from cluster_harness import Cluster
from loopback import shared_config
from vision_model import IN_TURN_TEMPLATE, build_vision_model, data_url, png_bytes

from mlxcluster.config import Config
from mlxcluster.embedded import EmbeddedNatsServer
from mlxcluster.errors import NodeError
from mlxcluster.protocol import (
    CatalogueModel,
    ChatMessage,
    Done,
    Error,
    ImageInput,
    InferenceRequest,
    SamplingParams,
    Token,
    ToolSpec,
)
from mlxcluster.worker.catalogue import CatalogueEntry, model_facts
from mlxcluster.worker.memory_budget import MemoryBudget
from mlxcluster.worker.vision import EXTRA_HINT, import_mlx_vlm, is_vision_model
from mlxcluster.worker.worker_role import engine_factory

pytest.importorskip("mlx_vlm", reason="the vision extra (mlx-vlm) is not installed")

from mlxcluster.worker.vision_engine import (  # noqa: E402
    VisionEngine,
    VisionRefused,
    _MlxThread,
    _Output,
    decode_images,
)

NAME = "tiny-vl"


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_model(tmp_path_factory.mktemp("models") / NAME)


@pytest.fixture
async def engine(vision_model: Path) -> AsyncIterator[VisionEngine]:
    engine = VisionEngine(str(vision_model), served_name=NAME)
    await engine.start()
    yield engine
    await engine.stop()


def ask(text: str, *images: bytes, **fields: object) -> InferenceRequest:
    return InferenceRequest(
        request_id="r",
        model=NAME,
        messages=[ChatMessage(role="user", content=text, images=len(images))],
        images=[ImageInput(media_type="image/png", data=image) for image in images] or None,
        sampling=SamplingParams(temperature=0.0),
        **{"max_tokens": 8, "seed": 7, **fields},  # type: ignore[arg-type]
    )


async def run(engine: VisionEngine, request: InferenceRequest) -> tuple[str, Done | Error]:
    frames = [frame async for frame in engine.generate(request)]
    end = frames[-1]
    assert isinstance(end, Done | Error)
    return "".join(frame.text for frame in frames if isinstance(frame, Token)), end


async def test_an_image_changes_the_greedy_output(engine: VisionEngine) -> None:
    first, done = await run(engine, ask("What is this?", png_bytes(0)))
    again, _ = await run(engine, ask("What is this?", png_bytes(0)))
    other, _ = await run(engine, ask("What is this?", png_bytes(1)))
    assert first and first == again
    assert other != first
    assert isinstance(done, Done)
    assert done.usage.image_tokens == 4 and done.usage.prompt_tokens > done.usage.image_tokens
    assert done.usage.completion_tokens == 8 and done.finish_reason == "length"


async def test_bad_images_and_what_the_engine_does_not_do_are_refused(engine: VisionEngine) -> None:
    _, end = await run(engine, ask("What?", png_bytes(0)[:60]))
    assert isinstance(end, Error) and end.code == "invalid_request" and end.param == "messages"
    assert "image 1 of the request could not be decoded" in end.message
    tool = ToolSpec(name="f", parameters={"type": "object"})
    for request, param in (
        (ask("What?", tools=[tool]), "tools"),
        (ask("What?", logprobs=True), "logprobs"),
        (InferenceRequest(request_id="r", model=NAME, prompt="Once"), "prompt"),
        (ask("What?", continuation="already said"), None),
    ):
        _, end = await run(engine, request)
        assert isinstance(end, Error) and end.code == "invalid_request" and end.param == param, request


async def test_a_next_turn_reuses_the_prompt_cache_and_stop_strings_cut(engine: VisionEngine) -> None:
    first, done = await run(engine, ask("Hello there, tell me a story."))
    assert isinstance(done, Done) and done.usage.cached_tokens == 0
    follow = ask("Hello there, tell me a story.")
    assert follow.messages is not None
    follow.messages += [ChatMessage(role="assistant", content=first), ChatMessage(role="user", content="More.")]
    _, done = await run(engine, follow)
    assert isinstance(done, Done) and 0 < done.usage.cached_tokens < done.usage.prompt_tokens
    text, _ = await run(engine, ask("What is this?", png_bytes(0)))
    stop = text.strip()[2:5]
    cut, done = await run(engine, ask("What is this?", png_bytes(0), stop=[stop]))
    assert isinstance(done, Done) and done.stop_sequence == stop and done.finish_reason == "stop"
    assert cut == text[: text.index(stop)]


async def test_sampling_limits_cancel_and_deadline(engine: VisionEngine) -> None:
    sampled = ask("What?", png_bytes(2), max_tokens_auto=True)
    sampled.sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.1)
    first, done = await run(engine, sampled)
    again, _ = await run(engine, sampled)
    greedy, _ = await run(engine, ask("What?", png_bytes(2), max_tokens_auto=True))
    assert isinstance(done, Done) and first == again  # same seed, same sample
    assert first != greedy  # and a sample, not the greedy answer (the options reached the sampler)
    for penalty in ("presence_penalty", "frequency_penalty"):  # they reach mlx-vlm's logits processors
        penalised = ask("What is that?", png_bytes(1), max_tokens=16)
        penalised.sampling = SamplingParams(temperature=0.0, **{penalty: 2.0})  # type: ignore[arg-type]
        plain, _ = await run(engine, ask("What is that?", png_bytes(1), max_tokens=16))
        assert (await run(engine, penalised))[0] != plain, penalty
    _, end = await run(engine, ask("word " * 5000))
    assert isinstance(end, Error) and end.code == "context_length_exceeded" and end.param == "messages"
    _, end = await run(engine, ask("What?", png_bytes(0), deadline=1.0))
    assert isinstance(end, Error) and end.code == "deadline_exceeded"
    frames = engine.generate(ask("What?", png_bytes(0), max_tokens=64))
    assert isinstance(await anext(frames), Token)
    await frames.aclose()  # the consumer leaves: the engine stops at its next token and serves the next request
    text, done = await run(engine, ask("What is this?", png_bytes(0)))
    assert isinstance(done, Done) and done.usage.completion_tokens == 8


@pytest.fixture(scope="module")
def in_turn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images inside their turn (text after them), weights large enough that the image decides the output."""
    return build_vision_model(
        tmp_path_factory.mktemp("models") / "in-turn", chat_template=IN_TURN_TEMPLATE, text_scale=0.6
    )


async def test_the_prompt_cache_never_answers_from_another_requests_image(in_turn_model: Path) -> None:
    cached = VisionEngine(str(in_turn_model), served_name=NAME)
    plain = VisionEngine(str(in_turn_model), served_name=NAME, prompt_cache=False)
    await cached.start()
    await plain.start()
    try:
        await run(cached, ask("What is this?", png_bytes(0)))
        # the same tokens up to "What is th" (an image's tokens are the same for any image of its size)
        answer, done = await run(cached, ask("What is that?", png_bytes(1)))
        alone, _ = await run(plain, ask("What is that?", png_bytes(1)))
        first_image, _ = await run(plain, ask("What is that?", png_bytes(0)))
        assert answer == alone != first_image
        assert isinstance(done, Done) and done.usage.cached_tokens == 0
        follow = ask("What is that?", png_bytes(1))  # the same image's next turn keeps its cache
        assert follow.messages is not None
        follow.messages += [ChatMessage(role="assistant", content=answer), ChatMessage(role="user", content="More.")]
        _, done = await run(cached, follow)
        assert isinstance(done, Done) and done.usage.cached_tokens > done.usage.image_tokens > 0
    finally:
        await cached.stop()
        await plain.stop()


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is ``width``×``height`` and holds almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_an_image_over_the_pixel_cap_is_refused_before_it_is_decoded() -> None:
    request = ask("What?", png_bytes(0), png_header(9_000, 9_000))  # below Pillow's own limit
    with pytest.raises(VisionRefused, match=r"image 2 of the request is 9000×9000 pixels.*image_max_pixels"):
        decode_images(request)
    with pytest.raises(VisionRefused, match=r"image 1 of the request is too large .*worker.image_max_pixels"):
        decode_images(ask("What?", png_header(20_000, 20_000)))  # Pillow refuses it at open
    with pytest.raises(VisionRefused, match="image 1 .* more than worker.image_max_pixels \\(1000\\)"):
        decode_images(request, max_pixels=1000)
    assert [image.size for image in decode_images(ask("What?", png_bytes(0)))] == [(64, 64)]


def test_stop_strings_split_across_tokens_never_leak() -> None:
    frames: list[Token] = []
    output = _Output(ask("x", stop=["ab"]), frames.append)  # type: ignore[arg-type]
    assert not output.add("xa", 1)
    assert output.add("b", 2)
    output.flush()
    assert "".join(frame.text for frame in frames) == "x" and output.stopped == "ab"
    frames.clear()
    output = _Output(ask("x", stop=["ab"]), frames.append)  # type: ignore[arg-type]
    for piece, generated in (("xa", 1), ("c", 2), ("", 2), ("d", 3)):
        assert not output.add(piece, generated)
    output.flush()
    assert [(frame.text, frame.count) for frame in frames] == [("x", 1), ("ac", 1), ("d", 1)]
    assert output.stopped is None


async def test_a_failing_job_does_not_end_the_engines_thread() -> None:
    thread = _MlxThread()

    def fail() -> None:
        raise RuntimeError("no loop to emit to")

    thread.submit(fail)
    await thread.run(lambda: None)  # served after the failure
    await thread.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        thread.submit(lambda: None)


async def test_without_the_extra_a_vision_model_is_refused_at_load(
    vision_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert is_vision_model(vision_model) and model_facts(str(vision_model), NAME, "local").vision
    (tmp_path / "config.json").write_text("{not json")
    assert not is_vision_model(tmp_path) and not is_vision_model(tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)
    with pytest.raises(NodeError, match=EXTRA_HINT.replace("[", r"\[").replace("]", r"\]")):
        import_mlx_vlm()
    facts = CatalogueModel(name=NAME, vision=True)
    made = engine_factory(Config(), MemoryBudget(1 << 30))(
        CatalogueEntry(NAME, str(vision_model), str(vision_model), facts)
    )
    assert isinstance(made, VisionEngine) and made.info().vision and made.info().models == [NAME]
    engine = VisionEngine(str(vision_model))
    with pytest.raises(NodeError, match="mlx-vlm is not installed"):
        await engine.start()
    await engine.stop()
    _, end = await run(engine, ask("What?"))  # a stopped engine answers, never hangs
    assert isinstance(end, Error) and end.code == "generation_failed" and "stopped" in end.message


@pytest.fixture
async def vision_cluster(cluster_config: Config, nats_server, engine: VisionEngine) -> AsyncIterator[Cluster]:
    async with Cluster(cluster_config) as cluster:
        await cluster.start_worker("vision", engine=engine)  # type: ignore[arg-type]
        await cluster.start_worker("text")
        controller = await cluster.start_controller()
        await controller.wait_online("vision", "text")
        yield cluster


def image_message(image: bytes, text: str = "What is in this picture?") -> list[dict[str, object]]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_url(image)}}],
        }
    ]


async def test_the_openai_client_sends_an_image_in_a_chat_message(vision_cluster: Cluster) -> None:
    assert vision_cluster.controller is not None
    client = vision_cluster.controller.client()
    options: dict[str, object] = {"model": NAME, "max_tokens": 8, "temperature": 0, "seed": 7}
    first = await client.chat.completions.create(messages=image_message(png_bytes(0)), **options)  # type: ignore[call-overload]
    other = await client.chat.completions.create(messages=image_message(png_bytes(1)), **options)  # type: ignore[call-overload]
    assert first.choices[0].message.content and first.choices[0].message.content != other.choices[0].message.content
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.image_tokens == 4  # a field of the openai client's usage

    stream = await client.chat.completions.create(  # type: ignore[call-overload]
        messages=image_message(png_bytes(0)), stream=True, stream_options={"include_usage": True}, **options
    )
    pieces, usage = [], None
    async for chunk in stream:
        pieces += [choice.delta.content or "" for choice in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == first.choices[0].message.content
    assert usage is not None and usage.completion_tokens == first.usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as exc:  # not an image: the controller's 400
        await client.chat.completions.create(messages=image_message(b"plain text"), **options)  # type: ignore[call-overload]
    assert exc.value.body["param"] == "messages[0].content[1].image_url.url"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as exc:  # looks like one, does not decode: the worker's 400
        await client.chat.completions.create(messages=image_message(b"GIF89a but not really"), **options)  # type: ignore[call-overload]
    assert "image 1 of the request could not be decoded" in exc.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as exc:  # the text-only model beside it keeps its 400
        await client.chat.completions.create(messages=image_message(png_bytes(0)), model="echo")
    assert exc.value.body["code"] == "unsupported_content"  # type: ignore[index]
    models = {model.id: model.model_extra["vision"] for model in (await client.models.list()).data}  # type: ignore[index]
    assert models == {NAME: True, "echo": False}


async def test_anthropic_and_responses_images_reach_the_model(vision_cluster: Cluster) -> None:
    assert vision_cluster.controller is not None
    session = vision_cluster.controller.session()
    url = vision_cluster.controller.url
    encoded = data_url(png_bytes(0)).split(",", 1)[1]
    message = {
        "model": NAME,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": encoded}},
                ],
            }
        ],
    }
    async with session.post(f"{url}/v1/messages", json=message) as response:
        body = await response.json()
        assert response.status == 200, body
    chat = await vision_cluster.controller.client().chat.completions.create(
        model=NAME,
        messages=image_message(png_bytes(0)),
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert body["content"][0]["text"] == chat.choices[0].message.content
    responses = {
        "model": NAME,
        "max_output_tokens": 8,
        "temperature": 0,
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in this picture?"},
                    {"type": "input_image", "image_url": data_url(png_bytes(0))},
                ],
            }
        ],
    }
    async with session.post(f"{url}/v1/responses", json=responses) as response:
        body = await response.json()
        assert response.status == 200, body
    assert body["output"][0]["content"][0]["text"] == chat.choices[0].message.content


async def test_an_image_too_large_for_a_message_goes_through_the_object_store(
    tmp_path: Path, engine: VisionEngine
) -> None:
    direct, _ = await run(engine, ask("What is in this picture?", png_bytes(0)))
    config = shared_config(str(tmp_path), nats={"max_payload": 16384}, controller={"shared_state": False})
    assert len(data_url(png_bytes(0))) > 16384
    server = EmbeddedNatsServer(config.nats)
    await server.start()
    try:
        async with Cluster(config) as cluster:
            await cluster.start_worker("vision", engine=engine)  # type: ignore[arg-type]
            controller = await cluster.start_controller()
            await controller.wait_online("vision")
            answer = await controller.client().chat.completions.create(
                model=NAME,
                messages=image_message(png_bytes(0)),
                max_tokens=8,
                temperature=0,
                seed=7,  # type: ignore[arg-type]
            )
            assert answer.choices[0].message.content == direct
    finally:
        await server.stop()
