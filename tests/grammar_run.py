"""One request driven through its grammar processor and output shaper token by token, as the engine drives them
(no model: the test says which tokens are generated, and each must be allowed by the mask)."""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizer_families import VOCAB_SIZE

from mlxcluster.protocol import InferenceRequest, Token
from mlxcluster.worker.features import EngineFeatures, RequestFeatures
from mlxcluster.worker.output import merge_tokens


class Run:
    """One request through its grammar processor and shaper, token by token, as the engine drives them."""

    def __init__(self, engine: EngineFeatures, request: InferenceRequest) -> None:
        """A new request, or a moved stream's (its ``said`` prefilled and advanced over)."""
        import mlx.core as mx

        self.mx = mx
        self.engine = engine
        prompt = engine.prompt(request)
        text, continued = engine.continuation(request, prompt)
        self.tokens = prompt + continued
        self.prepared: RequestFeatures = engine.prepare(request, prompt, continued=(text, continued))
        assert self.prepared.grammar is not None
        self.frames: list[Token] = []
        self._mask = self._step()

    def id(self, text: str) -> int:
        (ident,) = self.engine.tokenizer.encode(text, add_special_tokens=False)
        return int(ident)

    def _step(self) -> np.ndarray:
        assert self.prepared.grammar is not None
        logits = self.prepared.grammar(self.mx.array(self.tokens), self.mx.zeros((1, VOCAB_SIZE)))
        return np.isfinite(np.array(logits[0]))

    def allows(self, text: str) -> bool:
        return bool(self._mask[self.id(text)])

    @property
    def allows_eos(self) -> bool:
        return bool(self._mask[self.engine.grammars.eos_ids].any())

    def write(self, text: str) -> None:
        """Generate ``text`` (each of its tokens must be allowed), shaping it into frames."""
        for ident in self.engine.tokenizer.encode(text, add_special_tokens=False):
            assert self._mask[ident], f"{self.engine.tokenizer.decode([ident])!r} is masked"
            self.tokens.append(ident)
            frame = self.prepared.frame(self.engine.tokenizer.decode([ident]), 1, final=False)
            self.frames.extend([frame] if frame else [])
            self._mask = self._step()

    def finish(self) -> Any:
        assert self.allows_eos
        frame = self.prepared.frame("", 1, final=True)
        return merge_tokens([*self.frames, *([frame] if frame else [])], 0)
