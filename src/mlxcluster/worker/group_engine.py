"""The mlx engine of a worker group: rank 0 batches, the other ranks replay its batch in lock step.

Every rank holds one shard of the model, so every rank must run the same model call on the same
batch at the same time (the model's own collectives pair them up). Rank 0 is an ordinary
:class:`~mlxcluster.worker.engine.MlxEngine` whose ``BatchGenerator`` is wrapped in a
:class:`BroadcastGenerator`: each ``insert``/``remove`` it makes is recorded, and before each ``next()``
the recorded operations are broadcast (one small ``all_sum``, see
:mod:`~mlxcluster.worker.group_channel`). A :class:`GroupFollower` on every other rank replays them
on its own ``BatchGenerator``: same prompts, same uids, same sampling (samplers are rebuilt from their
parameters, keyed samplers with rank 0's seed, so every rank draws the same token), same steps.
Follower output is discarded; rank 0 alone detokenizes and streams. Idle for half a second, rank 0 lets the
followers doze off the ring (a ``DozeOp``) and wakes them over NATS when work comes
(:mod:`~mlxcluster.worker.group_wake`): waiting inside a collective, a follower polls its sockets at the cost
of a core. Without a wake sender (tests) an idle rank 0 broadcasts an empty operation list twice a second.

The prompt cache works as on a single worker: rank 0's cache decides (which entry a prompt starts
from, what is stored and dropped) and broadcasts each decision; every rank keeps its own shard of each
entry (:mod:`~mlxcluster.worker.group_cache`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxcluster.protocol import Error
from mlxcluster.worker.engine import MlxEngine
from mlxcluster.worker.group_cache import FollowerCache, MirroredPromptCache
from mlxcluster.worker.group_channel import Channel, GroupBroken
from mlxcluster.worker.group_ops import (
    DozeOp,
    DropOp,
    Formation,
    InsertOp,
    Op,
    RemoveOp,
    ResetOp,
    SamplerSpec,
    StepOp,
    StopOp,
    StoreOp,
    decoder,
    encoder,
)
from mlxcluster.worker.group_wake import WakeSender, WakeSignal
from mlxcluster.worker.job import Job
from mlxcluster.worker.placement import PlacementError
from mlxcluster.worker.rendezvous import HOSTFILE_PREFIX

log = logging.getLogger(__name__)

TICK_S = 0.5
"""Longest silence of an idle rank 0 on the ring."""
DOZE_CHECK_S = 1.0
"""A dozing follower looks this often whether the group broke meanwhile."""
LOAD_TIMEOUT_S = 600.0
"""Bound on joining the ring and loading a shard (the slowest member sets the pace)."""


# --- rank 0 -----------------------------------------------------------------------------------


class BroadcastGenerator:
    """A ``BatchGenerator`` whose every operation is replayed by the other ranks."""

    def __init__(
        self,
        inner: Any,
        channel: Channel,
        reset: ResetOp,
        eos_stops: Any,
        cache: Callable[[], Any] = lambda: None,
        waker: WakeSender | None = None,
    ) -> None:
        self._inner = inner
        self._channel = channel
        self._eos_stops = eos_stops
        self._cache = cache
        self._pending: list[Op] = [reset]
        self._last_sent = time.monotonic()
        self._waker = waker
        self.dozing: str | None = None
        """The doze the followers are in (None: they are on the ring)."""

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int] | None = None,
        caches: Any = None,
        all_tokens: Any = None,
        samplers: Any = None,
        logits_processors: Any = None,
        stop_sequences: Any = None,
    ) -> list[int]:
        return self.insert_segments(
            [[p] for p in prompts], max_tokens, caches, all_tokens, samplers, logits_processors, stop_sequences
        )

    def insert_segments(
        self,
        segments: list[list[list[int]]],
        max_tokens: list[int] | None = None,
        caches: Any = None,
        all_tokens: Any = None,
        samplers: Any = None,
        logits_processors: Any = None,
        stop_sequences: Any = None,
    ) -> list[int]:
        uses = [self._use_of(c) for c in caches] if caches else []
        if stop_sequences and any(s is not self._eos_stops for s in stop_sequences):
            raise ValueError("a worker group supports only the model's end-of-sequence stop tokens")
        count = len(segments)
        op = InsertOp(
            uids=[],
            segments=[[list(map(int, part)) for part in seq] for seq in segments],
            max_tokens=list(max_tokens) if max_tokens is not None else None,
            all_tokens=[list(t) for t in all_tokens] if all_tokens else None,
            samplers=[_sampler_spec(s) for s in (samplers or [None] * count)],
            penalties=[_penalty_spec(p) for p in (logits_processors or [[]] * count)],
            cache_keys=[u[0] if u else None for u in uses],
            cached=[u[1] if u else 0 for u in uses],
        )
        uids: list[int] = list(
            self._inner.insert_segments(
                segments, max_tokens, caches, all_tokens, samplers, logits_processors, stop_sequences
            )
        )
        op.uids = uids
        self._pending.append(op)
        return uids

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> Any:
        result = self._inner.remove(uids, return_prompt_caches)
        self._pending.append(RemoveOp(uids=list(uids), keep_caches=bool(return_prompt_caches)))
        return result

    def record(self, op: Op) -> None:
        """Queue a prompt-cache decision for the followers (in order with the batch operations)."""
        self._pending.append(op)

    def _use_of(self, cache: Any) -> tuple[list[int], int] | None:
        if cache is None:
            return None
        prompt_cache = self._cache()
        use = prompt_cache.use_of(cache) if isinstance(prompt_cache, MirroredPromptCache) else None
        if use is None:
            raise ValueError("a worker group inserts only caches its prompt cache handed out")
        return use

    @property
    def prefill_step_size(self) -> int:
        return int(self._inner.prefill_step_size)

    @prefill_step_size.setter
    def prefill_step_size(self, tokens: int) -> None:
        self._inner.prefill_step_size = tokens

    def next(self) -> Any:
        self._send(StepOp(prefill_step_size=int(self._inner.prefill_step_size)))
        with self._channel.guarded("a model step"):
            return self._inner.next()

    def tick(self) -> None:
        """When idle: let the followers doze (with a waker), else tell them rank 0 is alive; either way hand
        them the pending operations."""
        if self.dozing is not None or time.monotonic() - self._last_sent < TICK_S:
            return
        try:
            if self._waker is None:
                self._send()
                return
            doze = uuid.uuid4().hex[:12]
            self._send(DozeOp(doze))
            self.dozing = doze
        except GroupBroken:
            pass

    def close(self) -> None:
        try:
            self._send(StopOp())
        except Exception:  # a broken group cannot hear it; nothing to do
            log.debug("could not tell the followers to stop", exc_info=True)
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _send(self, *extra: Op) -> None:
        ops, self._pending = [*self._pending, *extra], []
        doze, self.dozing = self.dozing, None
        if doze is not None and self._waker is not None:
            self._waker.start(doze)  # the followers rejoin the ring for this broadcast
        try:
            self._channel.broadcast(encoder.encode(ops))
        finally:
            if doze is not None and self._waker is not None:
                self._waker.stop(doze)
        self._last_sent = time.monotonic()


def _penalty_spec(processors: Any) -> float:
    """The repetition penalty a follower rebuilds; anything more (a grammar, presence / frequency
    penalties, a logit bias) cannot be replayed on the other ranks yet, so the request is refused."""
    from mlxcluster.worker.sampling import RequestProcessors

    if not processors:
        return 1.0
    if not isinstance(processors, RequestProcessors) or not processors.replayable:
        raise ValueError(
            "a worker group does not support constrained output (response_format, forced tool calls), "
            "presence/frequency penalties or logit_bias yet"
        )
    return processors.repetition_penalty


def _sampler_spec(sampler: Any) -> SamplerSpec | None:
    from mlx_lm.sample_utils import greedy_sampler

    from mlxcluster.worker.sampling import KeyedSampler
    from mlxcluster.worker.step_guard import GuardedSampler

    if isinstance(sampler, GuardedSampler):
        sampler = sampler.sampler
    if sampler is None or sampler is greedy_sampler:
        return None
    if isinstance(sampler, KeyedSampler):
        return SamplerSpec(sampler.temperature, sampler.top_p, sampler.top_k, sampler.min_p, sampler.seed)
    raise ValueError(f"a worker group cannot replay the sampler {type(sampler).__name__}")


class GroupEngine(MlxEngine):
    """Rank 0's engine: an :class:`MlxEngine` over its shard whose batch the other ranks replay.

    :param on_broken: called (from any thread) with the reason when the group breaks.
    """

    def __init__(
        self,
        model: str,
        *,
        formation: Formation,
        on_broken: Callable[[str], None],
        waker: WakeSender | None = None,
        **kwargs: Any,
    ) -> None:
        # the followers replay plain BatchGenerator steps: speculative steps are not broadcast (yet)
        super().__init__(model, **{**kwargs, "speculative_tokens": 0})
        self.formation = formation
        self.waker = waker
        """Wakes dozing followers (None: they never doze)."""
        self.channel = Channel(stall_timeout_s=formation.stall_timeout_s, on_broken=on_broken)

    def _make_prompt_cache(self) -> MirroredPromptCache:
        """The same cache, reporting its decisions to the followers."""
        return MirroredPromptCache(
            self._model_key(), self.prompt_cache_bytes, self._on_cache_change, record=self._record
        )

    def _checkpoints(self) -> bool:
        return False  # the followers replay finished sequences' caches only

    def _record(self, op: Op) -> None:
        assert self._loop is not None
        self._loop.generator.record(op)

    def _load_model(self) -> tuple[Any, Any, dict[str, Any]]:
        result = load_shard(self.model, self.formation, self.channel)
        self._details_group = f"rank 0 of {self.formation.size} ({self.formation.parallel}, {self.formation.backend})"
        return result

    def info(self):  # type: ignore[no-untyped-def]
        info = super().info()
        info.details["group"] = f"{self.formation.info.name}: {getattr(self, '_details_group', '')}"
        return info

    def _new_generator(self) -> Any:
        assert self._loop is not None
        reset = ResetOp(self.max_concurrent, self.prefill_batch_size, self.prefill_step_size)
        return BroadcastGenerator(
            super()._new_generator(),
            self.channel,
            reset,
            self._loop.eos_stops,
            lambda: self._prompt_cache,
            waker=self.waker,
        )

    def _on_turn(self) -> None:
        """Each turn of the generation loop: when it has nothing to do, the idle tick (a slow step between two
        busy turns is no idleness: the followers must not doze mid-request)."""
        loop = self._loop
        if loop is not None and loop.generator is not None and not loop.active and not loop.waiting:
            loop.generator.tick()

    def fail_in_flight(self, message: str) -> int:
        """End every accepted request now with an explicit error (the generation thread may be stuck
        in a collective, so this does not wait for it); return how many were failed."""
        loop = self._loop
        if loop is None:
            return 0
        jobs = loop.jobs()
        while True:
            try:
                item = loop.inbox.get_nowait()
            except Exception:
                break
            if isinstance(item, Job):
                jobs.append(item)
        for job in jobs:  # retryable: before its first token elsewhere, after it moved mid-stream (migration)
            job.emit(Error(code="group_member_lost", message=message, retryable=True))
        return len(jobs)

    async def stop(self) -> None:
        await super().stop()
        self.channel.close()


# --- the other ranks --------------------------------------------------------------------------


class GroupFollower:
    """A non-zero rank: loads its shard, then replays rank 0's operations until rank 0 stops or the group breaks.

    Runs on its own thread; :attr:`ended` says why it stopped.
    """

    def __init__(
        self,
        model: str,
        *,
        formation: Formation,
        on_broken: Callable[[str], None],
        wake: WakeSignal | None = None,
    ) -> None:
        self.model_path = model
        self.formation = formation
        self.wake = wake if wake is not None else WakeSignal()
        """Where rank 0's wakes arrive while the follower dozes."""
        self.dozes = 0
        """Dozes so far (rank 0 went idle)."""
        self.channel = Channel(stall_timeout_s=formation.stall_timeout_s, on_broken=on_broken)
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.ended: str | None = None
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="mlx-group-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import mlx.core as mx

        stream = mx.default_stream(mx.default_device())
        with mx.stream(stream):
            try:
                model, tokenizer, config = load_shard(self.model_path, self.formation, self.channel)
            except BaseException as exc:
                self.load_error = exc
                self.loaded.set()
                return
            self.loaded.set()
            try:
                self.ended = self._follow(model, tokenizer, config, stream)
                self.channel.fail(self.ended)  # rank 0 left on purpose: wait for it at the rendezvous
            except GroupBroken as exc:
                self.ended = str(exc)
            except BaseException as exc:
                log.exception("the group follower failed")
                self.ended = f"follower failed: {exc}"
                self.channel.fail(self.ended)

    def _follow(self, model: Any, tokenizer: Any, config: dict[str, Any], stream: Any) -> str:
        from mlx_lm.generate import BatchGenerator, make_stop_sequences
        from mlx_lm.sample_utils import greedy_sampler

        from mlxcluster.protocol import SamplingParams
        from mlxcluster.worker.sampling import KeyedSampler, make_request_processors

        vocab = int(config.get("vocab_size") or len(tokenizer))
        eos = make_stop_sequences(tokenizer)  # type: ignore[no-untyped-call]
        cache = FollowerCache()
        generator: Any = None
        while True:
            for op in decoder.decode(self.channel.broadcast()):
                match op:
                    case ResetOp():
                        if generator is not None:
                            generator.close()
                        generator = BatchGenerator(
                            model,
                            completion_batch_size=op.completion_batch_size,
                            prefill_batch_size=op.prefill_batch_size,
                            prefill_step_size=op.prefill_step_size,
                            stream=stream,
                        )
                    case InsertOp():
                        samplers = [
                            greedy_sampler
                            if s is None
                            else KeyedSampler(
                                SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p),
                                s.seed,
                                vocab,
                            )
                            for s in op.samplers
                        ]
                        processors = [
                            make_request_processors(SamplingParams(repetition_penalty=p)) for p in op.penalties
                        ]
                        caches = [
                            cache.take(key, cached) if key is not None else None
                            for key, cached in zip(op.cache_keys, op.cached, strict=True)
                        ]
                        uids = generator.insert_segments(
                            op.segments,
                            op.max_tokens,
                            caches or None,
                            op.all_tokens,
                            samplers,
                            processors,
                            [eos] * len(samplers),
                        )
                        if list(uids) != op.uids:
                            raise GroupBroken(f"out of step with rank 0 (uids {uids} != {op.uids})")
                    case RemoveOp():
                        removed = generator.remove(op.uids, return_prompt_caches=op.keep_caches)
                        for prompt_cache, tokens in (removed or {}).values():
                            cache.finished(tokens, prompt_cache)
                    case StoreOp():
                        cache.store(op.tokens)
                    case DropOp():
                        cache.drop(op.tokens)
                    case StepOp():
                        if op.prefill_step_size > 0:
                            generator.prefill_step_size = op.prefill_step_size
                        self.steps += 1
                        cache.new_step()
                        try:
                            with self.channel.guarded("a model step"):
                                _, responses = generator.next()
                            for response in responses:
                                if response.finish_reason is not None:
                                    cache.finished(response.all_tokens, response.prompt_cache)
                        except GroupBroken:
                            raise
                        except Exception:  # rank 0 failed the same step and starts a fresh batch
                            log.exception("a replayed model step failed")
                    case StopOp():
                        if generator is not None:
                            generator.close()
                        return "rank 0 stopped"
                    case DozeOp():
                        self.dozes += 1
                        self._doze(op.doze)

    def _doze(self, doze: str) -> None:
        """Off the ring until rank 0's wake for ``doze`` (a broken group ends the wait)."""
        while not self.wake.wait(doze, DOZE_CHECK_S):
            if self.channel.broken is not None:
                raise GroupBroken(self.channel.broken)


