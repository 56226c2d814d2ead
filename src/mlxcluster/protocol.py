"""Wire messages between nodes: msgspec Structs encoded as JSON.

Every field added after the first release has a default, and unknown fields are ignored, so nodes of
different versions interoperate. Stream frames are a tagged union (``"type"`` field) decoded in one
step and matched with ``match``. Decoding never raises anything but :class:`ProtocolError`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

T = TypeVar("T")

WorkerStatus = Literal["online", "degraded", "draining"]
FinishReason = Literal["stop", "length", "cancelled"]

Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]
"""A non-negative int64; a larger number from a peer makes the message invalid (it would overflow float math)."""
WorkerId = Annotated[str, Meta(max_length=256, pattern=r"^[^\s\x00-\x1f\x7f.*>]+(\.[^\s\x00-\x1f\x7f.*>]+)*$")]
"""A worker id is a token of NATS subjects (``worker.<id>.inference``): no whitespace, wildcard or empty token."""


class ProtocolError(Exception):
    """Bytes that are not a valid message of the expected type."""


class _Message(Struct, kw_only=True, omit_defaults=True):
    """Base of every wire message."""


# --- worker discovery -------------------------------------------------------------------------


class Hardware(_Message):
    """What a worker runs on."""

    chip: str = ""
    cpu_cores: Count = 0
    memory_gb: float = 0.0
    accelerator: str = "cpu"


class Capabilities(_Message):
    """What a worker can serve."""

    max_concurrent: Count = 1
    max_queue: Count = 0
    models: list[str] = msgspec.field(default_factory=list)
    available_memory_gb: float = 0.0
    engine: str = "mlx"
    version: str = ""
    catalogue: list[CatalogueModel] | None = None
    """Every model this worker may serve, loaded or not (see :class:`CatalogueModel`)."""


class GroupMember(_Message, omit_defaults=False):
    """One process of a worker group (see :class:`GroupInfo`)."""

    rank: Count = 0
    member_id: str = ""
    hostname: str = ""
    address: str = ""
    """Its ``host:port`` on the group's ring."""


class GroupInfo(_Message, omit_defaults=False):
    """A worker group: several processes that serve one model together, sharded with ``mx.distributed``.

    Rank 0 registers the group as one worker and carries this in its registration."""

    name: str = ""
    size: Count = 1
    parallel: str = "tensor"
    backend: str = "ring"
    members: list[GroupMember] = msgspec.field(default_factory=list)


class GroupWake(_Message):
    """Published on ``group.<name>.wake`` by a worker group's rank 0: the other ranks, dozing off the ring since
    its ``DozeOp`` named ``doze``, rejoin it (work came)."""

    group: str
    doze: str


class WorkerRegistration(_Message):
    """Published by a worker when it starts and whenever a controller announces itself."""

    worker_id: WorkerId
    hostname: str = ""
    address: str = ""
    hardware: Hardware = msgspec.field(default_factory=Hardware)
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    started_at: float = 0.0
    group: GroupInfo | None = None
    """Set when this worker is rank 0 of a worker group."""


class GroupHello(_Message):
    """Published on ``group.<name>`` by every member of a worker group, a few times a second, for its whole life.

    Before the group forms it is the rendezvous (who is there, at which ring address); afterwards it is the
    members' heartbeat to each other. ``sees`` lists the instances this member currently hears (itself
    included): the group forms when every member sees the same ``size`` instances."""

    group: str
    member_id: str
    instance: str
    hostname: str = ""
    address: str = ""
    size: Count = 1
    parallel: str = "tensor"
    backend: str = "ring"
    model: str = ""
    rank_hint: int | None = None
    sees: list[str] = msgspec.field(default_factory=list)
    formed: bool = False
    sent_at: float = 0.0


class PromptCacheStats(_Message):
    """A worker's prompt (KV) cache since it started: reuse and size."""

    hits: Count = 0
    """Requests that reused a cached prefix."""
    misses: Count = 0
    """Requests that found nothing to reuse."""
    hit_tokens: Count = 0
    """Prompt tokens served from the cache instead of prefilled."""
    prompt_tokens: Count = 0
    """All prompt tokens of admitted requests (the denominator of the hit rate)."""
    bytes: Count = 0
    limit_bytes: Count = 0
    entries: Count = 0
    evictions: Count = 0


