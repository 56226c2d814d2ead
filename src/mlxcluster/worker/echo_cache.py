"""A SIMULATED prompt cache for the ``echo`` engine: no KV, only the bookkeeping a real cache reports.

It lets control-plane tests and benchmarks exercise cache-aware routing without a model. After each
request it remembers the prefix digests of the conversation as the next turn will resend it (the
prompt plus the echoed reply), up to ``max_entries`` conversations (LRU). A later request "hits" when a
remembered digest covers a prefix of its prompt; ``cached_tokens`` counts the prompt's words (the echo
engine's tokens) inside that prefix. Everything it reports is labelled simulated.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence

from mlxcluster.prefix_digest import BLOCK_CHARS, canonical_text, chat_text, prefix_digests
from mlxcluster.protocol import ChatMessage, InferenceRequest, PromptCacheStats
from mlxcluster.worker.engine_base import CacheListener


def covered_words(messages: Sequence[ChatMessage] | None, prompt: str | None, chars: int) -> int:
    """Words of the prompt's contents inside its first ``chars`` canonical characters."""
    if messages is None:
        return len((prompt or "")[: max(0, chars - 1)].split())  # the canonical text starts with one marker
    words = 0
    offset = 0
    for message in messages:
        unit = chat_text([message])
        start = offset + len(unit) - len(message.content) - 1  # the content sits before the unit's end mark
        if chars >= offset + len(unit):
            words += len(message.content.split())
        elif chars > start:
            words += len(message.content[: chars - start].split())
            break
        else:
            break
        offset += len(unit)
    return words


class SimulatedPromptCache:
    """Digests of the last ``max_entries`` conversations, with a real cache's statistics."""

    def __init__(self, max_entries: int, block_chars: int = BLOCK_CHARS) -> None:
        self.max_entries = max_entries
        self.block_chars = block_chars
        self._entries: OrderedDict[int, tuple[list[int], int]] = OrderedDict()  # last digest → (digests, chars)
        self._held: Counter[int] = Counter()  # digest → entries that contain it
        self._listener: CacheListener | None = None
        self._chars = 0
        self.hits = self.misses = self.hit_tokens = self.prompt_tokens = self.evictions = 0

    def set_listener(self, listener: CacheListener | None) -> None:
        self._listener = listener

    def lookup(self, request: InferenceRequest, prompt_tokens: int) -> int:
        """Cached "tokens" of ``request`` (counted as a hit or a miss); refreshes the entry it hits."""
        text = canonical_text(request.messages, request.prompt)
        depth = 0
        for i, digest in enumerate(prefix_digests(text, self.block_chars)):
            if digest not in self._held:
                break
            depth = i + 1
            if digest in self._entries:
                self._entries.move_to_end(digest)
        cached = min(prompt_tokens, covered_words(request.messages, request.prompt, depth * self.block_chars))
        self.prompt_tokens += prompt_tokens
        if cached:
            self.hits += 1
            self.hit_tokens += cached
        else:
            self.misses += 1
        return cached

    def store(self, request: InferenceRequest, reply: str) -> None:
        """Remember the conversation as its next turn will resend it; tell the listener what changed."""
        text = canonical_text(request.messages, request.prompt, reply=reply)
        digests = prefix_digests(text, self.block_chars)
        if not digests:
            return
        key = digests[-1]
        stored: list[int] = []
        removed: list[int] = []
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            stored = [d for d in digests if d not in self._held]
            self._entries[key] = (digests, len(text))
            self._chars += len(text)
            self._held.update(digests)
            while len(self._entries) > self.max_entries:
                _, (old, chars) = self._entries.popitem(last=False)
                self._chars -= chars
                self.evictions += 1
                self._held.subtract(old)
                for digest in old:
                    if self._held[digest] <= 0:
                        del self._held[digest]
                        removed.append(digest)
        listener = self._listener
        if listener is not None and (stored or removed):
            gone = set(removed)
            listener([d for d in stored if d not in gone], removed)

    def digests(self) -> list[int]:
        """Every digest held now."""
        return list(self._held)

    def stats(self) -> PromptCacheStats:
        """Hits and size; ``bytes`` counts the remembered characters (no KV exists)."""
        return PromptCacheStats(
            hits=self.hits,
            misses=self.misses,
            hit_tokens=self.hit_tokens,
            prompt_tokens=self.prompt_tokens,
            bytes=self._chars,
            limit_bytes=0,
            entries=len(self._entries),
            evictions=self.evictions,
        )
