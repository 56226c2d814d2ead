"""The engine of vision models: mlx-vlm (the optional extra ``mlxcluster[vision]``), one request at a time.

A request's images (decoded with Pillow) and chat turns go through mlx-vlm's processor and chat template
(each turn's images before its text, as mlx-vlm places them for the model's family), then through its
``stream_generate`` on the engine's one MLX thread; tokens cross into asyncio with
``loop.call_soon_threadsafe``. The prompt cache is mlx-vlm's per-conversation one (``PromptCacheState``):
a next turn that extends the last request's tokens with text only reuses its KV cache, images included,
and usage reports those tokens as cached. Usage's ``image_tokens`` counts the prompt tokens standing for images.

Requests run one after another (no batching: a worker's other admitted requests wait on the thread; one whose
client left before its turn is skipped). What this engine does not do is refused with a 400 naming the field:
tools, ``response_format``, logprobs, ``logit_bias``, reasoning settings, and the continuation of a stream moved
from a lost worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from mlxcluster.protocol import Done, Error, InferenceRequest, Timings, Token, Usage
from mlxcluster.worker.engine import default_served_name
from mlxcluster.worker.engine_base import Engine, EngineFrame, EngineInfo
from mlxcluster.worker.vision import import_mlx_vlm

log = logging.getLogger(__name__)

Emit = Callable[[EngineFrame], None]


class VisionRefused(Exception):
    """A request this engine will not run: the message and the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def refusal(request: InferenceRequest) -> VisionRefused | None:
    """Why this engine will not run ``request`` (a field it does not honour), or ``None``."""
    refused = {
        "tools": request.tools is not None and request.tool_choice != "none",
        "response_format": request.response_format is not None and request.response_format.type != "text",
        "logprobs": request.logprobs,
        "logit_bias": bool(request.sampling.logit_bias),
        "reasoning": request.reasoning is not None,
    }
    for param, given in refused.items():
        if given:
            return VisionRefused(f"'{param}' is not supported with a vision model (mlx-vlm engine)", param)
    if request.continuation or request.said:
        return VisionRefused("a vision model's stream cannot continue on another worker")
    if request.messages is None:
        return VisionRefused("a vision model answers chat requests, not text completions", "prompt")
    return None


def decode_images(request: InferenceRequest) -> list[Any]:
    """The request's images as RGB Pillow images; :class:`VisionRefused` naming the one that does not decode."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for index, image in enumerate(request.images or []):
        try:
            with Image.open(io.BytesIO(image.data)) as opened:
                images.append(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise VisionRefused(f"image {index + 1} of the request could not be decoded: {exc}", "messages") from None
    return images


def chat_turns(request: InferenceRequest) -> list[dict[str, Any]]:
    """The request's turns as mlx-vlm takes them: a turn with images as content parts, the images first."""
    turns: list[dict[str, Any]] = []
    for message in request.messages or []:
        if message.images:
            parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(message.images)]
            turns.append({"role": message.role, "content": [*parts, {"type": "text", "text": message.content}]})
        else:
            turns.append({"role": message.role, "content": message.content})
    return turns


