"""Constrained decoding with llguidance: grammars for JSON output and forced tool calls, as logits processors.

Each distinct grammar is compiled once per engine into an ``LLMatcher`` kept in an LRU cache; a
request gets a ``deep_copy`` of it (microseconds), advances it with every token it samples and masks
the logits of its next token, inside the continuous batch (mlx-lm's per-request ``logits_processors``).
The end-of-sequence tokens are allowed exactly when the grammar accepts, so a finished JSON value ends
the request. Why llguidance and not xgrammar or outlines-core: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mlxcluster.protocol import InferenceRequest, ResponseFormat, ToolSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
"""Compact JSON (no free whitespace): a small model at temperature > 0 cannot wander off in blanks."""
ANY_OBJECT: dict[str, Any] = {"type": "object"}
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
"""The tool-call markup of mlx-lm's ``json_tools`` family, also used when a chat template has no tool support."""


class GrammarError(ValueError):
    """A schema or grammar that cannot be enforced; the message names the problem."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of a JSON schema (raises :class:`GrammarError` if it cannot be built)."""
    import llguidance

    try:
        grammar: str = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        return grammar
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None


def validate_grammar(grammar: str) -> None:
    """Check a grammar without a tokenizer (used by the controller where a schema arrives)."""
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"unsupported schema: {problem}")


def tool_call_schema(tools: Sequence[ToolSpec]) -> dict[str, Any]:
    """The JSON schema of one ``{"name": ..., "arguments": {...}}`` call of any of ``tools``."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters or ANY_OBJECT},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def forced_tools(request: InferenceRequest) -> list[ToolSpec] | None:
    """The tools one of which the output must call (tool_choice required or named), else None."""
    tools = request.tools or []
    if request.tool_choice == "required":
        if not tools:
            raise GrammarError("tool_choice 'required' needs at least one tool")
        return list(tools)
    if request.tool_choice == "function":
        named = [tool for tool in tools if tool.name == request.tool_name]
        if not named:
            raise GrammarError(f"tool_choice names '{request.tool_name}', which is not among the tools")
        return named
    return None


def _lark_literal(text: str, special: dict[str, int]) -> str:
    """A Lark terminal for ``text``: a special token by id when it is one, else a JSON-quoted string."""
    if text in special:
        return f"<[{special[text]}]>"
    return json.dumps(text)


def tool_calls_grammar(
    tools: Sequence[ToolSpec], *, parallel: bool, start: str, end: str, special: dict[str, int]
) -> str:
    """A Lark grammar: one (or, with ``parallel``, several) ``start {json} end`` calls, nothing else."""
    compact = {"x-guidance": dict(JSON_OPTIONS), **tool_call_schema(tools)}  # a %json block takes no defaults
    call_schema = json.dumps(compact, separators=(",", ":"))
    repeat = "+" if parallel else ""
    return (
        f"start: (call){repeat}\n"
        f'call: {_lark_literal(start, special)} "\\n" body "\\n" {_lark_literal(end, special)} "\\n"?\n'
        f"body: %json {call_schema}\n"
    )


def request_grammar(
    request: InferenceRequest, *, tool_start: str, tool_end: str, special: dict[str, int]
) -> str | None:
    """The grammar that ``request`` must follow, or None when its output is free."""
    tools = forced_tools(request)
    if tools is not None:
        for tool in tools:
            if tool.parameters is not None:
                json_schema_grammar(tool.parameters)  # a bad parameters schema is named as such
        return tool_calls_grammar(
            tools, parallel=request.parallel_tool_calls, start=tool_start, end=tool_end, special=special
        )
    return response_format_grammar(request.response_format)


def response_format_grammar(fmt: ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_schema_grammar(ANY_OBJECT)
    if fmt.schema is None:
        raise GrammarError("response_format json_schema needs a schema")
    return json_schema_grammar(fmt.schema)


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
        self.compiled = 0
        self.hits = 0

    def _tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_ids or None
            )
        return self._ll_tokenizer

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher at the start of ``grammar`` (compiled on first use, then copied)."""
        import llguidance

        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
                self.hits += 1
                return template.deep_copy()
        template = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"unsupported schema: {template.get_error()}")
        with self._lock:
            self._cache[grammar] = template
            self.compiled += 1
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return template.deep_copy()


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
