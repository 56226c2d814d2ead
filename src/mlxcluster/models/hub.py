"""Models from the Hugging Face hub, kept in the Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``).

A reference is a repo id (``org/name``), optionally with a revision (``org/name@rev``), or a hub URL
(``https://huggingface.co/org/name``, ``.../tree/rev``). :func:`cached_snapshot` finds a complete
snapshot without any network; :func:`download_snapshot` fetches one with huggingface_hub's own
``snapshot_download`` (resumable, its own progress bars), limited to the files mlx-lm loads
(:data:`ALLOW_PATTERNS`, mlx-lm's own list). Every failure is a :class:`HubError` whose message is one
line naming the model and the fix. huggingface_hub is imported only when a function runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .registry import ModelInfo, model_info

ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
"""The files of a repo that mlx-lm loads: ``mlx_lm.utils.DEFAULT_ALLOW_PATTERNS`` (a test keeps them equal),
copied so that resolving a model does not import MLX."""

_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[^/?#]+/[^/?#]+)(?P<rest>[^?#]*)")


class HubError(Exception):
    """A hub model cannot be had; the message is one line naming the model and the fix."""


@dataclass(frozen=True, slots=True)
class HubRef:
    """A model on the hub: its repo id and, optionally, a revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def looks_like_hub_ref(text: str) -> bool:
    """Whether ``text`` is meant as a hub model (a URL, or ``org/name`` with an optional ``@rev``), not a path."""
    if _URL.match(text):
        return True
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return False
    return text.split("@", 1)[0].count("/") == 1


def parse_hub_ref(text: str) -> HubRef:
    """``org/name``, ``org/name@rev`` or a hub URL as a :class:`HubRef`; :class:`HubError` when it is none."""
    text = text.strip()
    match = _URL.match(text)
    if match:
        repo_id, rest = match["repo"], match["rest"].strip("/")
        revision = None
        if rest.startswith(("tree/", "blob/", "resolve/")):
            revision = rest.split("/")[1] or None
        elif rest:
            raise HubError(f"{text} is not a model's page on the hub; use https://huggingface.co/ORG/NAME")
    elif text.startswith(("http://", "https://")):
        raise HubError(f"{text} is not a Hugging Face hub URL; use https://huggingface.co/ORG/NAME or ORG/NAME")
    else:
        repo_id, _, rev = text.partition("@")
        revision = rev or None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils._validators import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("a model's repo id is ORG/NAME")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"{text!r} is not a hub repo id ({_first_line(exc)}); use ORG/NAME[@REVISION]") from None
    return HubRef(repo_id, revision)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache in use: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids reaching the hub."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(ref: HubRef) -> Path | None:
    """The complete local snapshot of ``ref`` in the cache, or ``None``; never uses the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=ALLOW_PATTERNS, local_files_only=True)
        )
    except LocalEntryNotFoundError:  # IncompleteSnapshotError included: some wanted files are missing
        return None
    return path if is_model_snapshot(path) else None


def is_model_snapshot(path: Path) -> bool:
    """A snapshot mlx-lm can load: ``config.json`` and at least one weights file."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def download_snapshot(ref: HubRef) -> Path:
    """Download ``ref`` into the cache (resuming what an earlier try left) and return its snapshot dir.

    huggingface_hub draws its own progress bars on a terminal (none off one, or with
    ``HF_HUB_DISABLE_PROGRESS_BARS=1``).
    """
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:
        raise HubError(describe_failure(ref, exc)) from None
    if not is_model_snapshot(snapshot):
        raise HubError(
            f"{ref} has no config.json and *.safetensors weights: not an mlx-lm model "
            "(mlx-community/... repos are; convert others with mlx_lm.convert)"
        )
    return snapshot


def not_cached(ref: HubRef, why: str) -> str:
    """One line for a model missing from the cache that cannot be downloaded now (``why``), with the fix."""
    return (
        f"model {ref} is not in the Hugging Face cache ({hub_cache_dir()}) and {why}; "
        f"run `mlxcluster models pull {ref}` where the hub is reachable, or use a local model dir"
    )


def describe_failure(ref: HubRef, exc: BaseException) -> str:
    """One line for a failed download of ``ref``: what went wrong and what to do."""
    from huggingface_hub import errors

    pull = f"`mlxcluster models pull {ref}`"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{ref.repo_id} has no revision {ref.revision!r} on the hub; name a branch, tag or commit that exists"
    if isinstance(exc, errors.GatedRepoError):
        return f"{ref.repo_id} is gated: accept its terms on huggingface.co and set HF_TOKEN, then run {pull}"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"no model {ref.repo_id} on the hub (or it is private: set HF_TOKEN); check the name"
    if isinstance(exc, errors.IncompleteSnapshotError):
        return (
            f"the cached copy of {ref} is incomplete and the hub cannot be reached to finish it; "
            f"run {pull} where the hub is reachable"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub cannot be reached ({_cause(exc)})"
        return not_cached(ref, why)
    if isinstance(exc, OSError):
        return f"cannot download {ref}: {_first_line(exc)}"
    return f"cannot download {ref}: {type(exc).__name__}: {_first_line(exc)}"


def cached_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    """The model repos in the Hugging Face cache that hold a loadable snapshot, by repo id.

    One entry per repo: the snapshot ``main`` points at, else the newest; its size is what that snapshot's
    files take (``size_bytes``), its ``source`` ``hf-cache``.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:  # the cache dir passed, not scan_cache_dir's default: huggingface_hub binds that once, at import
        info = scan_cache_dir(cache_dir or hub_cache_dir())
    except CacheNotFound:
        return []
    found: list[ModelInfo] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        for revision in revisions:
            described = model_info(revision.snapshot_path)
            if described is None or not is_model_snapshot(revision.snapshot_path):
                continue
            refs = sorted(revision.refs)
            name = repo.repo_id if "main" in refs else f"{repo.repo_id}@{(refs or [revision.commit_hash[:12]])[0]}"
            found.append(
                ModelInfo(
                    name=name,
                    path=revision.snapshot_path,
                    size_bytes=described.size_bytes,
                    source="hf-cache",
                    dtype=described.dtype,
                    complete=True,
                )
            )
            break
    return sorted(found, key=lambda m: m.name)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        return "no network"
    return f"{type(cause).__name__}: {_first_line(cause)}"[:160]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
