"""The engine of vision models: mlx-vlm (the optional extra ``mlxcluster[vision]``), one request at a time.

A request's images (decoded with Pillow) and chat turns go through mlx-vlm's processor and chat template
(each turn's images before its text, as mlx-vlm places them for the model's family), then through its
``stream_generate`` on the engine's one MLX thread; tokens cross into asyncio with
``loop.call_soon_threadsafe``. The prompt cache is mlx-vlm's per-conversation one (``PromptCacheState``):
a next turn that extends the last request's tokens with text only reuses its KV cache, images included,
and usage reports those tokens as cached. mlx-vlm matches the cache by token ids alone, and an image's
placeholder tokens are the same for any two images of one size, so the cache also keeps the SHA-256 of the
images it holds: a request whose images do not start with those (in order) starts from a fresh cache, never
from another request's image. Usage's ``image_tokens`` counts the prompt tokens standing for images.
An image of more than ``worker.image_max_pixels`` pixels is refused before it is decoded (a decompression bomb).

Requests run one after another (no batching: a worker's other admitted requests wait on the thread; one whose
client left before its turn is skipped). What this engine does not do is refused with a 400 naming the field:
tools, ``response_format``, logprobs, ``logit_bias``, reasoning settings, and the continuation of a stream moved
from a lost worker. A crash of the engine's thread ends the request that caused it, not the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
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
from mlxcluster.worker.sampling import StopTextFilter
from mlxcluster.worker.vision import import_mlx_vlm

log = logging.getLogger(__name__)

Emit = Callable[[EngineFrame], None]

DEFAULT_IMAGE_MAX_PIXELS = 25_000_000
"""The default of ``worker.image_max_pixels`` (5000×5000; 75 MB once decoded to RGB)."""
STOP_JOIN_S = 30.0
"""How long :meth:`VisionEngine.stop` waits for the request running on the thread to end."""


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


def decode_images(request: InferenceRequest, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS) -> list[Any]:
    """The request's images as RGB Pillow images; :class:`VisionRefused` naming the one that does not decode
    or has more than ``max_pixels`` pixels (read from its header, before its pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for index, image in enumerate(request.images or []):
        try:
            with Image.open(io.BytesIO(image.data)) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise VisionRefused(
                        f"image {index + 1} of the request is {width}×{height} pixels, more than "
                        f"worker.image_max_pixels ({max_pixels})",
                        "messages",
                    )
                images.append(opened.convert("RGB"))
        except Image.DecompressionBombError as exc:
            raise VisionRefused(
                f"image {index + 1} of the request is too large ({exc}); the limit is worker.image_max_pixels "
                f"({max_pixels})",
                "messages",
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise VisionRefused(f"image {index + 1} of the request could not be decoded: {exc}", "messages") from None
    return images


def image_digests(request: InferenceRequest) -> list[bytes]:
    """The SHA-256 of each of the request's images, in order."""
    return [hashlib.sha256(image.data).digest() for image in request.images or []]


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
    :param image_max_pixels: the most pixels an image may have (``worker.image_max_pixels``).
    """

    def __init__(
        self,
        model: str,
        *,
        served_name: str | None = None,
        prompt_cache: bool = True,
        image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS,
    ) -> None:
        self.model_path = model
        self.model_name = served_name or default_served_name(model)
        self.prompt_cache = prompt_cache
        self.image_max_pixels = image_max_pixels
        self._thread = _MlxThread()
        self._model: Any = None
        self._processor: Any = None
        self._cache_state: Any = None
        self._cache_images: list[bytes] = []
        """The digests of the images whose KV the cache state holds, in order."""
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
        self._cache_images = []
        if not self.prompt_cache:
            return None
        from mlx_vlm.generate.common import PromptCacheState

        return PromptCacheState()

    def _cache_for(self, digests: list[bytes]) -> Any:
        """The cache state a request with images ``digests`` may use: the kept one when the images it holds
        are the first of the request's (in order), else a fresh one (token ids alone cannot tell images apart)."""
        if self._cache_state is not None and digests[: len(self._cache_images)] != self._cache_images:
            self._cache_state = self._new_cache_state()
        self._cache_images = digests
        return self._cache_state

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
        frames: asyncio.Queue[EngineFrame] = asyncio.Queue()
        cancel = threading.Event()

        def emit(frame: EngineFrame) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: no one waits for the frame
                loop.call_soon_threadsafe(frames.put_nowait, frame)

        started = time.perf_counter()
        try:
            self._thread.submit(lambda: self._run(request, emit, cancel, started))
        except RuntimeError as exc:  # the engine stopped
            yield Error(code="generation_failed", message=str(exc))
            return
        try:
            while True:
                frame = await frames.get()
                while isinstance(frame, Token) and not frames.empty():  # merge tokens that are ready together
                    following = frames.get_nowait()
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

        images = decode_images(request, self.image_max_pixels)
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
        if sampling.presence_penalty:
            options["presence_penalty"] = sampling.presence_penalty
        if sampling.frequency_penalty:
            options["frequency_penalty"] = sampling.frequency_penalty
        cache_state = self._cache_for(image_digests(request))
        if cache_state is not None:
            options["prompt_cache_state"] = cache_state
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
    text of the token before it), through a :class:`StopTextFilter` (a tail that may start a stop string is
    held back until the next piece tells)."""

    def __init__(self, request: InferenceRequest, emit: Emit) -> None:
        self.filter = StopTextFilter(request.stop)
        self.emit = emit
        self.counted = 0
        self.pending = Token(text="", count=0)

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self.filter.matched

    def add(self, piece: str, generated: int) -> bool:
        """Take one result's text; True once a stop string ended the output."""
        count = generated - self.counted
        self.counted = generated
        text, stopped = self.filter.feed(piece)
        if count > 0 and self.pending.text:  # a new token: the one before it is complete
            self._send()
        self.pending.text += text
        self.pending.count += count
        return stopped

    def flush(self) -> None:
        """Send what is held (the text of a stop string's prefix when no stop string followed)."""
        self.pending.text += self.filter.flush()
        if self.pending.text:
            self._send()

    def _send(self) -> None:
        pending, self.pending = self.pending, Token(text="", count=0)
        pending.count = max(pending.count, 1)
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
            try:
                job()
            except Exception:  # a job's failure must not end the thread: later requests wait on it
                log.exception("a job of the vision engine's thread failed")

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
        """End the thread once its jobs are done, and join it (at most :data:`STOP_JOIN_S`)."""
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join, STOP_JOIN_S)
            if self._thread.is_alive():
                log.warning("the vision engine's thread did not end within %.0f s", STOP_JOIN_S)