# --- loading a shard --------------------------------------------------------------------------


def load_shard(model: str, formation: Formation, channel: Channel) -> tuple[Any, Any, dict[str, Any]]:
    """Join the ring (``mx.distributed.init`` with the formation's hostfile), then load this rank's shard."""
    import mlx.core as mx
    from mlx_lm.utils import sharded_load

    os.environ["MLX_RANK"] = str(formation.rank)
    if formation.backend == "jaccl":
        os.environ["MLX_IBV_DEVICES"] = formation.hostfile
        os.environ.setdefault("MLX_JACCL_COORDINATOR", _coordinator(formation))
    else:
        os.environ["MLX_HOSTFILE"] = formation.hostfile
    with channel.guarded("joining the group's ring", LOAD_TIMEOUT_S):
        group = mx.distributed.init(strict=True, backend=formation.backend)
    if group.size() != formation.size or group.rank() != formation.rank:
        raise PlacementError(
            f"mx.distributed formed a group of {group.size()} with us as rank {group.rank()}, "
            f"expected {formation.size} / {formation.rank}"
        )
    channel.attach(group)
    hostfile = Path(formation.hostfile)
    if hostfile.name.startswith(HOSTFILE_PREFIX):  # ours, read by now
        hostfile.unlink(missing_ok=True)
    log.info("joined group %s as rank %d of %d", formation.info.name, formation.rank, formation.size)
    pipeline = formation.parallel == "pipeline"
    try:
        with channel.guarded("loading this rank's shard", LOAD_TIMEOUT_S):
            return sharded_load(  # type: ignore[no-any-return]
                model,
                pipeline_group=group if pipeline else None,
                tensor_group=None if pipeline else group,
                return_config=True,
            )
    except (ValueError, FileNotFoundError) as exc:
        raise PlacementError(f"cannot shard {model} for {formation.parallel} parallelism: {exc}") from exc


def _coordinator(formation: Formation) -> str:
    """JACCL's coordinator: rank 0's ring address."""
    return formation.info.members[0].address if formation.info.members else ""