def _context_length(config: Any) -> int:
    """The model's context window from its (text) config, 0 when it does not say."""
    for owner in (getattr(config, "text_config", None), config):
        value = getattr(owner, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


class VisionEngine(Engine):
    """A vision model on mlx-vlm (see the module's docstring).

    :param model: the model dir.
    :param served_name: the served model name (default :func:`default_served_name` of ``model``).
    :param prompt_cache: keep the last conversation's KV cache for a next turn that extends it.
    """

    def __init__(self, model: str, *, served_name: str | None = None, prompt_cache: bool = True) -> None:
        self.model_path = model
        self.model_name = served_name or default_served_name(model)
        self.prompt_cache = prompt_cache
        self._thread = _MlxThread()
        self._model: Any = None
        self._processor: Any = None
        self._cache_state: Any = None
        self._context = 0
        self._image_token: int | None = None

    async def start(self) -> None:
        """Load the model on the engine's thread; a :class:`NodeError` naming the extra without mlx-vlm."""
        await self._thread.run(self._load)
        log.info("vision engine ready: model=%s (mlx-vlm)", self.model_name)

    def _load(self) -> None:
        import_mlx_vlm()
        from mlx_vlm import load

        self._model, self._processor = load(self.model_path)
        config = self._model.config
        self._context = _context_length(config)
        token = getattr(config, "image_token_id", None)
        self._image_token = token if isinstance(token, int) else getattr(config, "image_token_index", None)
        self._cache_state = self._new_cache_state()

    def _new_cache_state(self) -> Any:
        if not self.prompt_cache:
            return None
        from mlx_vlm.generate.common import PromptCacheState

        return PromptCacheState()

    async def stop(self) -> None:
        """Drop the model and end the thread (after the request running on it, if any)."""

        def release() -> None:
            self._model = self._processor = self._cache_state = None

        with contextlib.suppress(RuntimeError):  # stopped already
            await self._thread.run(release)
        await self._thread.stop()

    def info(self) -> EngineInfo:
        return EngineInfo(name="mlx-vlm", models=[self.model_name], details={"model": self.model_path}, vision=True)

    async def generate(self, request: InferenceRequest) -> AsyncGenerator[EngineFrame, None]:
        refused = refusal(request)
        if refused is not None:
            yield Error(code="invalid_request", message=str(refused), param=refused.param)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineFrame] = asyncio.Queue()
        cancel = threading.Event()

        def emit(frame: EngineFrame) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, frame)

        started = time.perf_counter()
        self._thread.submit(lambda: self._run(request, emit, cancel, started))
        try:
            while True:
                frame = await queue.get()
                while isinstance(frame, Token) and not queue.empty():  # merge tokens that are ready together
                    following = queue.get_nowait()
                    if not isinstance(following, Token):
                        yield frame
                        frame = following
                        break
                    frame = Token(text=frame.text + following.text, count=frame.count + following.count)
                yield frame
                if isinstance(frame, Done | Error):
                    return
        finally:
            cancel.set()

    # --- the engine's thread -------------------------------------------------------------------

    def _run(self, request: InferenceRequest, emit: Emit, cancel: threading.Event, started: float) -> None:
        if cancel.is_set():  # its client left while it waited for the thread
            return
        try:
            self._generate(request, emit, cancel, started)
        except VisionRefused as exc:
            emit(Error(code="invalid_request", message=str(exc), param=exc.param))
        except Exception as exc:  # a model or processor failure ends this request, not the worker
            log.exception("vision request %s failed", request.request_id)
            self._cache_state = self._new_cache_state()
            emit(Error(code="generation_failed", message=f"{type(exc).__name__}: {exc}"))

    def _inputs(self, request: InferenceRequest) -> tuple[Any, Any, Any, dict[str, Any], int]:
        """The prompt's ids, pixel values, mask, the model's other inputs and how many tokens are images."""
        import mlx.core as mx
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        images = decode_images(request)
        config = self._model.config
        prompt = apply_chat_template(
            self._processor,
            config,
            chat_turns(request),
            num_images=len(images),
            **(request.chat_template_kwargs or {}),
        )
        inputs = prepare_inputs(
            self._processor,
            images=images or None,
            prompts=prompt,
            image_token_index=getattr(config, "image_token_index", None),
            add_special_tokens=should_add_special_tokens(config.model_type, self._processor),
        )
        ids = inputs["input_ids"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        image_tokens = 0
        if self._image_token is not None:
            image_tokens = int(mx.sum(ids == self._image_token).tolist())  # type: ignore[arg-type]
        return ids, inputs.get("pixel_values"), inputs.get("attention_mask"), extra, image_tokens

    def _generate(self, request: InferenceRequest, emit: Emit, cancel: threading.Event, started: float) -> None:
        import mlx.core as mx
        from mlx_vlm import stream_generate

        ids, pixels, mask, extra, image_tokens = self._inputs(request)
        prompt_tokens = int(ids.shape[-1])
        max_tokens = request.max_tokens
        if self._context:
            room = self._context - prompt_tokens
            if room < 1:
                emit(
                    Error(
                        code="context_length_exceeded",
                        message=f"the prompt is {prompt_tokens} tokens; the model's context is {self._context}",
                        param="messages",
                    )
                )
                return
            if request.max_tokens_auto:
                max_tokens = min(max_tokens, room)
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampling = request.sampling
        options: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.top_k:
            options["top_k"] = sampling.top_k
        if sampling.min_p:
            options["min_p"] = sampling.min_p
        if sampling.repetition_penalty != 1.0:
            options["repetition_penalty"] = sampling.repetition_penalty
        if self._cache_state is not None:
            options["prompt_cache_state"] = self._cache_state
        results = stream_generate(
            self._model,
            self._processor,
            "",
            input_ids=ids,
            pixel_values=pixels,
            mask=mask,
            max_tokens=max_tokens,
            **extra,
            **options,
        )
        output = _Output(request, emit)
        first_at: float | None = None
        last: Any = None
        for result in results:
            last = result
            if cancel.is_set() or (request.deadline is not None and time.time() > request.deadline):
                break
            first_at = first_at or time.perf_counter()
            if output.add(result.text, result.generation_tokens):
                break
        if last is None:
            raise RuntimeError("mlx-vlm generated nothing")
        if output.stopped is not None or last.finish_reason is None:
            self._cache_state = self._new_cache_state()  # left mid-way: the kept cache no longer matches
        if output.stopped is None and last.finish_reason is None:
            if not cancel.is_set():
                emit(Error(code="deadline_exceeded", message="request deadline passed on the worker"))
            return
        output.flush()
        total_s = time.perf_counter() - started
        completion = last.generation_tokens
        emit(
            Done(
                finish_reason="stop" if output.stopped is not None or last.finish_reason == "stop" else "length",
                stop_sequence=output.stopped,
                usage=Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion,
                    total_tokens=prompt_tokens + completion,
                    cached_tokens=last.cached_tokens,
                    image_tokens=image_tokens,
                ),
                timings=Timings(
                    ttft_ms=((first_at or time.perf_counter()) - started) * 1000,
                    total_ms=total_s * 1000,
                    tokens_per_second=completion / total_s if total_s > 0 else 0.0,
                ),
            )
        )


