"""Wire protocol: every message round-trips, unknown fields are ignored, garbage is a ProtocolError."""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import pytest

from mlxcluster.protocol import (
    AcceleratorStats,
    Accepted,
    Announce,
    Cancel,
    Capabilities,
    ChatMessage,
    ControllerHeartbeat,
    Deregister,
    Done,
    EmbedRequest,
    EmbedResult,
    Error,
    Frame,
    Hardware,
    InferenceRequest,
    ProtocolError,
    SamplingParams,
    SpeculationCounts,
    Timings,
    Token,
    Usage,
    WorkerHeartbeat,
    WorkerRegistration,
    decode,
    decode_frame,
    decode_frames,
    decoder_for,
    encode,
    encode_frames,
)
from mlxcluster.subjects import Subjects

REGISTRATION = WorkerRegistration(
    worker_id="mac-1",
    hostname="mac-studio",
    address="10.0.0.7",
    hardware=Hardware(chip="M2 Ultra", cpu_cores=24, memory_gb=192.0, accelerator="metal"),
    capabilities=Capabilities(
        max_concurrent=8, max_queue=64, models=["smollm2"], available_memory_gb=150.5, engine="mlx", version="0.1.0"
    ),
    started_at=1700000000.25,
)
HEARTBEAT = WorkerHeartbeat(
    worker_id="mac-1",
    status="degraded",
    active=3,
    queued=2,
    tokens_per_second=123.5,
    cpu_percent=55.0,
    rss_bytes=1 << 30,
    available_memory_gb=100.0,
    models_loaded=["smollm2", "other"],
    requests_total=10,
    tokens_total=1000,
    errors_total=1,
    sent_at=1700000001.5,
    speculation=SpeculationCounts(steps=12, drafted=48, accepted=30),
    accelerator=AcceleratorStats(
        mlx_active_bytes=2_415_919_104, mlx_cache_bytes=0, gpu_utilization=63.0, gpu_cores=38, source="ioreg"
    ),
)
CHAT_REQUEST = InferenceRequest(
    request_id="req-1",
    model="smollm2",
    messages=[ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi ☃", name="bob")],
    sampling=SamplingParams(temperature=0.0, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1),
    max_tokens=32,
    stop=["\n\n", "</s>"],
    seed=42,
    stream=False,
    session_id="s-1",
    deadline=1700000100.0,
)
PROMPT_REQUEST = InferenceRequest(request_id="req-2", model="m", prompt="Once upon a time")

MESSAGES: list[msgspec.Struct] = [
    REGISTRATION,
    WorkerRegistration(worker_id="minimal"),
    HEARTBEAT,
    WorkerHeartbeat(worker_id="minimal"),
    Deregister(worker_id="mac-1", reason="shutdown"),
    Announce(controller_id="ctl-1", started_at=1.5),
    ControllerHeartbeat(controller_id="ctl-1", address="0.0.0.0:8080", in_flight=3, stopping=True),
    CHAT_REQUEST,
    PROMPT_REQUEST,
    msgspec.structs.replace(
        CHAT_REQUEST, continuation="The capital", max_tokens=14, sampling=SamplingParams(seed_offset=2)
    ),
    Cancel(request_id="req-1", reason="client went away"),
    EmbedRequest(request_id="e-1", model="emb", texts=["a", "b"], dimensions=32, prompt_name="query"),
    EmbedRequest(request_id="e-2", model="emb", tokens=[[1, 2, 3]]),
    EmbedResult(worker_id="w1", vectors=[b"\x00\x00\x80?"], dimensions=1, prompt_tokens=3),
    EmbedResult(error=Error(code="invalid_request", message="too long", param="input")),
]
FRAMES: list[Frame] = [
    Accepted(worker_id="mac-1", queued=True),
    Token(text="Hello", count=2, seq=7),
    Token(text=""),
    Done(
        finish_reason="length",
        usage=Usage(prompt_tokens=5, completion_tokens=10, total_tokens=15),
        timings=Timings(queue_ms=1.0, ttft_ms=20.5, total_ms=100.0, tokens_per_second=99.0),
    ),
    Done(),
    Error(code="overloaded", message="queue full", retryable=True),
]
DECODE_TYPES: list[Any] = [
    WorkerRegistration,
    WorkerHeartbeat,
    Deregister,
    Announce,
    ControllerHeartbeat,
    InferenceRequest,
    Cancel,
    ChatMessage,
    Frame,
    EmbedRequest,
    EmbedResult,
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: msgspec.Struct) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    assert decode(data, type(message)) == message


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_frame_round_trip_through_union(frame: Frame) -> None:
    data = encode(frame)
    assert json.loads(data)["type"] == {Accepted: "accepted", Token: "token", Done: "done", Error: "error"}[type(frame)]
    decoded = decode_frame(data)
    assert type(decoded) is type(frame)
    assert decoded == frame


def test_frames_match_on_type() -> None:
    seen = []
    for data in (encode(f) for f in FRAMES):
        match decode_frame(data):
            case Accepted(worker_id=worker_id):
                seen.append(f"accepted:{worker_id}")
            case Token(text=text):
                seen.append(f"token:{text}")
            case Done(finish_reason=reason):
                seen.append(f"done:{reason}")
            case Error(code=code, retryable=retryable):
                seen.append(f"error:{code}:{retryable}")
    assert seen == ["accepted:mac-1", "token:Hello", "token:", "done:length", "done:stop", "error:overloaded:True"]


def test_frames_sent_together_travel_as_one_array() -> None:
    encoded = [encode(f) for f in FRAMES]
    assert encode_frames(encoded[:1]) == encoded[0]  # alone: the frame itself, as older nodes send it
    together = encode_frames(encoded)
    assert json.loads(together) == [json.loads(e) for e in encoded]
    assert decode_frames(together) == FRAMES
    assert decode_frames(encoded[1]) == [FRAMES[1]]
    for bad in (b"[]x", b'[{"type": "token"}]', b"[" + encode(WorkerHeartbeat(worker_id="w")) + b"]", b"[1, 2]"):
        with pytest.raises(ProtocolError):
            decode_frames(bad)


def test_defaults_are_omitted_on_the_wire() -> None:
    assert json.loads(encode(WorkerHeartbeat(worker_id="w"))) == {"worker_id": "w"}
    assert json.loads(encode(Token(text="x"))) == {"type": "token", "text": "x"}


def test_decoders_are_cached() -> None:
    assert decoder_for(WorkerHeartbeat) is decoder_for(WorkerHeartbeat)
    assert decoder_for(Frame) is decoder_for(Frame)


def test_unknown_fields_are_ignored() -> None:
    """A newer node may send fields this version does not know."""
    data = json.dumps(
        {"worker_id": "w", "active": 2, "gpu_temp_c": 70, "future": {"nested": [1, 2, {"x": None}]}}
    ).encode()
    assert decode(data, WorkerHeartbeat) == WorkerHeartbeat(worker_id="w", active=2)
    hw = {"worker_id": "w", "hardware": {"chip": "M4", "npu_tops": 38}, "capabilities": {"lora": True}}
    assert decode(json.dumps(hw).encode(), WorkerRegistration).hardware.chip == "M4"
    frame = decode_frame(b'{"type": "token", "text": "hi", "logprob": -0.5}')
    assert frame == Token(text="hi")
    request = decode(
        b'{"request_id": "r", "model": "m", "tools": [], "messages": [{"role": "user", "content": "x", "img": 1}]}',
        InferenceRequest,
    )
    assert request.messages == [ChatMessage(role="user", content="x")]


def test_missing_optional_fields_take_defaults() -> None:
    """An older node may omit fields added later."""
    request = decode(b'{"request_id": "r", "model": "m"}', InferenceRequest)
    assert request == InferenceRequest(request_id="r", model="m")
    assert request.max_tokens == 256 and request.stream is True and request.messages is None
    assert decode(b'{"worker_id": "w"}', WorkerHeartbeat).accelerator is None  # a worker older than it
    newer = b'{"worker_id": "w", "accelerator": {"gpu_utilization": 5, "npu_utilization": 9}}'
    assert decode(newer, WorkerHeartbeat).accelerator == AcceleratorStats(gpu_utilization=5.0)


@pytest.mark.parametrize(
    ("data", "message_type"),
    [
        (b"", WorkerHeartbeat),
        (b"not json", WorkerHeartbeat),
        (b"{", WorkerHeartbeat),
        (b"[1, 2]", WorkerHeartbeat),
        (b"null", WorkerHeartbeat),
        (b"{}", WorkerHeartbeat),
        (b'{"worker_id": 5}', WorkerHeartbeat),
        (b'{"worker_id": "w", "active": "three"}', WorkerHeartbeat),
        (b'{"worker_id": "w", "status": "sleeping"}', WorkerHeartbeat),
        (b'{"worker_id": "w", "tokens_per_second": 1e400}', WorkerHeartbeat),
        (b'{"worker_id": "w", "models_loaded": "m"}', WorkerHeartbeat),
        (b'{"worker_id": "w", "accelerator": {"gpu_cores": -1}}', WorkerHeartbeat),
        (b'{"worker_id": "w", "accelerator": {"gpu_utilization": "busy"}}', WorkerHeartbeat),
        (b'{"worker_id": "\xf0"}', WorkerHeartbeat),
        (b'{"request_id": "r"}', InferenceRequest),
        (b'{"request_id": "r", "model": "m", "messages": [{"content": "x"}]}', InferenceRequest),
        (b'{"request_id": "r", "model": "m", "stream": "yes"}', InferenceRequest),
        (b'{"worker_id": "w", "hardware": []}', WorkerRegistration),
        (b'{"reason": "x"}', Deregister),
        (b'{"controller_id": null}', Announce),
        (b'{"controller_id": "c", "in_flight": -1}', ControllerHeartbeat),
        (b'{"request_id": 1}', Cancel),
        (b"\x00\x01\x02", Frame),
        (b'{"text": "no tag"}', Frame),
        (b'{"type": "bogus", "text": "x"}', Frame),
        (b'{"type": 1}', Frame),
        (b'{"type": "token"}', Frame),
        (b'{"type": "done", "finish_reason": "bored"}', Frame),
        (b'{"type": "error", "code": "x"}', Frame),
        (b'{"type": "\xf0ken", "text": "x"}', Frame),
        (b"[" * 10_000, Frame),
    ],
)
def test_invalid_bytes_raise_protocol_error(data: bytes, message_type: Any) -> None:
    with pytest.raises(ProtocolError, match=r"^invalid "):
        decode(data, message_type)


def test_decode_frame_rejects_a_non_frame_message() -> None:
    with pytest.raises(ProtocolError):
        decode_frame(encode(HEARTBEAT))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """Delete, insert or overwrite a few bytes, biased towards JSON punctuation."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        pos = rng.randrange(len(buf) + 1)
        op = rng.randrange(3)
        if op == 0 and buf:
            del buf[min(pos, len(buf) - 1)]
        elif op == 1:
            buf.insert(pos, rng.choice(b'{}[]",:0123456789-eE.tfn\\u \xff\xf0\x80'))
        elif buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
    return bytes(buf)


def test_random_bytes_never_raise_anything_but_protocol_error() -> None:
    """Deterministic fuzz: random bytes and mutated valid messages for every decoder (bounded count)."""
    rng = random.Random(20240521)
    seeds = [encode(m) for m in MESSAGES] + [encode(f) for f in FRAMES]
    decoded_ok = rejected = 0
    for _ in range(5000):
        message_type = rng.choice(DECODE_TYPES)
        if rng.random() < 0.3:
            data = rng.randbytes(rng.randrange(64))
        else:
            data = _mutate(rng, rng.choice(seeds))
        try:
            decode(data, message_type)
        except ProtocolError:
            rejected += 1
        else:
            decoded_ok += 1
    assert rejected > 0 and decoded_ok > 0  # the fuzz exercised both paths


# --- subjects ---------------------------------------------------------------------------------


def _all_subjects(subjects: Subjects) -> list[str]:
    return [
        subjects.register,
        subjects.heartbeat,
        subjects.deregister,
        subjects.cache,
        subjects.announce,
        subjects.controller_heartbeat,
        subjects.controller_requests("c1"),
        subjects.worker_settings,
        subjects.inference("w1"),
        subjects.cancel("w1"),
        subjects.models("w1"),
        subjects.embed("w1"),
        subjects.group("big"),
        subjects.group_wake("big"),
        subjects.response("c1", "req-1.1"),
        subjects.responses("c1"),
        subjects.usage("k1"),
        subjects.usage_all,
        subjects.all,
    ]


@pytest.mark.parametrize("prefix", ["mlxcluster", "prod.eu-1", "t_9"])
def test_prefix_applies_to_every_subject(prefix: str) -> None:
    subjects = _all_subjects(Subjects(prefix))
    assert all(s.startswith(prefix + ".") for s in subjects)
    assert len(set(subjects)) == len(subjects)


def test_default_subjects() -> None:
    assert Subjects() == Subjects("mlxcluster")
    assert _all_subjects(Subjects()) == [
        "mlxcluster.worker.register",
        "mlxcluster.worker.heartbeat",
        "mlxcluster.worker.deregister",
        "mlxcluster.worker.cache",
        "mlxcluster.cluster.announce",
        "mlxcluster.cluster.controller",
        "mlxcluster.cluster.controller.c1.requests",
        "mlxcluster.cluster.worker_settings",
        "mlxcluster.worker.w1.inference",
        "mlxcluster.worker.w1.cancel",
        "mlxcluster.worker.w1.models",
        "mlxcluster.worker.w1.embed",
        "mlxcluster.group.big",
        "mlxcluster.group.big.wake",
        "mlxcluster.response.c1.req-1.1",
        "mlxcluster.response.c1.>",
        "mlxcluster.usage.k1",
        "mlxcluster.usage.>",
        "mlxcluster.>",
    ]


def test_every_subject_property_is_covered() -> None:
    """A subject added to Subjects must get the prefix too; this lists them all."""
    names = {n for n in dir(Subjects) if not n.startswith("_") and n != "prefix"}
    assert names == {
        "group",
        "group_wake",
        "controller_requests",
        "register",
        "heartbeat",
        "deregister",
        "cache",
        "announce",
        "controller_heartbeat",
        "worker_settings",
        "inference",
        "cancel",
        "models",
        "embed",
        "response",
        "responses",
        "usage",
        "usage_all",
        "all",
    }
