"""Prefix digests: compact names for the prefixes of a prompt, the same on every node.

A request's prompt is flattened to one canonical string (chat messages as ``role␟name␟content␞``, a
text prompt behind a marker) and cut into blocks of :data:`BLOCK_CHARS` characters. Digest *i* is a
64-bit hash of digest *i-1* and block *i*, so one digest names the whole prefix up to the end of its
block, and two prompts share digest *i* exactly when they share their first *i* blocks.

Workers publish the digests of what their prompt cache holds (the prompt plus the generated reply,
as the next turn of the conversation will resend it); the controller computes the digests of an
incoming request and finds, per worker, the longest prefix held. No tokenizer is needed on the
controller, and a digest is 8 bytes whatever the prompt's length. Text is the unit, not tokens, so a
match is an estimate of the tokens the worker will reuse: the worker's own cache decides the rest at
token level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

BLOCK_CHARS = 256
"""Characters per digest block (about 64 tokens of English text)."""
_SEED = b"mlxcluster-prefix-v1"
_UNIT = "\x1e"  # ends one message
_FIELD = "\x1f"  # separates role, name and content
_PROMPT = "\x1d"  # starts a plain-text prompt (never equal to a chat's canonical text)


class _Message(Protocol):
    role: str
    content: str
    name: str | None


def chat_text(messages: Iterable[_Message]) -> str:
    """The canonical string of chat messages."""
    return "".join(f"{m.role}{_FIELD}{m.name or ''}{_FIELD}{m.content}{_UNIT}" for m in messages)


def canonical_text(messages: Sequence[_Message] | None, prompt: str | None, reply: str | None = None) -> str:
    """The canonical string of a request's prompt; with ``reply``, as the next turn will resend it.

    For chat, ``reply`` becomes an assistant message; for a text prompt it is appended as is.
    """
    if messages is not None:
        text = chat_text(messages)
        if reply is not None:
            text += f"assistant{_FIELD}{_FIELD}{reply}{_UNIT}"
        return text
    return _PROMPT + (prompt or "") + (reply or "")


def prefix_digests(text: str, block_chars: int = BLOCK_CHARS, limit: int | None = None) -> list[int]:
    """Chained 64-bit digests of each complete ``block_chars`` block of ``text`` (at most ``limit``)."""
    count = len(text) // block_chars
    if limit is not None:
        count = min(count, limit)
    return PrefixHasher(block_chars).extend(text[: count * block_chars]).digests


def iter_prefix_digests(text: str, block_chars: int = BLOCK_CHARS) -> Iterator[int]:
    """The digests of :func:`prefix_digests`, one at a time: a lookup that stops at the first block nobody
    holds hashes only the blocks it needs."""
    previous = _SEED
    blake2b = hashlib.blake2b
    end = len(text) // block_chars * block_chars
    if text.isascii():  # one byte per character (known in O(1)): encode once, slice the bytes
        data = text.encode("ascii")
        for start in range(0, end, block_chars):
            previous = blake2b(previous + data[start : start + block_chars], digest_size=8).digest()
            yield int.from_bytes(previous, "big") >> 1
        return
    for start in range(0, end, block_chars):
        block = text[start : start + block_chars].encode("utf-8", "surrogatepass")
        previous = blake2b(previous + block, digest_size=8).digest()
        yield int.from_bytes(previous, "big") >> 1


class PrefixHasher:
    """The digests of a text fed in pieces: :func:`prefix_digests` of everything fed so far.

    A worker hashes a prompt's canonical text once, while it prepares the request, and extends a
    :meth:`copy` with the reply when the request ends, so only the reply's blocks are hashed then."""

    def __init__(self, block_chars: int = BLOCK_CHARS) -> None:
        self.block_chars = block_chars
        self.digests: list[int] = []
        self._previous = _SEED
        self._pending = ""

    def extend(self, text: str) -> PrefixHasher:
        """Feed more text; returns self."""
        pending = self._pending + text
        size = self.block_chars
        whole = len(pending) // size
        for i in range(whole):
            block = pending[i * size : (i + 1) * size].encode("utf-8", "surrogatepass")
            self._previous = hashlib.blake2b(self._previous + block, digest_size=8).digest()
            self.digests.append(int.from_bytes(self._previous, "big") >> 1)
        self._pending = pending[whole * size :]
        return self

    def copy(self) -> PrefixHasher:
        twin = PrefixHasher(self.block_chars)
        twin.digests = list(self.digests)
        twin._previous = self._previous
        twin._pending = self._pending
        return twin


def reply_hasher(messages: Sequence[_Message] | None, prompt: str | None) -> tuple[PrefixHasher, list[int]]:
    """A hasher fed a request's canonical text up to where its reply goes (extend it with the reply, then
    :func:`close_reply`), and the digests of the conversation before the reply (what the next turn shares)."""
    if messages is not None:
        hasher = PrefixHasher().extend(chat_text(messages))
        before = list(hasher.digests)
        return hasher.extend(f"assistant{_FIELD}{_FIELD}"), before
    hasher = PrefixHasher().extend(_PROMPT + (prompt or ""))
    return hasher, list(hasher.digests)


def close_reply(hasher: PrefixHasher, messages: Sequence[_Message] | None, reply: str) -> list[int]:
    """The digests of ``canonical_text(messages, prompt, reply)`` from a :func:`reply_hasher` (consumed)."""
    return hasher.extend(reply + (_UNIT if messages is not None else "")).digests
