"""Cluster configuration: msgspec Structs for ``cluster.toml``, loading, env overrides, clear errors.

Every key has a default, so an empty file is a valid configuration. Values are taken, in order of
precedence, from ``MLXCLUSTER_<SECTION>_<KEY>`` environment variables, the TOML file (with ``${VAR}``
and ``${VAR:-default}`` interpolation in strings) and the defaults below. Any problem raises
:class:`ConfigError` with one line naming the file (or variable), the key path and what was expected.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from mlxcluster.durations import parse_duration

Port = Annotated[int, Meta(ge=1, le=65535)]
OptionalPort = Annotated[int, Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, Meta(ge=1)]
PositiveMs = Annotated[int, Meta(ge=1)]
PositiveSeconds = Annotated[float, Meta(gt=0)]
LogLevel = Literal["debug", "info", "warning", "error"]

SECRET_KEYS = frozenset({"nats.password", "nats.token", "controller.api_keys"})
MASK = "***"


class ConfigError(Exception):
    """A configuration problem, described in one line that names the source and key path."""


class _Section(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: unknown keys are errors."""


class ClusterSection(_Section):
    """``[cluster]``: which roles this process runs."""

    mode: Literal["controller", "worker", "dual"] = "dual"


class TlsSection(_Section):
    """``[nats.tls]``: client TLS for connecting to NATS (and the embedded server's certificate)."""

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


class EmbeddedNatsSection(_Section):
    """``[nats.embedded]``: the nats-server process started in embedded mode."""

    host: str = "127.0.0.1"
    port: Port = 4222
    http_port: OptionalPort = 8222
    http_host: str = "127.0.0.1"
    """Where the monitoring endpoint (``/varz``, ``/connz``: every connection, no auth) listens: loopback unless
    set, even when ``host`` opens the client port to other machines."""
    jetstream: bool = True
    """Run JetStream (keys, usage and settings shared by every controller live in it)."""
    store_dir: str | None = None
    """Where JetStream keeps its files, in a dir per server (``mlxcluster-<port>/jetstream/``): keys and usage
    survive restarts here. Unset: the data dir, ``$XDG_DATA_HOME/mlxcluster/jetstream`` (``XDG_DATA_HOME``
    defaults to ``~/.local/share``)."""
    log_level: LogLevel = "info"
    start_timeout_s: PositiveSeconds = 5.0
    insecure: bool = False
    """Listen on a non-loopback ``host`` without NATS auth (refused otherwise; warned about at every start)."""
    users_file: str | None = None
    """A JSON file of NATS users with per-role permissions (``mlxcluster config init --secure`` writes one)."""


class NatsSection(_Section):
    """``[nats]``: how nodes reach the message bus."""

    mode: Literal["embedded", "external"] = "embedded"
    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: TlsSection = msgspec.field(default_factory=TlsSection)
    max_payload: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 8 * 1024 * 1024
    subject_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")] = "mlxcluster"
    max_reconnect_attempts: Annotated[int, Meta(ge=-1)] = -1
    reconnect_time_wait_ms: PositiveMs = 1000
    """First reconnect delay; each failed attempt doubles it (with jitter) up to ``reconnect_max_wait_ms``."""
    reconnect_max_wait_ms: PositiveMs = 5000
    connect_timeout_ms: PositiveMs = 2000
    randomize_servers: bool = True
    """Try ``url``'s servers in random order (spreads clients over a NATS cluster); false: in the order given,
    so a node prefers the first (its local server) and fails over to the next."""
    embedded: EmbeddedNatsSection = msgspec.field(default_factory=EmbeddedNatsSection)


class ApiKeyEntry(_Section):
    """One ``[[controller.keys]]`` entry: an API key with a name, limits, allowed models and a role.

    Exactly one of ``key`` (the value), ``key_env`` (an environment variable holding it) or ``key_sha256``
    (the hex SHA-256 of the value, so the file holds no secret) says which key it is.
    """

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
    key: str | None = None
    key_env: str | None = None
    key_sha256: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    rpm: PositiveInt | None = None
    """Requests per minute (sliding window); unset: no limit."""
    tpm: PositiveInt | None = None
    """Prompt + completion tokens per minute (sliding window); unset: no limit."""
    max_concurrent: PositiveInt | None = None
    """Requests of this key running at once; unset: no limit."""
    models: list[str] = msgspec.field(default_factory=list)
    """Models this key may use; empty: all."""
    admin: bool = False
    """Admin keys reach the mutating cluster API (worker management) and ``/api/cluster/keys``."""