class SpeculationCounts(_Message):
    """A worker's speculative decoding since it started."""

    steps: Count = 0
    """Forwards that verified drafted tokens."""
    drafted: Count = 0
    """Drafted tokens verified."""
    accepted: Count = 0
    """Drafted tokens accepted: each a token generated without a forward of its own."""
    model_drafted: Count = 0
    """Of ``drafted``, those the draft model (``worker.draft_model``) drafted; the rest are prompt-lookup drafts."""
    model_accepted: Count = 0
    """Of ``accepted``, those the draft model drafted."""


class CatalogueModel(_Message):
    """A model a worker may serve (its catalogue: ``worker.model``, ``worker.models``, the scanned models dir),
    loaded or not, with what placement needs to know of it."""

    name: str
    """The served name (a dir's basename, a repo id, a name in the models dir)."""
    kind: Literal["chat", "embedding"] = "chat"
    vision: bool = False
    """A vision model: it reads images (``image_url`` parts and the like) beside text."""
    source: str = ""
    """Where it was found: ``demo``, ``models-dir``, ``local``, ``hf-cache`` or ``hub`` (not downloaded yet)."""
    weights_bytes: Count = 0
    """Bytes of its weight files (0: not known, e.g. a repo id not downloaded yet)."""
    kv_bytes_per_token: Count = 0
    """KV cache bytes one token of context costs across the model's attention layers (0: not known)."""
    kv_fixed_bytes: Count = 0
    """KV bytes a request costs whatever its length (the window of sliding-window layers at most, the state of
    linear-attention layers); a request of ``n`` tokens projects ``kv_fixed_bytes + n × kv_bytes_per_token``
    at most (window layers are capped at their window)."""
    context_length: Count = 0
    dimensions: Count = 0
    """An embedding model's vector length (its pooled hidden size; 0: a chat model, or not known)."""


ModelLoadState = Literal["loading", "loaded", "unloading"]


class ModelState(_Message):
    """One model a worker holds (or is loading / unloading) now."""

    name: str
    state: ModelLoadState = "loaded"
    weights_bytes: Count = 0
    last_used: float = 0.0
    """Unix time its latest request ended (or it loaded)."""
    expires_at: float | None = None
    """Unix time it unloads if unused meanwhile; None: never (pinned, a negative keep-alive, or in use)."""
    pinned: bool = False
    in_flight: Count = 0
    """Its requests running or waiting on this worker."""


class MemoryParts(_Message):
    """A worker's one memory budget and what takes it: loaded weights, the prompt cache, the running requests'
    projected KV (reserved at admission)."""

    budget_bytes: Count = 0
    weights_bytes: Count = 0
    prompt_cache_bytes: Count = 0
    kv_bytes: Count = 0


class AcceleratorStats(_Message):
    """A worker's accelerator as it measured it for one heartbeat; a field left ``None`` is not known there.

    The MLX figures are the worker process's own (``mx.get_active_memory`` / ``get_cache_memory`` /
    ``get_peak_memory``: arrays alive, buffers MLX keeps for reuse, the highest active figure since the process
    started). The GPU figures are the machine's, sampled every few seconds: on macOS from IOKit's accelerator
    statistics (``ioreg``), on Linux from NVML where ``nvidia-ml-py`` is installed.
    """

    mlx_active_bytes: Count | None = None
    mlx_cache_bytes: Count | None = None
    mlx_peak_bytes: Count | None = None
    gpu_utilization: float | None = None
    """Percent of the time the GPU was busy (0-100), as the system last reported it."""
    gpu_cores: Count | None = None
    gpu_memory_used_bytes: Count | None = None
    """Memory the GPU's work holds: on a Mac the unified memory the GPU uses, with NVML the device's used memory."""
    gpu_name: str | None = None
    source: str = ""
    """Where the GPU figures came from: ``ioreg``, ``nvml`` or empty (none)."""


class WorkerHeartbeat(_Message):
    """Published by a worker every ``discovery.heartbeat_interval_ms``."""

    worker_id: WorkerId
    status: WorkerStatus = "online"
    active: Count = 0
    """Requests being served: chat requests holding a batch slot, and embedding requests in flight."""
    queued: Count = 0
    """Chat requests waiting for a batch slot."""
    tokens_per_second: float = 0.0
    cpu_percent: float = 0.0
    rss_bytes: Count = 0
    available_memory_gb: float = 0.0
    models_loaded: list[str] = msgspec.field(default_factory=list)
    requests_total: Count = 0
    tokens_total: Count = 0
    errors_total: Count = 0
    sent_at: float = 0.0
    prompt_cache: PromptCacheStats | None = None
    """The engine's prompt (KV) cache, when it has one."""
    models: list[ModelState] | None = None
    """The models loaded, loading or unloading (None: a worker that predates the model fleet)."""
    catalogue: list[CatalogueModel] | None = None
    """Every model this worker may serve, loaded or not (None: only ``models_loaded``)."""
    memory: MemoryParts | None = None
    speculation: SpeculationCounts | None = None
    """Speculative decoding since the worker started (None: no engine of it speculates)."""
    accelerator: AcceleratorStats | None = None
    """MLX memory and GPU load (None: a worker that predates it, or one that knows none of it)."""


