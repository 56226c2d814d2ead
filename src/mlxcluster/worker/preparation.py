"""Request preparation, before a request reaches the generation thread.

Everything per request that is not a model step happens here, on a small thread pool: the checks that
name a bad field (sampling, ``logit_bias`` against the logits width, reasoning parameters against the
template), the thinking plan, the chat template and tokenization, the continuation of a moved stream,
the grammar (compiled once per schema, then copied), the room left in the context window, the prompt's
prefix digests and, for models whose cache cannot be trimmed, the checkpoint where the next turn's prompt
will diverge. The generation thread then only inserts, steps and emits (vLLM's engine is split the same
way: input processing, an engine core that schedules and steps, output processing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from mlxcluster.prefix_digest import PrefixHasher, reply_hasher
from mlxcluster.protocol import ChatMessage, InferenceRequest
from mlxcluster.worker.loaded_model import LoadedModel
from mlxcluster.worker.reasoning import ReasoningRefused, ThinkingPlan, ThinkTracker, plan_thinking

log = logging.getLogger(__name__)

LOGIT_BIAS_LIMIT = 100.0
CHECKPOINT_STAND_IN = "."
"""The answer and question a next turn is rendered with, to find where this turn's prompt and the next one part."""


class Rejected(Exception):
    """A request the engine will not run: ``code`` (``invalid_request``, ``context_length_exceeded``) and
    the field at fault (``param``), for the API's 4xx."""

    def __init__(self, message: str, *, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(eq=False)
class PreparedRequest:
    """A request ready for the batch."""

    request: InferenceRequest
    """The request as the template saw it (the thinking switch written into ``chat_template_kwargs``)."""
    prompt: list[int]
    """The prompt's token ids, a continuation's tokens at the end."""
    continued: int
    """Tokens at the end of ``prompt`` that continue the assistant's message (not prompt tokens in usage)."""
    max_tokens: int
    features: Any
    """The request's :class:`~mlxcluster.worker.features.RequestFeatures` (grammar processors, output shaping)."""
    thinking: ThinkingPlan
    in_reasoning: bool
    """The prompt ends inside a think block (the template opened it)."""
    checkpoint: int
    """Length of a prefix whose cache is kept while prefilling (the conversation before the generation
    prompt, which the next turn shares); 0: none."""
    checkpoint_digests: list[int]
    hasher: PrefixHasher
    """The canonical text's digests up to where the reply goes (extend a copy with the reply to store)."""


class RequestPreparer:
    """Prepares requests for one loaded model; thread-safe (the tokenizer and grammar compiler are).

    :param loaded: the model and its facts.
    :param features: the engine's :class:`~mlxcluster.worker.features.EngineFeatures`.
    :param checkpoints: keep checkpoint caches for models whose cache cannot be trimmed.
    :param thinking_budgets: reasoning tokens per effort (``low``, ``medium``, ``high``).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        features: Any,
        *,
        checkpoints: bool = True,
        thinking_budgets: dict[str, int] | None = None,
    ) -> None:
        self.loaded = loaded
        self.features = features
        self.checkpoints = checkpoints and not loaded.trimmable_cache
        self.thinking_budgets = thinking_budgets
        tokenizer = loaded.tokenizer
        self.think_start: tuple[int, ...] = tuple(getattr(tokenizer, "think_start_tokens", None) or ())
        self.think_end: tuple[int, ...] = tuple(getattr(tokenizer, "think_end_tokens", None) or ())

    def prepare(self, request: InferenceRequest) -> PreparedRequest:
        """The prepared request; raises :class:`Rejected` for a request the engine will not run."""
        from mlxcluster.worker.continuation import ContinuationError
        from mlxcluster.worker.grammar import GrammarError
        from mlxcluster.worker.sampling import validate_sampling

        problem = validate_sampling(request.sampling, request.max_tokens)
        if problem is not None:
            raise Rejected(problem)
        if request.images:
            raise Rejected(f"model {request.model!r} takes only text (it is not a vision model)", param="messages")
        self._check_logit_bias(request)
        loaded = self.loaded
        try:
            plan = plan_thinking(
                request,
                thinking=loaded.thinking,
                switch=loaded.thinking_switch,
                max_tokens=request.max_tokens,
                budgets=self.thinking_budgets,
            )
        except ReasoningRefused as exc:
            raise Rejected(str(exc), param=exc.param) from None
        if plan.enable_thinking is not None and request.messages is not None:
            kwargs = {**(request.chat_template_kwargs or {}), "enable_thinking": plan.enable_thinking}
            request = msgspec.structs.replace(request, chat_template_kwargs=kwargs)
        try:
            prompt = list(self.features.prompt(request))
            if not prompt:
                raise Rejected("the prompt is empty")
            said, continued = self.features.continuation(request, prompt)
            features = self.features.prepare(request, prompt, continued=(said, continued))
        except Rejected:
            raise
        except ContinuationError as exc:  # a moved stream that cannot go on here: it ends, it does not move
            raise Rejected(str(exc), code="cannot_continue") from None
        except GrammarError as exc:  # an unsupported schema, tool choice or strict tool
            raise Rejected(str(exc), param=exc.param) from None
        except Exception as exc:  # template or tokenizer errors are the request's fault
            raise Rejected(f"cannot build the prompt: {exc}") from None
        prompt = prompt + list(continued)
        plan = self._budget_left(request, plan)
        max_tokens = self._max_tokens(request, len(prompt))
        hasher, before = reply_hasher(request.messages, request.prompt)
        checkpoint = self._checkpoint(request, prompt) if not continued else 0
        return PreparedRequest(
            request=request,
            prompt=prompt,
            continued=len(continued),
            max_tokens=max_tokens,
            features=features,
            thinking=plan,
            in_reasoning=self._in_reasoning(prompt),
            checkpoint=checkpoint,
            checkpoint_digests=before if checkpoint else [],
            hasher=hasher,
        )

    def think_tracker(self, prepared: PreparedRequest) -> ThinkTracker | None:
        """A fresh tracker of think blocks for ``prepared``'s generated tokens (None: no think markers)."""
        if not self.think_start or not self.think_end:
            return None
        return ThinkTracker(self.think_start, self.think_end, inside=prepared.in_reasoning)

    def _budget_left(self, request: InferenceRequest, plan: ThinkingPlan) -> ThinkingPlan:
        """A moved stream's thinking budget less the reasoning earlier workers already spent."""
        if plan.budget is None or not request.said:
            return plan
        thought = "".join(part.text for part in request.said if part.kind == "reasoning")
        spent = len(self.loaded.tokenizer.encode(thought, add_special_tokens=False)) if thought else 0
        return ThinkingPlan(plan.enable_thinking, max(0, plan.budget - spent))

    # --- checks ---------------------------------------------------------------------------------

    def _check_logit_bias(self, request: InferenceRequest) -> None:
        bias = request.sampling.logit_bias
        if not bias:
            return
        width = self.loaded.vocab_size
        for token, value in bias.items():
            if not 0 <= token < width:
                raise Rejected(
                    f"logit_bias names token {token}, outside this model's vocabulary (ids 0 to {width - 1})",
                    param="logit_bias",
                )
            if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
                raise Rejected(f"logit_bias values must be within -100..100 (got {value})", param="logit_bias")

    def _max_tokens(self, request: InferenceRequest, prompt_tokens: int) -> int:
        """``max_tokens``, or the room the context window leaves when the client gave none."""
        window = self.loaded.context_window
        room = window - prompt_tokens if window else None
        if request.max_tokens_auto and room is not None:
            if room >= 1:
                return min(request.max_tokens, room)
        elif room is None or prompt_tokens + request.max_tokens <= window:
            return request.max_tokens
        asked = "" if request.max_tokens_auto else f" and max_tokens asks for {request.max_tokens} more"
        raise Rejected(
            f"This model's context window is {window} tokens; the prompt has {prompt_tokens} tokens{asked}. "
            "Shorten the prompt" + ("" if request.max_tokens_auto else " or lower max_tokens") + ".",
            code="context_length_exceeded",
            param="messages" if request.messages is not None else "prompt",
        )

    # --- prompt ---------------------------------------------------------------------------------

    def _in_reasoning(self, prompt: list[int]) -> bool:
        """Whether the prompt ends inside a think block (the template, or a continuation, opened it)."""
        if not self.think_start or not self.think_end:
            return False
        tokenizer = self.loaded.tokenizer
        start = max(0, len(prompt) - 64)
        opened = int(tokenizer.rfind_think_start(prompt, start=start))
        closed = int(tokenizer.rfind_think_end(prompt, start=start))
        return opened >= 0 and opened > closed

    def _checkpoint(self, request: InferenceRequest, prompt: list[int]) -> int:
        """Where to keep a cache while prefilling (0: nowhere): the end of what the next turn will resend.

        The next turn renders this conversation, the assistant's answer and a new question, so the prefix this
        prompt shares with that conversation rendered with stand-ins is what a cache kept there will serve (the
        generation prompt, or the part of it a template writes again around a past answer, included)."""
        if not self.checkpoints or request.messages is None:
            return 0
        answer = ChatMessage(role="assistant", content=CHECKPOINT_STAND_IN)
        question = ChatMessage(role="user", content=CHECKPOINT_STAND_IN)  # the answer is history then
        try:
            later = self.features.prompt(
                msgspec.structs.replace(request, messages=[*request.messages, answer, question])
            )
        except Exception:  # a template that refuses the shape: no checkpoint
            log.debug("cannot render the next turn of %s", request.request_id, exc_info=True)
            return 0
        shared = 0
        for mine, theirs in zip(prompt, later, strict=False):
            if mine != theirs:
                break
            shared += 1
        return min(shared, len(prompt) - 1)  # the last prompt token is always computed
