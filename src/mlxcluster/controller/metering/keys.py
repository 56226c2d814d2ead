"""API keys as records: who is calling, what they may use, and what they used.

``[[controller.keys]]`` entries (and, for compatibility, each plain ``controller.api_keys`` string, as an
admin key without limits) become :class:`ApiKey` records in a :class:`KeyRing`. The ring holds only the
SHA-256 digest of each key, never the value, so a key cannot leak from a response, a log line or a
``repr``. A presented key is hashed and looked up by digest.

With shared state the ring also follows the keys bucket (:mod:`mlxcluster.controller.shared.keystore`):
:meth:`KeyRing.apply` adds or replaces a key, newer revisions only; a revoked key stays listed but is never
found by value, and an expired one is refused. Keys from this controller's own config file always win over
bucket records of the same name, and a controller honours only its own file's keys: a record seeded from
another controller's file (``source = "config"``) is not taken, so a key removed from a file and restarted
without is refused there, as before keys were shared.

The key of the request being served is in the context variable :data:`CURRENT_KEY`, set by the auth
middleware; the dispatcher's request meter reads it, so every :class:`RequestFinished` event names its key.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from msgspec import Struct

from mlxcluster.config import ApiKeyEntry, ConfigError, ControllerSection

CURRENT_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlxcluster_current_key", default=None)
"""Name of the API key of the request this task serves (``None``: no keys configured)."""


def key_digest(value: str) -> bytes:
    """The SHA-256 digest of a key value (what ``key_sha256`` holds, in hex)."""
    return hashlib.sha256(value.strip().encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key, without its value."""

    name: str
    digest: bytes = field(repr=False)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    models: frozenset[str] = frozenset()
    admin: bool = False
    expires_at: float | None = None
    """Unix time from which the key is refused (``None``: never)."""
    revoked: bool = False
    source: str = "config"
    """``config`` (a config file) or ``api`` (created at runtime)."""
    created_at: float | None = None
    revision: int = 0
    """The keys bucket's revision this record came from (0: this controller's config)."""

    def allows_model(self, model: str) -> bool:
        """Whether this key may use ``model`` (an empty list allows every model)."""
        return not self.models or model in self.models

    @property
    def limited(self) -> bool:
        """Whether any rate limit applies to this key."""
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None


class KeyUsage(Struct, kw_only=True):
    """What one key did since the controller started."""

    requests: int = 0
    """Requests that reached the dispatcher."""
    errors: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0
    """Requests refused with 429."""
    last_used: float | None = None
    """Wall-clock time of the last request (``None``: never used)."""


class KeyRing:
    """The configured keys, looked up by digest, and each key's usage."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_digest: dict[bytes, ApiKey] = {}
        self._by_name: dict[str, ApiKey] = {}
        for key in keys:
            self._by_digest[key.digest] = key
            self._by_name[key.name] = key
        self.usage: dict[str, KeyUsage] = {name: KeyUsage() for name in self._by_name}
        self._config_names = frozenset(self._by_name)

    @classmethod
    def from_config(cls, config: ControllerSection, env: Mapping[str, str] | None = None) -> KeyRing:
        """Build the ring from ``controller.api_keys`` and ``[[controller.keys]]``; errors name the entry."""
        env = os.environ if env is None else env
        keys: list[ApiKey] = []
        for index, value in enumerate(config.api_keys):
            if not value.strip():
                raise ConfigError(f"controller.api_keys[{index}]: an API key cannot be empty")
            keys.append(ApiKey(name=f"api_keys[{index}]", digest=key_digest(value), admin=True))
        for index, entry in enumerate(config.keys):
            keys.append(_from_entry(entry, f"controller.keys[{index}]", env))
        names: set[str] = set()
        digests: set[bytes] = set()
        for key in keys:
            if key.name in names:
                raise ConfigError(f"controller.keys: two keys are named {key.name!r}; names must be unique")
            if key.digest in digests:
                raise ConfigError(f"controller.keys: key {key.name!r} has the same value as another key")
            names.add(key.name)
            digests.add(key.digest)
        return cls(keys)

    def __bool__(self) -> bool:
        """Whether any key exists (revoked ones included: revoking the last key does not open the API)."""
        return bool(self._by_name)

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key whose value is ``presented``, or ``None`` (also for an expired key)."""
        if not presented.strip():
            return None
        key = self._by_digest.get(key_digest(presented))
        if key is not None and key.expires_at is not None and key.expires_at <= time.time():
            return None
        return key

    def config_names(self) -> frozenset[str]:
        """Names of the keys of this controller's config file."""
        return self._config_names

    def apply(self, key: ApiKey) -> bool:
        """Add or replace a key from the shared bucket; ``False`` (ignored) for an older revision than the one
        held, a name of this controller's config file, or a key seeded from a config file."""
        if key.name in self._config_names or key.source == "config":
            return False
        held = self._by_name.get(key.name)
        if held is not None:
            if held.revision > key.revision:
                return False
            if self._by_digest.get(held.digest) is held:
                del self._by_digest[held.digest]
        self._by_name[key.name] = key
        if not key.revoked:
            self._by_digest[key.digest] = key
        self.usage.setdefault(key.name, KeyUsage())
        return True

    def remove(self, name: str) -> None:
        """Forget a key deleted from the shared bucket (config keys stay)."""
        if name in self._config_names:
            return
        held = self._by_name.pop(name, None)
        if held is not None and self._by_digest.get(held.digest) is held:
            del self._by_digest[held.digest]

    def get(self, name: str) -> ApiKey | None:
        """The key named ``name``."""
        return self._by_name.get(name)

    def keys(self) -> list[ApiKey]:
        """Every key, in configuration order."""
        return list(self._by_name.values())

    def record(self, name: str | None, *, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one finished request against key ``name``."""
        usage = self.usage.get(name) if name is not None else None
        if usage is None:
            return
        usage.requests += 1
        usage.errors += status == "error"
        usage.cancelled += status == "cancelled"
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        usage.last_used = time.time()

    def record_rate_limited(self, name: str) -> None:
        """Count one request of key ``name`` refused with 429."""
        usage = self.usage.get(name)
        if usage is not None:
            usage.rate_limited += 1
            usage.last_used = time.time()


def _from_entry(entry: ApiKeyEntry, where: str, env: Mapping[str, str]) -> ApiKey:
    given = [name for name in ("key", "key_env", "key_sha256") if getattr(entry, name) is not None]
    if len(given) != 1:
        raise ConfigError(f"{where}: give exactly one of key, key_env or key_sha256 (got {', '.join(given) or 'none'})")
    if entry.key is not None:
        if not entry.key.strip():
            raise ConfigError(f"{where}.key: an API key cannot be empty")
        digest = key_digest(entry.key)
    elif entry.key_env is not None:
        value = env.get(entry.key_env, "")
        if not value.strip():
            raise ConfigError(f"{where}.key_env: environment variable {entry.key_env} is not set or empty")
        digest = key_digest(value)
    else:
        digest = bytes.fromhex(entry.key_sha256 or "")
    return ApiKey(
        name=entry.name,
        digest=digest,
        rpm=entry.rpm,
        tpm=entry.tpm,
        max_concurrent=entry.max_concurrent,
        models=frozenset(entry.models),
        admin=entry.admin,
    )