class CacheEvent(_Message):
    """Published by a worker on ``worker.cache``: prefix digests its prompt cache now holds or dropped.

    Digests are :func:`mlxcluster.prefix_digest.prefix_digests` of the cached conversations, so a
    controller computes the same values from a request without a tokenizer. ``reset`` replaces all
    that is known of this worker instance (sent on start, on a controller's announce, and
    periodically); otherwise the event is a delta. ``instance`` is the worker's start time: entries of an
    earlier instance of the same id are dropped. ``seq`` numbers the events of one instance.
    """

    worker_id: WorkerId
    model: str = ""
    """The served model the digests belong to (a cache is never shared across models)."""
    instance: float = 0.0
    seq: Count = 0
    reset: bool = False
    stored: list[int] = msgspec.field(default_factory=list)
    removed: list[int] = msgspec.field(default_factory=list)


class Deregister(_Message):
    """Published by a worker that leaves on purpose."""

    worker_id: WorkerId
    reason: str = ""


class ModelCommand(_Message):
    """Sent by a controller to ``worker.<id>.models`` (a NATS request): load or unload a model of the catalogue.
    Answered with :class:`ModelCommandResult` once done (a load: when the model serves)."""

    action: Literal["load", "unload"]
    model: str
    keep_alive: float | None = None
    """Seconds to keep it loaded once idle (negative: for ever; None: the worker's default)."""
    pin: bool | None = None
    """Never unload it when idle (None: leave as it is)."""
    force: bool = False
    """Load even when the memory budget says it does not fit (a warning, not a refusal)."""


class ModelCommandResult(_Message):
    """A worker's answer to a :class:`ModelCommand`."""

    ok: bool
    message: str = ""
    """Why it failed, or what was done."""
    warning: str = ""
    """Set when ``force`` overrode the memory check."""
    state: ModelState | None = None
    memory: MemoryParts | None = None


class Announce(_Message):
    """Published by a controller when it starts; workers answer by registering again."""

    controller_id: str
    started_at: float = 0.0


DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds (seconds) of the request-duration histogram: Prometheus's and the one controllers share."""
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the time-to-first-token histogram."""
LATENCY_BUCKETS: dict[str, tuple[float, ...]] = {
    "request_duration_seconds": DURATION_BUCKETS,
    "ttft_seconds": TTFT_BUCKETS,
}
"""The histograms a controller sends in its heartbeat, by name, and their buckets."""


class LatencyCounts(_Message):
    """One latency histogram of a controller's finished requests (its buckets: :data:`LATENCY_BUCKETS`)."""

    counts: list[Count] = []
    """Per bucket, not cumulative; the last one is +Inf."""
    sum: float = 0.0


class ControllerHeartbeat(_Message):
    """Published by every controller each ``discovery.heartbeat_interval_ms`` on ``cluster.controller``, so
    controllers sharing one NATS know each other (workers ignore it)."""

    controller_id: str
    started_at: float = 0.0
    sent_at: float = 0.0
    address: str = ""
    """Where its HTTP API listens (``bind:port`` as configured)."""
    hostname: str = ""
    version: str = ""
    state: str = ""
    in_flight: Count = 0
    requests_total: Count = 0
    stopping: bool = False
    """Its last heartbeat: it is shutting down (peers forget it at once)."""
    completed: Count = 0
    """Its request counters (as in its ``/api/cluster/status``), so any controller can show the tier's."""
    failed: Count = 0
    errors: Count = 0
    retries: Count = 0
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    latency: dict[str, LatencyCounts] = {}
    """Its request-duration and TTFT histograms since it started (:data:`LATENCY_BUCKETS`), so the tier's
    ``/metrics`` shows every process's."""


