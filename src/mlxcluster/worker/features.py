"""What the mlx engine adds to plain generation: tool prompts, grammars, tool-call / reasoning parsing, logprobs.

:class:`EngineFeatures` lives on the generation thread with the tokenizer; for each request it renders
the prompt (:mod:`~mlxcluster.worker.prompt`), builds the grammar and its logits processor
(:mod:`~mlxcluster.worker.grammar`) and a :class:`RequestFeatures` that turns each generated token
into frames (:mod:`~mlxcluster.worker.output`). The engine calls it at three points: accept, admit, token.
"""

from __future__ import annotations

import math
from typing import Any, cast

from mlxcluster.protocol import InferenceRequest, Token, TokenLogprob, TopLogprob
from mlxcluster.worker.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarLogitsProcessor,
    forced_tools,
    request_grammar,
)
from mlxcluster.worker.output import OutputShaper, tool_dicts
from mlxcluster.worker.prompt import render_chat, tool_markup, tools_enabled

JSON_TOOLS_PARSER = "mlx_lm.tool_parsers.json_tools"
"""The one tool-call family whose calls are ``{"name", "arguments"}`` JSON, which a forced call's grammar writes."""
LOGPROB_FLOOR = -9999.0
"""What OpenAI reports for a token of (numerically) zero probability; JSON has no -inf."""


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


class RequestFeatures:
    """Per-request processors and output shaping."""

    def __init__(self, request: InferenceRequest, tokenizer: Any, shaper: OutputShaper, processors: list[Any]) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.shaper = shaper
        self.processors = processors

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


class EngineFeatures:
    """Engine-wide state: the grammar compiler (with its cache) and the model's markers."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.grammars = GrammarCompiler(hf, vocab_size, eos_ids)
        self._special = {text: int(ident) for text, ident in hf.get_added_vocab().items()}
        self.think = (tokenizer.think_start, tokenizer.think_end) if getattr(tokenizer, "has_thinking", False) else None

    def prompt(self, request: InferenceRequest) -> list[int]:
        if request.messages is not None:
            return render_chat(self.tokenizer, request)
        if request.prompt is None:
            raise ValueError("the request has neither messages nor prompt")
        return list(self.tokenizer.encode(request.prompt))

    def prepare(self, request: InferenceRequest, prompt: list[int]) -> RequestFeatures:
        """Grammar, processors and shaper for ``request``; raises ValueError (the request's fault)."""
        start, end, parse = tool_markup(self.tokenizer)
        processors: list[Any] = []
        if forced_tools(request) is not None and getattr(parse, "__module__", "") != JSON_TOOLS_PARSER:
            raise GrammarError(
                f"cannot force a tool call for this model: its tool-call format ({parse.__module__}) is not JSON; "
                "use tool_choice 'auto'"
            )
        grammar = request_grammar(request, tool_start=start, tool_end=end, special=self._special)
        if grammar is not None:
            processors.append(
                GrammarLogitsProcessor(self.grammars.matcher(grammar), self.vocab_size, self.grammars.eos_ids)
            )
        tools = (start, end, parse, tool_dicts(request.tools)) if tools_enabled(request) else None
        in_reasoning = False
        if self.think and request.messages is not None:
            tail = self.tokenizer.decode(prompt[-16:])
            in_reasoning = tail.rfind(self.think[0]) > tail.rfind(self.think[1])
        shaper = OutputShaper(
            think=self.think,
            in_reasoning=in_reasoning,
            tools=tools,
            parallel=request.parallel_tool_calls,
            stream_calls=request.stream and getattr(parse, "__module__", "") == JSON_TOOLS_PARSER,
        )
        return RequestFeatures(request, self.tokenizer, shaper, processors)
