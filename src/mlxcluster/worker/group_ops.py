"""What rank 0 of a worker group broadcasts to the other ranks: batch and prompt-cache operations.

Encoded as one msgpack list per broadcast (see :mod:`~mlxcluster.worker.group_channel`); every rank
applies them in order, so every rank's ``BatchGenerator`` and prompt cache go through the same states.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from mlxcluster.protocol import GroupInfo


class SamplerSpec(msgspec.Struct, array_like=True):
    """A :class:`~mlxcluster.worker.sampling.KeyedSampler`'s parameters, seed included."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int


class ResetOp(msgspec.Struct, tag="reset", array_like=True):
    """Start a fresh BatchGenerator with these settings."""

    completion_batch_size: int
    prefill_batch_size: int
    prefill_step_size: int


class InsertOp(msgspec.Struct, tag="insert", array_like=True):
    """Insert sequences; ``cache_keys[i]`` names the prompt-cache entry sequence ``i`` starts from (trimmed to
    ``cached[i]`` tokens), ``None``: a fresh cache."""

    uids: list[int]
    segments: list[list[list[int]]]
    max_tokens: list[int] | None
    all_tokens: list[list[int]] | None
    samplers: list[SamplerSpec | None]
    """``None``: the greedy sampler."""
    penalties: list[float]
    cache_keys: list[list[int] | None] = []
    cached: list[int] = []


class RemoveOp(msgspec.Struct, tag="remove", array_like=True):
    uids: list[int]
    keep_caches: bool = False
    """Rank 0 took the removed sequences' KV caches (it may store them next)."""


class StoreOp(msgspec.Struct, tag="store", array_like=True):
    """Rank 0 stored the KV cache of exactly ``tokens`` (a sequence that finished in the last step or removal)."""

    tokens: list[int]


class DropOp(msgspec.Struct, tag="drop", array_like=True):
    """Rank 0's prompt cache dropped the entry of ``tokens`` (evicted, or a prefix of a newer entry)."""

    tokens: list[int]


class StepOp(msgspec.Struct, tag="step", array_like=True):
    """Call ``next()`` once, with this ``prefill_step_size`` (the step budget sizes each step's chunk; every
    rank must run the same model calls)."""

    prefill_step_size: int = 0
    """0: unchanged."""


class StopOp(msgspec.Struct, tag="stop", array_like=True):
    """Rank 0 is stopping."""


class DozeOp(msgspec.Struct, tag="doze", array_like=True):
    """Rank 0 is idle: leave the ring until the :class:`~mlxcluster.protocol.GroupWake` naming ``doze`` comes
    (:mod:`~mlxcluster.worker.group_wake`)."""

    doze: str


Op = ResetOp | InsertOp | RemoveOp | StepOp | StopOp | StoreOp | DropOp | DozeOp
encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(list[Op])


@dataclass(frozen=True, slots=True)
class Formation:
    """Where this process stands in a formed group."""

    rank: int
    size: int
    parallel: str
    backend: str
    hostfile: str
    info: GroupInfo
    stall_timeout_s: float
