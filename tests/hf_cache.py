"""A Hugging Face hub cache built on disk the way huggingface_hub lays it out, so that resolving and pulling
a repo id can be tested with no network: ``<hub>/models--ORG--NAME/{blobs,snapshots/<commit>,refs/main}``,
each snapshot file a relative symlink to its blob (named by the content's sha256, as LFS files are); and a
"hub" that never answers, to hold a download in progress."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(hub: Path, repo_id: str, files: dict[str, bytes], *, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put ``files`` into the cache ``hub`` as ``repo_id`` at ``commit`` (``ref`` pointing at it); return the
    snapshot dir."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def model_files(weights_bytes: int = 4096) -> dict[str, bytes]:
    """What placement and the cache look at in an mlx-lm model: ``config.json`` and a float16 weights file of
    about ``weights_bytes`` (nothing here loads it)."""
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
    header = json.dumps({"w": {"dtype": "F16", "shape": [weights_bytes // 2], "data_offsets": [0, weights_bytes]}})
    weights = struct.pack("<Q", len(header)) + header.encode() + b"\0" * weights_bytes
    return {"config.json": json.dumps(config).encode(), "model.safetensors": weights, "tokenizer.json": b"{}"}


@contextlib.contextmanager
def hub_that_never_answers() -> Iterator[tuple[str, threading.Event]]:
    """An ``HF_ENDPOINT`` that accepts connections and never answers; the event is set on the first one."""
    server = socket.create_server(("127.0.0.1", 0))
    called = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            called.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", called
    finally:
        server.close()
        for conn in held:
            conn.close()