class ControllerSection(_Section):
    """``[controller]``: the HTTP API and request routing."""

    bind: str = "127.0.0.1"
    port: Port = 8080
    processes: Annotated[int, Meta(ge=1, le=64)] | None = None
    """Controller processes serving ``port`` together (``SO_REUSEPORT``: the kernel spreads connections), each
    its own controller on the bus, under a supervisor that restarts one that dies; unset: min(cores, 4) with
    ``mode = controller`` on Linux, 1 in dual mode and on macOS (which does not spread connections over
    ``SO_REUSEPORT`` listeners). One process needs no supervisor."""
    reuse_port: bool = False
    """Listen with ``SO_REUSEPORT``, beside the other processes of a tier: the supervisor sets it for them."""
    api_keys: list[str] = msgspec.field(default_factory=list)
    """Plain keys: each one is an admin key without limits (``keys`` gives names, limits and roles)."""
    keys: list[ApiKeyEntry] = msgspec.field(default_factory=list)
    shared_state: bool = True
    """Keep keys and usage in NATS JetStream, shared by every controller (the server must run JetStream: refused
    at start otherwise); false: each controller on its own, keys from its config file only, usage in memory."""
    recent_requests: Annotated[int, Meta(ge=0, le=100_000)] = 200
    """Finished requests kept for ``/api/cluster/requests``."""
    insecure: bool = False
    """Serve a non-loopback ``bind`` without any API key (refused otherwise; warned about at every start)."""
    cors: list[str] = msgspec.field(default_factory=list)
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    first_token_timeout_s: PositiveSeconds = 30.0
    accept_timeout_s: PositiveSeconds = 3.0
    """A worker that has not answered ``Accepted`` within this (or ``first_token_timeout_s``, the smaller) is
    given up on, and the request tried on another."""
    request_timeout_s: PositiveSeconds = 600.0
    max_attempts: PositiveInt = 3
    drain_timeout_s: PositiveSeconds = 30.0
    migration_limit: Annotated[int, Meta(ge=0)] = 2
    """Moves of a started stream to another worker when its worker is lost mid-stream (0: none, end it)."""
    stall_timeout_s: PositiveSeconds = 15.0
    """Mid-stream silence (no frame, no liveness probe of the worker) after which a stream counts as lost;
    workers probe every request older than 5 s every 5 s, so keep it above 5."""
    model_load_timeout_s: PositiveSeconds = 600.0
    """The longest wait for a worker to load a model (on demand or by ``models load``); a download counts."""
    default_max_tokens: Annotated[int, Meta(ge=1, le=1 << 20)] = 32768
    """The most tokens an answer may have when the client sets no limit (chat ``max_tokens``, Responses
    ``max_output_tokens``): the worker gives it the room the model's context window leaves after the prompt, at
    most this. 32,768 is the output length Qwen3 and DeepSeek-R1 recommend for reasoning; it bounds a model
    that loops. Keep ``request_timeout_s`` long enough for it at your workers' speed."""
    image_fetch: bool = False
    """Fetch ``http(s)`` image URLs of requests for vision models (off: only ``data:`` URLs are taken)."""
    image_fetch_hosts: list[str] = msgspec.field(default_factory=list)
    """Hosts image URLs may name (``"*"``: any); a URL on another host is a 400."""
    image_fetch_private: bool = False
    """Also fetch from addresses that are not public: loopback, private networks, link-local (an image server on
    the LAN). Off: a URL whose host is or resolves to one is a 400 whatever its name, so a client cannot make the
    controller reach the cloud's metadata service or the cluster's own ports."""
    image_fetch_max_bytes: PositiveInt = 8 * 1024 * 1024
    image_fetch_timeout_s: PositiveSeconds = 10.0


