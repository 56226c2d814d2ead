"""What the mlx engine adds to plain generation: tool prompts, grammars, tool-call / reasoning parsing, logprobs.

:class:`EngineFeatures` holds the tokenizer, the model's tool format and think markers, and the grammar
compiler; for each request it renders the prompt (:mod:`~mlxcluster.worker.prompt`), gives the tokens a moved
stream continues after (:mod:`~mlxcluster.worker.continuation`), and builds the grammar's logits processor
(:mod:`~mlxcluster.worker.grammar`) and a :class:`RequestFeatures` that turns each generated token into frames
(:mod:`~mlxcluster.worker.output`). ``prompt``, ``continuation`` and ``prepare`` are thread-safe (request
preparation may run off the generation thread); a RequestFeatures is used by one thread at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

from mlxcluster.protocol import InferenceRequest, Token, TokenLogprob, TopLogprob
from mlxcluster.worker.continuation import ContinuationError, continuation_text
from mlxcluster.worker.grammar import GrammarCompiler, GrammarError, GrammarLogitsProcessor, request_grammar
from mlxcluster.worker.output import OutputShaper, tool_dicts
from mlxcluster.worker.prompt import render_chat, tools_enabled
from mlxcluster.worker.thinking import prompt_opened, reasoning_mode, think_markers
from mlxcluster.worker.tool_formats import tool_format

LOGPROB_FLOOR = -9999.0
"""What OpenAI reports for a token of (numerically) zero probability; JSON has no -inf."""


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


class RequestFeatures:
    """Per-request processors and output shaping."""

    def __init__(
        self,
        request: InferenceRequest,
        tokenizer: Any,
        shaper: OutputShaper,
        processors: list[Any],
        grammar: GrammarLogitsProcessor | None = None,
    ) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.shaper = shaper
        self.processors = processors
        self.grammar = grammar

    @property
    def holding(self) -> bool:
        """A tool call's text is held whole until it is complete (send ``Progress(generated=...)`` meanwhile)."""
        return self.shaper.holding

    @property
    def held_tokens(self) -> int:
        """How many generated tokens the held call has taken so far (0 when nothing is held)."""
        return self.shaper.held_tokens

    def resume(self, text: str, tokens: Sequence[int]) -> None:
        """Advance over a moved stream's continuation (``text`` and its ``tokens``, prefilled after the prompt):
        the shaper takes the text as already said, the grammar consumes the tokens. Raises
        :class:`~mlxcluster.worker.continuation.ContinuationError` if the grammar rejects them."""
        if self.grammar is not None:
            try:
                self.grammar.advance(tokens)
            except GrammarError as exc:
                raise ContinuationError(f"cannot continue the moved stream: {exc}") from None
        self.shaper.advance(text)

    def on_token(self, token: int | None, logprobs: Any) -> None:
        """Record one generated token (``None``: an end-of-sequence token, which has no text)."""
        if self.request.logprobs and token is not None and logprobs is not None:
            self.shaper.add_logprob(self._logprob(token, logprobs))

    def frame(self, text: str, count: int, *, final: bool) -> Token | None:
        return self.shaper.frame(text, count, final=final)

    def _text(self, token: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token])
        return text, list(text.encode("utf-8"))

    def _logprob(self, token: int, logprobs: Any) -> TokenLogprob:
        import mlx.core as mx

        text, raw = self._text(token)
        top: list[TopLogprob] = []
        k = min(self.request.top_logprobs, logprobs.shape[-1])
        if k > 0:
            order = mx.argpartition(-logprobs, kth=k - 1)[:k]
            values = logprobs[order]
            pairs = sorted(
                zip(cast(list[float], values.tolist()), cast(list[int], order.tolist()), strict=True),
                key=lambda pair: -pair[0],
            )
            for value, index in pairs:
                alt, alt_raw = self._text(int(index))
                top.append(TopLogprob(token=alt, logprob=_finite(float(value)), bytes=alt_raw))
        return TokenLogprob(token=text, logprob=_finite(float(logprobs[token].item())), bytes=raw, top=top)


def grammar_field(request: InferenceRequest) -> str:
    """The request field a grammar comes from: a forced call's ``tool_choice``, else ``response_format``, else the
    strict ``tools``."""
    if request.tool_choice in ("required", "function"):
        return "tool_choice"
    if request.response_format is not None and request.response_format.type != "text":
        return "response_format"
    return "tools"


class EngineFeatures:
    """Engine-wide state: the grammar compiler (with its cache), the model's tool format and think markers."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.grammars = GrammarCompiler(hf, vocab_size, eos_ids)
        self.tool_format = tool_format(tokenizer)
        self.markers = think_markers(tokenizer)
        self.think = (self.markers.start, self.markers.end) if self.markers else None

    def prompt(self, request: InferenceRequest) -> list[int]:
        """The prompt's token ids (a moved stream's continuation not included: see :meth:`continuation`)."""
        if request.messages is not None:
            return render_chat(self.tokenizer, request, self.tool_format)
        if request.prompt is None:
            raise ValueError("the request has neither messages nor prompt")
        return list(self.tokenizer.encode(request.prompt))

    def continuation(self, request: InferenceRequest, prompt: Sequence[int]) -> tuple[str, list[int]]:
        """What a moved stream continues after (``request.said``, else ``request.continuation``), as the text
        the model had written and its token ids, to prefill after ``prompt``; ``("", [])`` for a new request.
        Raises :class:`~mlxcluster.worker.continuation.ContinuationError` when it cannot be written back."""
        opened = self.markers is not None and request.messages is not None and prompt_opened(self.markers, prompt)
        fmt = self.tool_format if tools_enabled(request) else None
        text = continuation_text(request, fmt, self.think, opened=opened)
        if not text:
            return "", []
        return text, list(self.tokenizer.encode(text, add_special_tokens=False))

    def prepare(
        self, request: InferenceRequest, prompt: list[int], continued: tuple[str, Sequence[int]] | None = None
    ) -> RequestFeatures:
        """Grammar, processors and shaper for ``request``; raises ValueError (the request's fault), a
        :class:`GrammarError` (with ``param``, the field at fault) for what cannot be enforced.

        :param prompt: the prompt's tokens, without a continuation.
        :param continued: ``(text, tokens)`` of a moved stream's continuation (:meth:`continuation`): the
            grammar and the shaper are advanced over it."""
        mode = reasoning_mode(self.markers, request, prompt)
        grammar_text = request_grammar(
            request, self.tool_format, self.grammars.vocab(), reasoning=mode, markers=self.markers
        )
        processors: list[Any] = []
        grammar = None
        if grammar_text is not None:
            try:
                matcher = self.grammars.matcher(grammar_text)
            except GrammarError as exc:  # name the field whose grammar would not compile
                raise GrammarError(str(exc), param=exc.param or grammar_field(request)) from None
            grammar = GrammarLogitsProcessor(matcher, self.vocab_size, self.grammars.eos_ids)
            processors.append(grammar)
        use_tools = tools_enabled(request)
        shaper = OutputShaper(
            think=self.think,
            in_reasoning=mode == "opened",
            tools=self.tool_format if use_tools else None,
            tool_dicts=tool_dicts(request.tools),
            parallel=request.parallel_tool_calls,
            stream_calls=request.stream,
        )
        features = RequestFeatures(request, self.tokenizer, shaper, processors, grammar)
        if continued is not None and continued[0]:
            features.resume(continued[0], continued[1])
        return features