class RequestRecord(Struct, kw_only=True):
    """One request as ``/api/cluster/requests`` shows it (times in milliseconds); controllers of one tier send
    theirs to the one answering (:class:`RequestsListing`)."""

    id: str
    key: str | None = None
    model: str
    worker: str | None = None
    state: str
    """In flight: ``routing`` (no worker yet), ``waiting`` (sent, no token yet), ``streaming``; finished:
    ``ok``, ``error`` or ``cancelled``."""
    started: float
    """Wall-clock time the request reached the dispatcher."""
    stream: bool = False
    queued_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    """Time so far for a request in flight."""
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    finish_reason: str | None = None
    error: str | None = None
    attempts: Count = 0
    """Workers tried before the first token."""
    migrations: Count = 0
    """Moves to another worker after the first token."""
    controller: str | None = None
    """The controller (process) that served it."""


class RequestsQuery(_Message):
    """A controller asks a peer for its requests on ``cluster.controller.<id>.requests`` (a request with a
    reply), to show the whole tier in ``/api/cluster/requests``; the filters are the route's."""

    key: str | None = None
    state: str | None = None
    limit: Count | None = None


class RequestsListing(_Message):
    """A controller's requests in flight and its latest finished ones (newest first), the reply to
    :class:`RequestsQuery`."""

    controller_id: str
    in_flight: list[RequestRecord] = []
    recent: list[RequestRecord] = []
    recent_capacity: Count = 0


class WorkerSettingsChanged(_Message):
    """Published by a controller on ``cluster.worker_settings`` when an operator changes a worker's run-time
    settings (the whole state, so applying it twice is harmless), and again for every worker it has settings
    for when another controller announces itself. ``forget``: the worker was forgotten."""

    controller_id: str
    worker_id: WorkerId
    drained: bool = False
    priority: int | None = None
    tags: list[str] | None = None
    forget: bool = False


# --- inference --------------------------------------------------------------------------------


class ToolCall(_Message):
    """A function call the model made: ``arguments`` is JSON text (as OpenAI sends it)."""

    name: str
    arguments: str = "{}"
    id: str = ""


class ToolCallDelta(_Message):
    """A piece of a tool call being streamed: its first piece has ``id`` and ``name`` (no arguments), the
    next ones a piece of ``arguments``. The complete :class:`ToolCall` (same ``id``) follows in
    ``Token.tool_calls``, its ``arguments`` the concatenation of the pieces."""

    id: str
    name: str = ""
    arguments: str = ""


class ToolSpec(_Message):
    """A function the model may call; ``parameters`` is its JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool = False


class ChatMessage(_Message):
    """One chat turn, content already flattened to text."""

    role: str
    content: str = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's calls (history sent back by the client)."""
    tool_call_id: str | None = None
    """A ``tool`` turn: the call it answers."""
    images: Count = 0
    """How many of the request's :attr:`InferenceRequest.images` this turn carries (the next ones in order),
    shown before its text."""


class ImageInput(_Message):
    """One image of a request, its bytes checked by the controller to be PNG, JPEG, GIF, WebP or BMP."""

    media_type: str
    data: bytes = b""
    """The image's bytes (base64 in JSON); empty when :attr:`object` names where they are."""
    object: str | None = None
    """The image parked in the JetStream object store (a request too large for one message): its name in the
    bucket of :mod:`mlxcluster.bus.image_store`."""


class SamplingParams(_Message):
    """How to pick each next token. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed_offset: Count = 0
    """Draws of the seeded random stream already spent: a continued request (see
    :attr:`InferenceRequest.continuation`) resumes the stream where the interrupted worker stopped."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None


class ReasoningParams(_Message):
    """What the client asked of a reasoning model's thinking: OpenAI's ``reasoning_effort``, the Responses
    API's ``reasoning``, Anthropic's ``thinking``, mapped onto the chat template's thinking switch and a budget."""

    enabled: bool | None = None
    """False: thinking off (the template's switch, e.g. ``enable_thinking``); True: on; None: the template's default."""
    effort: str = ""
    """The effort asked (``none``, ``minimal``, ``low``, ``medium``, ``high``): the worker's default budget for it."""
    budget_tokens: Count | None = None
    """Most reasoning tokens before the think-end marker is forced, so the answer still comes (None: the
    worker's default for ``effort``)."""
    param: str = ""
    """The client's field that asked (``reasoning_effort``, ``reasoning.effort``, ``thinking``): a model whose
    template has no thinking refuses the request naming it."""