class GroupSection(_Section):
    """``[worker.group]``: this worker is one member of a group that shards one model (``mx.distributed``)."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    """The group's name (every member uses the same); unset: a stand-alone worker. Rank 0 registers under it."""
    size: PositiveInt = 1
    parallel: Literal["tensor", "pipeline"] = "tensor"
    backend: Literal["ring", "jaccl"] = "ring"
    host: str = "127.0.0.1"
    """The address this member's ring listens on and announces (e.g. its Thunderbolt bridge address)."""
    port: OptionalPort = 0
    """The ring port (0: a free one)."""
    rank: Annotated[int, Meta(ge=0)] | None = None
    """A preferred rank (0 makes this member the group's face); unset: ranks follow member ids."""
    hostfile: str | None = None
    """A hostfile to use as is (JACCL: the one ``mlx.distributed_config`` wrote); ranks then come from ``rank``."""
    rendezvous_timeout_s: PositiveSeconds = 60.0
    stall_timeout_s: PositiveSeconds | None = None
    """A collective or model step that has not returned after this long breaks the group; unset: 30 s or the
    offline timeout, the larger (a member that dies or freezes is noticed sooner: its hellos stop)."""


class ThinkingBudgetsSection(_Section):
    """``[worker.thinking_budgets]``: reasoning tokens per effort (``reasoning_effort``, Responses' ``reasoning``)
    when a request gives no budget; once spent, the think-end marker is forced so the answer still comes. A
    budget is at most half the request's ``max_tokens``."""

    low: PositiveInt = 1024
    medium: PositiveInt = 4096
    high: PositiveInt = 16384


class WorkerSection(_Section):
    """``[worker]``: the inference node."""

    id: str | None = None
    model: str | None = None
    engine: Literal["mlx", "echo"] = "mlx"
    max_concurrent: PositiveInt = 8
    max_queue: Annotated[int, Meta(ge=0)] = 64
    echo_token_delay_ms: Annotated[float, Meta(ge=0)] = 0.0
    echo_prompt_cache_entries: Annotated[int, Meta(ge=0)] = 0
    """The echo engine's SIMULATED prompt cache: conversations remembered (LRU); 0: none. For tests and
    benchmarks of cache-aware routing without a model."""
    drain_timeout_s: PositiveSeconds = 30.0
    prefill_step_size: PositiveInt = 256
    """Prompt tokens prefilled per step of the batch when no stream is decoding (and the most ever):
    larger prefills faster. While streams decode, ``step_budget_ms`` sizes the step instead."""
    step_budget_ms: Annotated[float, Meta(ge=0)] = 250.0
    """While streams decode, the wall time one step of the batch should take: each step prefills as many
    prompt tokens as fit beside the decode step, from step costs the engine measures as it runs (at least
    16 tokens a prompt, shared equally by the prompts prefilling together), so running streams keep a
    steady pace while a long prompt prefills; larger prefills faster, smaller keeps the gap between
    streamed tokens shorter. 0: always ``prefill_step_size`` tokens a step."""
    prompt_cache_bytes: Annotated[int, Meta(ge=0)] | None = None
    """Bytes of KV cache kept for reuse by later prompts (LRU); unset: a share of the machine's memory,
    0: no prompt cache."""
    image_max_pixels: PositiveInt = 25_000_000
    """Vision models: the most pixels (width × height) an image of a request may have; a larger one is refused
    with a 400 before it is decoded (a small compressed file can decode to gigabytes)."""
    speculative_tokens: Annotated[int, Meta(ge=0, le=32)] = 8
    """Speculative decoding by prompt lookup: the most tokens drafted per greedy request and step from the
    request's own prompt and output, verified in the batch's forward (the output is unchanged); each step
    drafts only as far as the measured step costs and each request's acceptance rate say it pays.
    0: off."""
    draft_model: str = ""
    """A draft model for speculative decoding (a model dir, a name in the models dir or a Hugging Face repo id,
    resolved like ``model``), with the same tokenizer as ``model``: it drafts for the requests of ``model``
    (the model loaded at start) where prompt lookup has no draft as long as the step's, verified in the
    batch's forward like prompt-lookup drafts (the output is unchanged). A model with another vocabulary is
    refused at load. Unused by a worker group and for models whose caches cannot drop positions per request
    (sliding-window or linear-attention layers); ``speculative_tokens = 0`` turns it off. Empty: none."""
    embedding_batch_tokens: PositiveInt = 8192
    """An embedding model's batches: padded tokens one forward holds at most (an input longer runs alone)."""
    embedding_batch_wait_ms: Annotated[float, Meta(ge=0, le=1000)] = 2.0
    """How long an embedding model's batch thread waits for more inputs (of any request) once it has some."""
    memory_budget_gb: Annotated[float, Meta(gt=0)] | None = None
    """The memory budget in GiB (``memory_budget_bytes`` in bytes; set one of them)."""
    memory_budget_bytes: Annotated[int, Meta(gt=0)] | None = None
    """This worker's one memory budget: loaded models' weights, the prompt cache and the running requests'
    projected KV together; unset: ``memory_budget_gb``, else 75% of the machine's physical memory (what
    Metal lets one process wire by default on most Macs). A model that cannot fit is refused at load, a
    request that cannot fit now waits, one that never could is refused."""
    models: list[str] = msgspec.field(default_factory=list)
    """The worker's catalogue: models it may load on demand (model dirs, names in the models dir, Hugging Face
    repo ids). ``model`` (loaded at start) is always in it."""
    scan_models_dir: bool = False
    """Add every model dir of ``[models] dir`` to the catalogue."""
    keep_alive: str | float = "5m"
    """How long a model loaded on demand stays loaded once idle (seconds, or ``"5m"``, ``"1h"``; negative: for
    ever; 0: unload after each request). A request's ``keep_alive`` overrides it."""
    model_keep_alive: dict[str, str | float] = msgspec.field(default_factory=dict)
    """``[worker.model_keep_alive]``: a model's own default keep-alive by served name (``"Qwen3-4B-4bit" = "1h"``),
    instead of ``keep_alive``."""
    pinned: list[str] = msgspec.field(default_factory=list)
    """Models never unloaded when idle (``model``, loaded at start, is pinned unless ``pin_start_model`` is off)."""
    pin_start_model: bool = True

    def __post_init__(self) -> None:
        if self.memory_budget_gb is not None and self.memory_budget_bytes is not None:
            raise ValueError("set memory_budget_bytes or memory_budget_gb, not both")
        try:
            parse_duration(self.keep_alive)
        except ValueError as exc:
            raise ValueError(f"keep_alive: {exc}") from None
        for name, value in self.model_keep_alive.items():
            try:
                parse_duration(value)
            except ValueError as exc:
                raise ValueError(f"model_keep_alive.{name}: {exc}") from None

    @property
    def keep_alive_s(self) -> float:
        """``keep_alive`` in seconds (negative: for ever)."""
        return parse_duration(self.keep_alive)

    thinking_budgets: ThinkingBudgetsSection = msgspec.field(default_factory=ThinkingBudgetsSection)
    group: GroupSection = msgspec.field(default_factory=GroupSection)


