"""The commented default ``cluster.toml`` written by ``mlxcluster config init``.

Every value here equals the built-in default (a test checks it), so the file documents the defaults.
"""

DEFAULT_CONFIG_TOML = """\
# mlxcluster configuration. Every key is optional: an empty file means "all defaults".
# Any key can be overridden by an environment variable MLXCLUSTER_<SECTION>_<KEY>,
# e.g. MLXCLUSTER_CONTROLLER_PORT=9000 or MLXCLUSTER_NATS_EMBEDDED_PORT=4333.
# Strings may use ${VAR} or ${VAR:-default} to read the environment.

[cluster]
mode = "dual"                      # controller | worker | dual (embedded NATS + controller + workers)

[nats]
mode = "embedded"                  # embedded: start nats-server ourselves; external: connect to url
url = "nats://127.0.0.1:4222"      # several servers of a NATS cluster: comma-separated
# user = "mlx"                     # user/password auth (the embedded server is configured with it too)
# password = "${NATS_PASSWORD}"
# token = "${NATS_TOKEN}"          # or token auth
# creds = "/etc/mlxcluster/user.creds"
max_payload = 8388608              # bytes; larger prompts are refused with HTTP 413
subject_prefix = "mlxcluster"
max_reconnect_attempts = -1        # -1: forever
reconnect_time_wait_ms = 1000      # first reconnect delay; doubles (with jitter) per failure
reconnect_max_wait_ms = 5000       # the cap of that backoff
connect_timeout_ms = 2000
randomize_servers = true           # false: try url's servers in the order given (list the local one first)

[nats.tls]
enabled = false
# ca_file = "ca.pem"
# cert_file = "client.pem"
# key_file = "client-key.pem"
verify = true

[nats.embedded]
host = "127.0.0.1"
port = 4222
http_port = 8222                   # nats-server monitoring; 0 disables it
http_host = "127.0.0.1"            # monitoring stays on loopback even when host opens 4222 (it has no auth)
jetstream = true                   # keys and usage shared by every controller live in JetStream
# store_dir = "/var/lib/mlxcluster/jetstream"  # default: $XDG_DATA_HOME/mlxcluster/jetstream (~/.local/share/...)
log_level = "info"                 # debug | info | warning | error
start_timeout_s = 5.0
insecure = false                   # true: allow a non-loopback host without NATS auth (refused otherwise)
# users_file = "nats-users.json"   # NATS users per role with permissions (mlxcluster config init --secure)

[controller]
bind = "127.0.0.1"                 # use 0.0.0.0 to serve other machines (needs API keys, or insecure = true)
port = 8080
# processes = 2                    # controller processes sharing this port; default min(cores, 4), 1 in dual mode
api_keys = []                      # plain keys (admin, no limits); "Authorization: Bearer <key>" on /v1 and /api
insecure = false                   # true: allow a non-loopback bind without API keys (refused otherwise)
shared_state = true                # keys and usage in NATS JetStream (needs nats-server -js); false: per controller
recent_requests = 200              # finished requests kept for /api/cluster/requests
cors = []                          # allowed origins, e.g. ["https://example.org"] or ["*"]
max_body_bytes = 4194304
first_token_timeout_s = 30.0
accept_timeout_s = 3.0             # no Accepted from a worker within this: try another
request_timeout_s = 600.0
max_attempts = 3                   # tries on different workers before the first token
drain_timeout_s = 30.0
migration_limit = 2                # moves of a started stream to another worker when its worker is lost
stall_timeout_s = 15.0             # mid-stream silence that means the worker is lost (keep above 5)
default_max_tokens = 32768         # answer length when the client sets none: the context's room, at most this
image_fetch = false                # fetch http(s) image URLs for vision models (off: data: URLs only)
image_fetch_hosts = []             # hosts image URLs may name, e.g. ["images.example.org"]; ["*"]: any
image_fetch_private = false        # also fetch from loopback / private / link-local addresses (a LAN image server)
image_fetch_max_bytes = 8388608
image_fetch_timeout_s = 10.0

# API keys as records (any number of entries):
# [[controller.keys]]
# name = "team-a"                  # shown in usage, the request monitor, the access log and metrics
# key_env = "TEAM_A_API_KEY"       # or key = "sk-...", or key_sha256 = "<hex sha256 of the key>"
# models = []                      # models the key may use (empty: all)
# rpm = 60                         # requests per minute; tpm = tokens per minute; max_concurrent = at once
# admin = false                    # admin keys manage workers and read /api/cluster/keys

[worker]
# id = "mac-studio-1"              # default: hostname + pid
# model = "mlx-community/..."      # loaded at start (pinned): a model dir or repo id; default: the demo model
# models = ["mlx-community/Qwen3-4B-4bit", "~/models/gemma-3-4b"]  # the catalogue: loaded on first request
# scan_models_dir = false          # also every model dir of [models] dir
keep_alive = "5m"                  # an idle model loaded on demand unloads after this (-1: never, 0: at once)
# pinned = []                      # models never unloaded when idle
# model_keep_alive = { "Qwen3-4B-4bit" = "1h" }   # a model's own keep_alive
engine = "mlx"                     # mlx | echo (no model, for tests and benchmarks)
max_concurrent = 8                 # requests generated together (continuous batching)
max_queue = 64                     # waiting requests beyond which new ones are refused
echo_token_delay_ms = 0.0
echo_prompt_cache_entries = 0      # echo engine only: a SIMULATED prompt cache of this many conversations
drain_timeout_s = 30.0
prefill_step_size = 256            # prompt tokens per prefill step with no stream decoding (and at most)
step_budget_ms = 250.0             # while streams decode: the time one step may take (0: no budget)
speculative_tokens = 8             # prompt-lookup drafts per greedy request and step (0: no speculation)
draft_model = ""                   # a draft model with the same tokenizer as model (dir, name or repo id; "": none)
embedding_batch_tokens = 8192      # embedding models: padded tokens per forward at most
embedding_batch_wait_ms = 2.0      # embedding models: wait for more inputs once a batch has some
image_max_pixels = 25000000        # vision models: an image with more pixels is refused (400)
# prompt_cache_bytes = 2147483648  # KV cache kept for reuse by later prompts; default 1/8 of memory, 0: off
# memory_budget_bytes = 51539607552  # weights + prompt cache + running requests' KV (default: 75% of RAM)

[worker.thinking_budgets]          # reasoning tokens per effort when a request gives no budget (then </think>)
low = 1024
medium = 4096
high = 16384

[worker.group]                     # several workers serving one model together (mx.distributed)
# name = "big"                     # set on every member; rank 0 registers the group under this name
size = 1                           # members in the group (tensor: must divide the attention heads)
parallel = "tensor"                # tensor | pipeline
backend = "ring"                   # ring (TCP, any OS) | jaccl (RDMA over Thunderbolt 5, macOS 26.2+)
host = "127.0.0.1"                 # the address this member's ring listens on (e.g. the Thunderbolt bridge)
port = 0                           # 0: a free port
# rank = 0                         # pin this member's rank (default: by member id)
# hostfile = "jaccl-hosts.json"    # use this hostfile as is (JACCL); ranks then come from `rank`
rendezvous_timeout_s = 60.0
# stall_timeout_s = 30.0           # a collective or model step longer than this breaks the group

[discovery]
heartbeat_interval_ms = 2000
offline_timeout_ms = 6000

[workers]
static = []
# [[workers.static]]               # a worker known before it registers
# name = "gpu-box"
# host = "10.0.0.7"
# port = 0
# priority = 10
# tags = ["big"]

[load_balancing]
strategy = "cache_aware"           # see: mlxcluster balancers list
sticky_sessions = false
cache_index_max_entries = 200000   # (prefix digest, worker) pairs the controller indexes at most (LRU)

[load_balancing.cache_aware]       # follow the workers' prompt caches, within load limits
cache_threshold = 0.5              # best holder's share of the prompt below which least loaded wins
balance_abs_threshold = 8          # imbalanced (→ least loaded) when max load - min load > this
balance_rel_threshold = 1.5        # ... and max load > this × min load
load_weight = 0.5                  # score = share held - load_weight × utilization

[logging]
level = "info"                     # debug | info | warning | error
format = "text"                    # text | json
# file = "mlxcluster.log"

[metrics]
exporters = []                     # e.g. ["prometheus", "log"]; see: mlxcluster exporters list
snapshot_interval_s = 5.0          # how often exporters get the cluster's state (gauges, the log line)

[metrics.settings]                 # per exporter: keyword arguments for its factory
# prometheus = { path = "/metrics" }   # no API key on it: keep the controller private or proxy it
# log = { interval_s = 60.0 }
# jsonl = { path = "requests.jsonl" }  # from the mlxcluster-exporter-jsonl plugin

[tracing]                          # OpenTelemetry traces of each request (needs: pip install 'mlxcluster[otel]')
endpoint = ""                      # the OTLP/HTTP collector, e.g. "http://localhost:4318"; empty: tracing off
service_name = "mlxcluster"        # spans' service.name: <this>-controller, <this>-worker
sample_ratio = 1.0                 # share of requests traced; an incoming traceparent's choice wins

[models]
dir = "~/.cache/mlxcluster/models"

[plugins]
paths = []                         # extra directories searched for plugin packages
disabled = []                      # plugin names not to load
"""
