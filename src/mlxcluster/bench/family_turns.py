"""``bench multiturn`` part f: the prompt cache on each model family, side by side with ``mlx_lm.server``.

Per family fixture (``tests/families.py``: Gemma 3's sliding window, Qwen3-Next's hybrid linear attention and
the plain-KV families), mlxcluster (controller + 1 worker) and ``mlx_lm.server`` are started on the same model
dir, with the same BLAS, and each answers the same greedy conversation, turn by turn, alternately: a system
prompt long enough to roll Gemma 3's 16-token window many times, short replies, every turn resending the
history. What is compared is the later turns' cached share: ``usage.prompt_tokens_details.cached_tokens`` over
prompt tokens, as each server reports it. Thinking is switched off (``chat_template_kwargs``, which both servers
take) where the template has the switch, so every reply is content that the next turn resends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from mlxcluster.bench.conversation import TurnSample, TurnSummary, build_conversations, summarize
from mlxcluster.bench.family_dirs import THINKING
from mlxcluster.bench.versus import WARM_UP_PROMPT, chat_turn, mlx_lm_server, mlxcluster_server, token_counter

OURS = "mlxcluster"
THEIRS = "mlx_lm.server"
CACHE_KINDS = {
    "gemma3": "sliding window (RotatingKVCache)",
    "qwen3_next": "hybrid (ArraysCache + KVCache)",
}
"""What is special about a fixture's cache; the others are plain KVCache."""


class FamilyCache(msgspec.Struct):
    """One family's conversation on both servers (``error`` when a server could not serve it)."""

    family: str
    cache: str
    ours: list[TurnSample] = []
    theirs: list[TurnSample] = []
    ours_summary: TurnSummary | None = None
    theirs_summary: TurnSummary | None = None
    error: str = ""

    @property
    def met(self) -> bool | None:
        """Ours cached at least mlx_lm.server's share of the later turns (None: not measured)."""
        if self.ours_summary is None or self.theirs_summary is None:
            return None
        return self.ours_summary.later_cached_fraction >= self.theirs_summary.later_cached_fraction


async def run_family(
    family: str, path: Path, *, turns: int, system_tokens: int, max_tokens: int, index: int = 0
) -> FamilyCache:
    """Both servers up on ``path``; one conversation each, turns sent to each alternately."""
    result = FamilyCache(family=family, cache=CACHE_KINDS.get(family, "KVCache"))
    extra: dict[str, Any] | None = {"chat_template_kwargs": {"enable_thinking": False}} if family in THINKING else None
    count = token_counter(str(path))
    samples: dict[str, list[TurnSample]] = {OURS: [], THEIRS: []}
    try:
        async with (
            mlxcluster_server(str(path), max_concurrent=2) as cluster,
            mlx_lm_server(str(path), decode_concurrency=2) as base,
        ):
            targets = [(OURS, cluster.base_url, path.name), (THEIRS, base, "default_model")]
            conversations = {server: build_conversations(1, system_tokens, count, first=index)[0] for server in samples}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                for _, url, model in targets:  # loads mlx_lm.server's model; nothing shared with the conversation
                    await chat_turn(session, url, model, [{"role": "user", "content": WARM_UP_PROMPT}], 2, extra)
                for turn in range(1, turns + 1):
                    for server, url, model in targets:
                        conversation = conversations[server]
                        reply, ttft, prompt, cached = await chat_turn(
                            session, url, model, conversation.request_messages(), max_tokens, extra
                        )
                        conversation.record(reply)
                        samples[server].append(TurnSample(index, turn, round(ttft, 1), prompt, cached))
    except Exception as exc:  # one family that a server cannot serve does not hide the others
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.ours, result.theirs = samples[OURS], samples[THEIRS]
    if not result.error:
        result.ours_summary, result.theirs_summary = summarize(result.ours), summarize(result.theirs)
    return result


async def run_family_turns(
    paths: dict[str, Path], *, turns: int, system_tokens: int, max_tokens: int
) -> list[FamilyCache]:
    """:func:`run_family` for each family in turn (each with its own processes)."""
    return [
        await run_family(family, path, turns=turns, system_tokens=system_tokens, max_tokens=max_tokens, index=i)
        for i, (family, path) in enumerate(paths.items())
    ]