class DiscoverySection(_Section):
    """``[discovery]``: heartbeats and offline detection."""

    heartbeat_interval_ms: PositiveMs = 2000
    offline_timeout_ms: PositiveMs = 6000


class StaticWorker(_Section):
    """One ``[[workers.static]]`` entry: a worker known before it registers."""

    name: str
    host: str = "127.0.0.1"
    port: OptionalPort = 0
    priority: int = 0
    tags: list[str] = msgspec.field(default_factory=list)


class WorkersSection(_Section):
    """``[workers]``: statically configured workers."""

    static: list[StaticWorker] = msgspec.field(default_factory=list)


class CacheAwareSection(_Section):
    """``[load_balancing.cache_aware]``: when the ``cache_aware`` balancer follows the cache, when the load.

    Named after SGLang's cache-aware router: the cluster counts as imbalanced (and the least loaded worker
    wins) when the busiest worker has more than ``balance_abs_threshold`` requests more than the idlest and
    more than ``balance_rel_threshold`` times its load."""

    cache_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.5
    """The best holder's share of the prompt's blocks below which the least loaded worker is used instead."""
    balance_abs_threshold: Annotated[int, Meta(ge=0)] = 8
    balance_rel_threshold: Annotated[float, Meta(ge=1)] = 1.5
    load_weight: Annotated[float, Meta(ge=0)] = 0.5
    """Score = share of the prompt held − load_weight × utilization (load / max_concurrent)."""