class SaidPart(_Message):
    """One piece of what a stream had said when its worker was lost, in order (see
    :attr:`InferenceRequest.said`): reasoning text, content text, or one complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"] = "content"
    text: str = ""
    call: ToolCall | None = None


class ResponseFormat(_Message):
    """Constrained output: ``json_object`` (any object) or ``json_schema`` (``schema``), enforced by the worker."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str = ""


ToolChoice = Literal["none", "auto", "required", "function"]


class InferenceRequest(_Message):
    """Sent by the controller to ``worker.<id>.inference``; frames go to the NATS reply subject."""

    request_id: str
    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    max_tokens: Count = 256
    stop: list[str] = msgspec.field(default_factory=list)
    seed: int | None = None
    stream: bool = True
    session_id: str | None = None
    deadline: float | None = None
    """Unix time after which the worker gives up on the request."""
    continuation: str | None = None
    """Text already generated for this request by a worker that was lost mid-stream: the engine continues
    the assistant's message after it (chat: after the generation prompt; text: after the prompt) instead of
    starting it. ``max_tokens`` is then the remaining budget, and usage counts only the new tokens as
    completion tokens, the original prompt's as prompt tokens."""
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice = "auto"
    """``required`` and ``function`` (the one named by ``tool_name``) are enforced with a grammar."""
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] = 0
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (``mlx_lm.server``'s field of the same name), e.g.
    ``{"enable_thinking": false}``; unknown keys are the template's business."""
    reasoning: ReasoningParams | None = None
    max_tokens_auto: bool = False
    """The client gave no ``max_tokens``: the worker uses the room the context window leaves after the
    prompt, at most ``max_tokens`` (the controller's cap)."""
    said: list[SaidPart] | None = None
    """What earlier workers streamed, in order (reasoning, content, complete tool calls), when the stream
    moved: the worker continues the assistant's message after all of it (its grammar advanced over it).
    ``continuation`` then holds the content text alone, for workers that predate this field."""
    keep_alive: float | None = None
    """Seconds the model stays loaded after this request once idle (Ollama's ``keep_alive``): 0 unloads it when
    the request ends, negative keeps it for ever; None: the worker's default for the model."""
    images: list[ImageInput] | None = None
    """The images of a chat request, in message order (:attr:`ChatMessage.images` says which turn has which);
    only a vision model takes them."""


class Cancel(_Message):
    """Sent to ``worker.<id>.cancel``: stop generating for this request."""

    request_id: str
    reason: str = ""


# --- embeddings -------------------------------------------------------------------------------


class EmbedRequest(_Message):
    """Sent by the controller to ``worker.<id>.embed`` (a NATS request): embed ``texts`` or ``tokens`` (one of
    them) with an embedding model. Answered with one :class:`EmbedResult`."""

    request_id: str
    model: str
    texts: list[str] | None = None
    tokens: list[list[int]] | None = None
    """Inputs already tokenized (OpenAI's token-id ``input``)."""
    dimensions: Count | None = None
    """Keep the first ``dimensions`` values of each vector (Matryoshka), renormalised when the model normalises."""
    prompt_name: str | None = None
    """A prompt of the model's sentence-transformers config put before each text (e.g. ``query``)."""
    deadline: float | None = None
    """Unix time after which the worker gives up on the request."""
    keep_alive: float | None = None
    """As :attr:`InferenceRequest.keep_alive`."""


class EmbedResult(_Message):
    """A worker's answer to an :class:`EmbedRequest`: one vector per input, in order, each little-endian float32
    bytes (base64 in JSON); or ``error`` (then no vectors)."""

    worker_id: str = ""
    vectors: list[bytes] = msgspec.field(default_factory=list)
    dimensions: Count = 0
    prompt_tokens: Count = 0
    error: Error | None = None


# --- stream frames (tagged union) -------------------------------------------------------------


class Usage(_Message):
    """Token counts from the worker's own tokenizer."""

    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count = 0
    cached_tokens: Count = 0
    """Prompt tokens served from the worker's prompt cache (OpenAI's ``prompt_tokens_details.cached_tokens``)."""
    reasoning_tokens: Count = 0
    """Completion tokens spent inside the model's thinking markers (OpenAI's
    ``completion_tokens_details.reasoning_tokens``)."""
    image_tokens: Count = 0
    """Prompt tokens that stand for images (a vision model's; part of ``prompt_tokens``)."""


class Timings(_Message):
    """Where the time went, as measured on the worker."""

    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_second: float = 0.0


class Accepted(_Message, tag="accepted", tag_field="type"):
    """First frame: the worker took the request (``queued`` if it waits for a slot)."""

    worker_id: str
    queued: bool = False


class TopLogprob(_Message):
    """One candidate token and its log-probability."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Message):
    """A generated token's log-probability and the most likely alternatives (from the sampled distribution)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top: list[TopLogprob] = msgspec.field(default_factory=list)


class Token(_Message, tag="token", tag_field="type"):
    """Generated text; ``count`` tokens coalesced when the consumer is slower than generation.

    ``reasoning`` is text inside the model's thinking markers, ``tool_calls`` the calls parsed from
    the model's tool-call markup (their text is not in ``text``), ``logprobs`` one entry per token when asked.
    """

    text: str
    count: Count = 1
    seq: Count = 0
    reasoning: str = ""
    tool_calls: list[ToolCall] | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_call_deltas: list[ToolCallDelta] | None = None
    """Pieces of calls being streamed (streamed requests, JSON tool-call formats): see :class:`ToolCallDelta`."""


class Progress(_Message, tag="progress", tag_field="type"):
    """Prefill progress of a long prompt: sent before the first token so the controller's first-token
    timer measures silence, not prefill time. Not numbered: losing one loses nothing."""

    processed: Count = 0
    total: Count = 0
    generated: Count = 0
    """Tokens generated so far whose text is held back (a tool call the parser holds until it is complete):
    the first such Progress marks the first generated token (TTFT), and each one feeds the silence timer."""


class Done(_Message, tag="done", tag_field="type"):
    """Last frame of a successful stream."""

    finish_reason: FinishReason = "stop"
    usage: Usage = msgspec.field(default_factory=Usage)
    timings: Timings = msgspec.field(default_factory=Timings)
    seq: Count | None = None
    """The ``seq`` a next Token would have had: the receiver sees frames lost before the end (None: not said)."""
    stop_sequence: str | None = None
    """The request's stop string that ended the output (its text is not sent), or None."""


class Error(_Message, tag="error", tag_field="type"):
    """Last frame of a failed stream; ``retryable`` if another worker may succeed."""

    code: str
    message: str
    retryable: bool = False
    param: str | None = None
    """The request field at fault, for an ``invalid_request`` (the API's 400 names it)."""


Frame = Accepted | Progress | Token | Done | Error
FrameBatch = list[Frame]
"""Frames sent together in one reply message (:func:`encode_frames`)."""

# NATS headers of the liveness probe a worker sends to a stream's reply subject: the controller answers,
# with GONE_HEADER set when nobody waits for that stream any more (no answer at all: controller gone).
PROBE_HEADER = "Mlxcluster-Probe"
GONE_HEADER = "Mlxcluster-Gone"

# --- encoders / decoders (reused; msgspec encoders and decoders are thread-safe) --------------

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def encode(message: Struct) -> bytes:
    """Serialize any wire message."""
    return _encoder.encode(message)


def decoder_for(message_type: type[T] | Any) -> msgspec.json.Decoder[T]:
    """A cached decoder for one message type (or the :data:`Frame` union)."""
    found = _decoders.get(message_type)
    if found is None:
        found = _decoders[message_type] = msgspec.json.Decoder(message_type)
    return found


def decode(data: bytes, message_type: type[T] | Any) -> T:
    """Parse bytes into ``message_type``; anything invalid raises :class:`ProtocolError`."""
    try:
        decoded: T = decoder_for(message_type).decode(data)
        return decoded
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:  # bad UTF-8 in a str
        name = getattr(message_type, "__name__", "Frame")
        raise ProtocolError(f"invalid {name}: {exc}") from None
    except RecursionError:  # nested deeper than the decoder's recursion limit
        name = getattr(message_type, "__name__", "Frame")
        raise ProtocolError(f"invalid {name}: nested too deeply") from None


def decode_frame(data: bytes) -> Frame:
    """Parse one stream frame."""
    return decode(data, Frame)


def encode_frames(encoded: list[bytes]) -> bytes:
    """One reply message carrying frames already encoded: the frame itself when alone, else a JSON array
    of them (what a worker produced within one turn of its event loop travels as one NATS message)."""
    return encoded[0] if len(encoded) == 1 else b"[" + b",".join(encoded) + b"]"


def decode_frames(data: bytes) -> list[Frame]:
    """Parse one reply message: a single frame or an array of frames (:func:`encode_frames`)."""
    if data[:1] == b"[":
        return decode(data, FrameBatch)
    return [decode(data, Frame)]
