"""Constrained decoding with llguidance: the grammar a request's output follows, as a logits processor.

A request's grammar (:func:`request_grammar`) is one Lark grammar over its whole output: an ``answer``
(a JSON value for ``response_format``, forced tool calls for ``tool_choice`` required / named, or free text
whose tool calls follow the call grammar for ``strict`` tools, :mod:`~mlxcluster.worker.tool_formats`),
after the reasoning the model may do first (:mod:`~mlxcluster.worker.thinking`).

Each distinct grammar is compiled once per engine into an ``LLMatcher`` kept in an LRU cache; a request gets
a ``deep_copy`` of it (microseconds), advances it with every token it samples and masks the logits of its
next token, inside the continuous batch (mlx-lm's per-request ``logits_processors``). The end-of-sequence
tokens are allowed exactly when the grammar accepts, so a finished JSON value ends the request and reasoning
never ends it. Why llguidance and not xgrammar or outlines-core: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlxcluster.json_grammar import JSON_OPTIONS, GrammarError, json_schema_grammar
from mlxcluster.protocol import InferenceRequest, ResponseFormat, ToolSpec
from mlxcluster.worker.lark_text import LarkVocab, json_value
from mlxcluster.worker.thinking import ReasoningMode, ThinkMarkers, with_reasoning
from mlxcluster.worker.tool_format_base import ANY_OBJECT, ToolFormat
from mlxcluster.worker.tool_formats import JsonToolsFormat, forced_answer, strict_answer

__all__ = ["GrammarCompiler", "GrammarError", "GrammarLogitsProcessor", "request_grammar"]


def forced_tools(request: InferenceRequest) -> list[ToolSpec] | None:
    """The tools one of which the output must call (tool_choice required or named), else None."""
    tools = request.tools or []
    if request.tool_choice == "required":
        if not tools:
            raise GrammarError("tool_choice 'required' needs at least one tool", param="tool_choice")
        return list(tools)
    if request.tool_choice == "function":
        named = [tool for tool in tools if tool.name == request.tool_name]
        if not named:
            raise GrammarError(
                f"tool_choice names '{request.tool_name}', which is not among the tools", param="tool_choice"
            )
        return named
    return None


def _check_parameters(tools: Sequence[ToolSpec]) -> None:
    for tool in tools:
        if tool.parameters is not None:
            json_schema_grammar(tool.parameters, param="tools")  # a bad parameters schema is named as such


def answer_rules(request: InferenceRequest, fmt: ToolFormat, vocab: LarkVocab) -> str | None:
    """Lark rules defining the ``answer`` that ``request`` must give, or None when its output is free."""
    tools = forced_tools(request)
    if tools is not None:
        _check_parameters(tools)
        return forced_answer(fmt, tools, parallel=request.parallel_tool_calls, vocab=vocab)
    schema = response_format_schema(request.response_format)
    if schema is not None:
        json_schema_grammar(schema, param="response_format")
        return f"answer: {json_value(schema, dict(JSON_OPTIONS))}\n"
    enabled = request.tools if request.tool_choice != "none" else None
    if enabled and any(tool.strict for tool in enabled):
        _check_parameters(enabled)
        return strict_answer(fmt, enabled, parallel=request.parallel_tool_calls, vocab=vocab)
    return None


def request_grammar(
    request: InferenceRequest,
    fmt: ToolFormat,
    vocab: LarkVocab,
    *,
    reasoning: ReasoningMode = "none",
    markers: ThinkMarkers | None = None,
) -> str | None:
    """The Lark grammar of the whole output of ``request``, or None when it is free.

    :param reasoning: how the output starts (see :func:`~mlxcluster.worker.thinking.reasoning_mode`)."""
    answer = answer_rules(request, fmt, vocab)
    return None if answer is None else with_reasoning(answer, reasoning, markers, vocab)


def response_format_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` asks for (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ANY_OBJECT
    if fmt.schema is None:
        raise GrammarError("response_format json_schema needs a schema", param="response_format")
    return fmt.schema


def tool_calls_grammar(
    tools: Sequence[ToolSpec], *, parallel: bool, start: str, end: str, special: dict[str, int]
) -> str:
    """The forced grammar of json_tools calls with markers ``start`` / ``end`` (``special``: which texts are
    special tokens, by id); for benchmarks that compile grammars without a request."""
    from mlx_lm.tool_parsers import json_tools

    vocab = LarkVocab(lambda text: [special.get(text, -1)], lambda ids: "", lambda ident: ident in special.values())
    fmt = JsonToolsFormat(start, end, json_tools.parse_tool_call, native=True)
    return "start: answer\n" + forced_answer(fmt, tools, parallel=parallel, vocab=vocab)


class GrammarCompiler:
    """Compiles grammars for one tokenizer, each once (LRU of ``max_entries``); thread-safe.

    :param hf_tokenizer: the Hugging Face tokenizer (mlx-lm's wrapper forwards to it).
    :param vocab_size: the model's vocabulary size (logits width), which may exceed the tokenizer's.
    :param eos_ids: the tokens that end a sequence; allowed exactly when the grammar accepts.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], *, max_entries: int = 256) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = self._eos_ids = sorted(set(eos_ids))
        self.max_entries = max_entries
        self._ll_tokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._compiling: dict[str, threading.Event] = {}
        self._tokenizer_lock = threading.Lock()
        self.compiled = 0
        self.hits = 0

    def _tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_ids or None
                )
            return self._ll_tokenizer

    def vocab(self) -> LarkVocab:
        """What grammars need to know of this tokenizer (its special tokens are llguidance's; built on first use)."""
        hf = self._hf_tokenizer
        return LarkVocab(
            lambda text: list(hf.encode(text, add_special_tokens=False)),
            lambda ids: str(hf.decode(ids)),
            lambda ident: bool(self._tokenizer().is_special_token(ident)),
            self.eos_ids,
        )

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher at the start of ``grammar`` (compiled on first use, then copied). Threads asking for
        a grammar being compiled wait for that compile: each grammar is compiled once."""
        while True:
            with self._lock:
                template = self._cache.get(grammar)
                if template is not None:
                    self._cache.move_to_end(grammar)
                    self.hits += 1
                    return template.deep_copy()
                compiling = self._compiling.get(grammar)
                if compiling is None:
                    compiling = self._compiling[grammar] = threading.Event()
                    break
            compiling.wait()  # then take it from the cache (or compile it, if that compile failed)
        try:
            template = self._compile(grammar)
        finally:
            with self._lock:
                del self._compiling[grammar]
            compiling.set()
        return template.deep_copy()

    def _compile(self, grammar: str) -> Any:
        import llguidance

        template = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"unsupported schema: {template.get_error()}")
        with self._lock:
            self._cache[grammar] = template
            self.compiled += 1
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return template


class GrammarLogitsProcessor:
    """mlx-lm logits processor: masks every token the grammar does not allow next.

    mlx-lm calls it once per generated token with the sequence so far (prompt, then each sampled
    token) and the next token's logits ``[1, vocab]``; the first call sees only the prompt.
    """

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = [i for i in eos_ids if 0 <= i < vocab_size]
        self._words = (vocab_size + 31) // 32
        self._bitmask = np.zeros(self._words, dtype=np.int32)
        self._started = False

    def advance(self, tokens: Sequence[int]) -> None:
        """Consume tokens already written (a moved stream's continuation, prefilled with the prompt); raises
        :class:`GrammarError` if the grammar does not allow them."""
        if tokens and not self.matcher.consume_tokens(list(tokens)):
            raise GrammarError(f"the text already generated does not follow the grammar: {self.matcher.get_error()}")

    def resume(self) -> None:
        """The next call's last token was already consumed (the request was re-inserted into a new batch)."""
        self._started = False

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens``, in order, the grammar allows after what it has consumed (a draft's usable
        length; nothing is consumed)."""
        if not tokens or self.matcher.is_error():
            return 0
        return int(self.matcher.validate_tokens(list(tokens)))

    def rollback(self, count: int) -> None:
        """Forget the last ``count`` tokens consumed (drafted tokens that were not accepted)."""
        if count > 0 and not self.matcher.rollback(count):
            raise GrammarError(f"cannot roll the grammar back by {count} tokens: {self.matcher.get_error()}")

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        if self._started:
            self.matcher.consume_token(int(tokens[-1].item()))
        self._started = True
        if self.matcher.is_error():  # cannot happen with a mask applied; end the request rather than the batch
            allowed = np.zeros(logits.shape[-1], dtype=np.bool_)
            allowed[self.eos_ids] = True
        else:
            self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: logits.shape[-1]].astype(
                np.bool_
            )
        return mx.where(mx.array(allowed), logits, mx.array(-np.inf, dtype=logits.dtype))