class LoadBalancingSection(_Section):
    """``[load_balancing]``: which balancer plugin picks workers."""

    strategy: str = "cache_aware"
    sticky_sessions: bool = False
    cache_index_max_entries: PositiveInt = 200_000
    """(prefix digest, worker) pairs the controller's cache index keeps at most (LRU)."""
    cache_aware: CacheAwareSection = msgspec.field(default_factory=CacheAwareSection)


class LoggingSection(_Section):
    """``[logging]``: level, text or JSON lines, optional file."""

    level: LogLevel = "info"
    format: Literal["text", "json"] = "text"
    file: str | None = None


ExporterSettings = dict[str, str | int | float | bool | list[str]]


class MetricsSection(_Section):
    """``[metrics]``: enabled exporter plugins by name, their settings, the snapshot interval."""

    exporters: list[str] = msgspec.field(default_factory=list)
    snapshot_interval_s: PositiveSeconds = 5.0
    settings: dict[str, ExporterSettings] = msgspec.field(default_factory=dict)
    """``[metrics.settings.NAME]``: keyword arguments for exporter ``NAME``'s factory."""


class TracingSection(_Section):
    """``[tracing]``: OpenTelemetry traces of each request, exported over OTLP/HTTP; off while ``endpoint`` is empty.

    Needs the ``otel`` extra (``pip install 'mlxcluster[otel]'``); a node refuses to start when it is set but
    the extra is missing."""

    endpoint: Annotated[str, Meta(pattern=r"^(https?://\S+)?$")] = ""
    """The collector's OTLP/HTTP base URL (``http://localhost:4318``): spans go to ``<endpoint>/v1/traces``."""
    service_name: Annotated[str, Meta(min_length=1, max_length=128)] = "mlxcluster"
    """``service.name`` of the spans, followed by the role: ``mlxcluster-controller``, ``mlxcluster-worker``."""
    sample_ratio: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0
    """Share of the requests traced (a request arriving with a ``traceparent`` follows its caller's choice)."""

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


class ModelsSection(_Section):
    """``[models]``: where converted and downloaded models live."""

    dir: str = "~/.cache/mlxcluster/models"


class PluginsSection(_Section):
    """``[plugins]``: extra plugin directories and plugins to block."""

    paths: list[str] = msgspec.field(default_factory=list)
    disabled: list[str] = msgspec.field(default_factory=list)


class Config(_Section):
    """The whole ``cluster.toml``."""

    cluster: ClusterSection = msgspec.field(default_factory=ClusterSection)
    nats: NatsSection = msgspec.field(default_factory=NatsSection)
    controller: ControllerSection = msgspec.field(default_factory=ControllerSection)
    worker: WorkerSection = msgspec.field(default_factory=WorkerSection)
    discovery: DiscoverySection = msgspec.field(default_factory=DiscoverySection)
    workers: WorkersSection = msgspec.field(default_factory=WorkersSection)
    load_balancing: LoadBalancingSection = msgspec.field(default_factory=LoadBalancingSection)
    logging: LoggingSection = msgspec.field(default_factory=LoggingSection)
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)
    tracing: TracingSection = msgspec.field(default_factory=TracingSection)
    models: ModelsSection = msgspec.field(default_factory=ModelsSection)
    plugins: PluginsSection = msgspec.field(default_factory=PluginsSection)

    @property
    def models_dir(self) -> Path:
        """The models directory with ``~`` expanded."""
        return Path(self.models.dir).expanduser()


ENV_PREFIX = "MLXCLUSTER_"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MSGSPEC_PATH = re.compile(r" - at `\$(.*)`$")


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load and validate a config file (``None``: defaults only), then apply environment overrides."""
    env = os.environ if env is None else env
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        raw = _interpolate(raw, env, source, ())
    _validate(raw, source)
    _apply_env_overrides(raw, env)
    return _validate(raw, "environment")


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build a config from a plain mapping (used by tests and programmatic callers)."""
    return _validate(dict(data), "<dict>")


