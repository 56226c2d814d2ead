"""A moved stream's continuation: what earlier workers said, as the raw text the model had written.

The controller resends a lost stream with what it relayed (:attr:`~mlxcluster.protocol.InferenceRequest.said`:
reasoning text, content text and complete tool calls, in order). The new worker prefills the prompt followed
by this text, advances the request's grammar and output shaper over it (the generation resumes inside the
reasoning, in the content, after N calls or in the middle of a JSON value) and generates on.
"""

from __future__ import annotations

from mlxcluster.json_grammar import GrammarError
from mlxcluster.protocol import InferenceRequest, SaidPart
from mlxcluster.worker.tool_format_base import ToolFormat


class ContinuationError(GrammarError):
    """What was said cannot be continued here (a call format that cannot be written back, text the grammar
    rejects): the stream is not moved."""


def said_text(
    said: list[SaidPart], fmt: ToolFormat | None, think: tuple[str, str] | None, *, opened: bool = False
) -> str:
    """The raw text of ``said``: reasoning inside the think markers (the start marker left out when the prompt
    ``opened`` the block, the end marker only once something followed the reasoning), content as it is, each
    tool call as ``fmt`` writes it."""
    out: list[str] = []
    reasoning = opened
    for part in said:
        if part.kind == "reasoning":
            if think is None:
                raise ContinuationError("the stream had reasoning, but this model has no think markers")
            if not reasoning:
                out.append(think[0])
                reasoning = True
            out.append(part.text)
            continue
        if reasoning and think is not None and (part.text or part.kind == "tool_call"):
            out.append(think[1])
            reasoning = False
        if part.kind == "content":
            out.append(part.text)
        elif part.call is not None:
            if fmt is None:
                raise ContinuationError("the stream had tool calls, but the request offers no tools")
            try:
                out.append(fmt.render_call(part.call))
            except ValueError as exc:
                raise ContinuationError(str(exc)) from None
    return "".join(out)


def continuation_text(
    request: InferenceRequest, fmt: ToolFormat | None, think: tuple[str, str] | None, *, opened: bool
) -> str:
    """What ``request`` continues after: its ``said`` as text, else its content-only ``continuation`` (a
    controller that predates ``said``), else nothing."""
    if request.said:
        return said_text(request.said, fmt, think, opened=opened)
    return request.continuation or ""