class _Output:
    """Text pieces to Token frames: one frame per generated token (mlx-vlm's last result only finishes the
    text of the token before it), the request's stop strings cut where they start."""

    def __init__(self, request: InferenceRequest, emit: Emit) -> None:
        self.stops = [s for s in request.stop if s]
        self.emit = emit
        self.text = ""
        self.counted = 0
        self.pending: Token | None = None
        self.stopped: str | None = None

    def add(self, piece: str, generated: int) -> bool:
        """Take one result's text; True once a stop string ended the output."""
        count = generated - self.counted
        self.counted = generated
        if count == 0 and self.pending is not None:
            self.pending.text += piece
        else:
            self.flush()
            self.pending = Token(text=piece, count=max(count, 1))
        return self._check_stop()

    def _check_stop(self) -> bool:
        if not self.stops or self.pending is None:
            return False
        candidate = self.text + self.pending.text
        hits = [(candidate.find(stop, max(0, len(self.text) - len(stop))), stop) for stop in self.stops]
        found = [(at, stop) for at, stop in hits if at >= 0]
        if not found:
            return False
        at, stop = min(found)
        self.pending.text = candidate[:at][len(self.text) :]
        self.stopped = stop
        return True

    def flush(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None and (pending.text or not self.stopped):
            self.text += pending.text
            self.emit(pending)


class _MlxThread:
    """The one thread that runs the engine's MLX work, in the order submitted; joined at stop (MLX aborts the
    process when a thread that used it is still alive at exit, as a thread pool's idle worker is)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="mlx-vision", daemon=True)
        self._thread.start()
        self._stopped = False

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the thread after those submitted before it."""
        if self._stopped:
            raise RuntimeError("the engine's thread has stopped")
        self._jobs.put(job)

    async def run(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the thread and wait for it (its exception is raised here)."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()

        def job() -> None:
            try:
                function()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)

        self.submit(job)
        await asyncio.wrap_future(future)

    async def stop(self) -> None:
        """End the thread once its jobs are done, and join it."""
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