def to_dict(config: Config, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The config as plain builtins, with secrets replaced by ``***`` unless asked otherwise."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    if mask_secrets:
        for dotted in SECRET_KEYS:
            section, key = dotted.split(".")
            value = data[section].get(key)
            if value:
                data[section][key] = [MASK] * len(value) if isinstance(value, list) else MASK
        for entry in data["controller"]["keys"]:
            for secret in ("key", "key_sha256"):
                if entry.get(secret):
                    entry[secret] = MASK
        data["nats"]["url"] = redact_url(data["nats"]["url"])
        data["tracing"]["endpoint"] = redact_url(data["tracing"]["endpoint"])
    cleaned: dict[str, Any] = _drop_none(data)
    return cleaned


_URL_CREDENTIALS = re.compile(r"(^|,|//)([^/@,\s]+)@")


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list of URLs) with ``user:password@`` / ``token@`` shown as ``***@``."""
    return _URL_CREDENTIALS.sub(lambda match: f"{match.group(1)}{MASK}@", url)


def _drop_none(value: Any) -> Any:
    """TOML has no null: leave unset optional keys out."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _interpolate(value: Any, env: Mapping[str, str], source: str, path: tuple[str, ...]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of the parsed TOML."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, source, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, source, (*path, str(i))) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: {_dotted(list(path))}: environment variable ${{{name}}} is not set")

    return _INTERPOLATION.sub(substitute, value)


def _validate(raw: dict[str, Any], source: str) -> Config:
    """Convert builtins to :class:`Config`, turning msgspec's error into one clear line."""
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, raw, source)) from None


def _describe(exc: msgspec.ValidationError, raw: dict[str, Any], source: str) -> str:
    """Rewrite ``Expected `int`, got `str` - at `$.nats.embedded.port``` as a config error line."""
    message = str(exc)
    match = _MSGSPEC_PATH.search(message)
    path = match.group(1) if match else ""
    message = _MSGSPEC_PATH.sub("", message)
    keys = [k for k in re.split(r"\.|\[(\d+)\]", path.replace("[...]", ".\0")) if k]
    keys = _resolve_table_keys(["..." if k == "\0" else k for k in keys], raw)
    unknown = re.match(r"Object contains unknown field `(.+)`", message)
    if unknown:
        keys.append(unknown.group(1))
        allowed = ", ".join(_field_names_at(keys[:-1]))
        return f"{source}: {_dotted(keys)}: unknown key (expected one of: {allowed})"
    missing = re.match(r"Object missing required field `(.+)`", message)
    if missing:
        keys.append(missing.group(1))
        return f"{source}: {_dotted(keys)}: required key is missing"
    value = _lookup(raw, keys)
    return f"{source}: {_dotted(keys)}: {_expected_text(message, keys)}, got {json.dumps(value, default=str)}"


def _resolve_table_keys(keys: list[str], raw: dict[str, Any]) -> list[str]:
    """msgspec says ``[...]`` for a key of a free-form table (``metrics.settings``): find the key whose value
    is invalid, so the message can name it (``*`` if it cannot be found)."""
    while "..." in keys:
        at = keys.index("...")
        table, table_type = _lookup(raw, keys[:at]), _type_of(keys[:at])
        bad = None
        if isinstance(table, dict) and table_type is not None:
            for key, value in table.items():
                try:
                    msgspec.convert({key: value}, table_type)
                except msgspec.ValidationError:
                    bad = str(key)
                    break
        keys = [*keys[:at], bad or "*", *keys[at + 1 :]]
    return keys


def _type_of(keys: list[str]) -> Any:
    """The declared type at a key path, through Structs, tables (``dict``) and arrays."""
    tp: Any = Config
    for key in keys:
        if isinstance(tp, type) and issubclass(tp, Struct):
            info = {f.encode_name: f for f in msgspec.structs.fields(tp)}.get(key)
            if info is None:
                return None
            tp = info.type
        elif getattr(tp, "__origin__", None) in (dict, list):
            tp = tp.__args__[-1]
        else:
            return None
    return tp


def _expected_text(message: str, keys: list[str]) -> str:
    """Turn msgspec's ``Expected `int` >= 1, got ...`` into ``expected int in 1..65535``."""
    field_type = _type_at(keys)
    choices = getattr(field_type, "__args__", ()) if getattr(field_type, "__origin__", None) is Literal else ()
    if message.startswith("Invalid enum value") and choices:
        return "expected one of " + ", ".join(json.dumps(c) for c in choices)
    expected = re.sub(r"`", "", message.split(", got ")[0])
    expected = expected[0].lower() + expected[1:] if expected else "a valid value"
    return _range_text(expected, keys)


def _range_text(expected: str, keys: list[str]) -> str:
    """Say ``expected int in 1..65535`` instead of msgspec's one-sided bound when both bounds exist."""
    field_type = _type_at(keys)
    metas = getattr(field_type, "__metadata__", ()) if field_type is not None else ()
    for meta in metas:
        if isinstance(meta, Meta) and meta.ge is not None and meta.le is not None:
            base = "int" if "int" in expected else "number"
            return f"expected {base} in {meta.ge}..{meta.le}"
    return expected


def _dotted(keys: list[str]) -> str:
    """Render a key path as ``workers.static[0].name``."""
    text = ""
    for key in keys:
        text += f"[{key}]" if key.isdigit() else (f".{key}" if text else key)
    return text or "(top level)"


def _lookup(raw: Any, keys: list[str]) -> Any:
    for key in keys:
        if isinstance(raw, dict):
            raw = raw.get(key)
        elif isinstance(raw, list) and key.isdigit() and int(key) < len(raw):
            raw = raw[int(key)]
        else:
            return None
    return raw


def _struct_at(keys: list[str]) -> type[Struct] | None:
    """The Struct class that describes the table at ``keys`` (list indices skipped)."""
    cls: type[Struct] = Config
    for key in keys:
        if key.isdigit():
            continue
        info = {f.encode_name: f for f in msgspec.structs.fields(cls)}.get(key)
        if info is None:
            return None
        inner = _struct_type(info.type)
        if inner is None:
            return None
        cls = inner
    return cls


def _type_at(keys: list[str]) -> Any:
    parent = _struct_at([k for k in keys[:-1]])
    if parent is None or not keys:
        return None
    fields = {f.encode_name: f for f in msgspec.structs.fields(parent)}
    info = fields.get(keys[-1])
    return info.type if info else None


def _struct_type(tp: Any) -> type[Struct] | None:
    """Return the Struct class inside ``tp`` (itself or ``list[Struct]``), else ``None``."""
    if isinstance(tp, type) and issubclass(tp, Struct):
        return tp
    for arg in getattr(tp, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, Struct):
            return arg
    return None


def _field_names_at(keys: list[str]) -> list[str]:
    cls = _struct_at(keys)
    return [f.encode_name for f in msgspec.structs.fields(cls)] if cls else []


def env_overrides() -> dict[str, tuple[str, ...]]:
    """Map every supported ``MLXCLUSTER_...`` variable name to the key path it sets."""
    names: dict[str, tuple[str, ...]] = {}

    def walk(cls: type[Struct], path: tuple[str, ...]) -> None:
        for info in msgspec.structs.fields(cls):
            sub = (*path, info.encode_name)
            if isinstance(info.type, type) and issubclass(info.type, Struct):
                walk(info.type, sub)
            elif _struct_type(info.type) is None:
                names[ENV_PREFIX + "_".join(sub).upper()] = sub

    walk(Config, ())
    return names


def _apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Set each key named by a ``MLXCLUSTER_<SECTION>_<KEY>`` variable, parsed for the key's type."""
    for name, path in env_overrides().items():
        if name not in env:
            continue
        value = _parse_env_value(env[name], path, name)
        table = raw
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = value


def _parse_env_value(text: str, path: tuple[str, ...], name: str) -> Any:
    """Turn an environment string into the builtin that the key's type wants."""
    field_type = _type_at(list(path))
    origin = getattr(field_type, "__origin__", None)
    if origin is dict:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"env {name}: {'.'.join(path)}: invalid JSON object: {exc}") from None
    wants_list = origin is list or "list[" in str(field_type)
    if wants_list:
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                return json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"env {name}: {'.'.join(path)}: invalid JSON list: {exc}") from None
        return [item.strip() for item in stripped.split(",") if item.strip()]
    try:
        return msgspec.convert(text, field_type, strict=False) if field_type is not None else text
    except msgspec.ValidationError as exc:
        expected = _expected_text(_MSGSPEC_PATH.sub("", str(exc)), list(path))
        raise ConfigError(f"env {name}: {'.'.join(path)}: {expected}, got {json.dumps(text)}") from None
