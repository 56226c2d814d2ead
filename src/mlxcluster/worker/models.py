"""Which model a worker serves, where its files are, and under what name.

A model is named by ``worker.model``: unset (the demo model, prepared on first use), the name of a model
in the models dir, a local model dir, or a Hugging Face repo id (``org/name[@revision]`` or a hub URL).
:func:`resolve_model` turns any of them into a local dir *before* anything is loaded, so placement reads
the real weights and a model that cannot be had fails at once with one line: a repo id comes from the
Hugging Face cache, downloaded into it first when it is missing (unless ``HF_HUB_OFFLINE`` is set).
It takes one model and no config, so whatever serves several models can call it per model.

The demo model is served as ``SmolLM2-135M-Instruct`` whichever variant (f32 on CPU, q4 on Apple
silicon) a machine prepared, so a mixed fleet serves one model name; a repo id is served under its id.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

from mlxcluster.errors import NodeError

log = logging.getLogger(__name__)


class ResolvedModel(NamedTuple):
    """A model's local dir, the name it is served under, and where it was found."""

    path: str
    served_name: str
    source: str = "local"
    """``demo``, ``models-dir``, ``local`` (a dir named by its path) or ``hf-cache``."""


def resolve_model(name: str | None, models_dir: Path, *, download: bool = True) -> ResolvedModel:
    """The local dir of model ``name`` and its served name; :class:`NodeError` (one line) when it cannot be had.

    :param download: fetch a repo id missing from the Hugging Face cache (``False``: the cache only).
    """
    from mlxcluster.models.demo import DEMO_BASE_NAME, DemoModelError, ensure_demo_model

    if name is None or name == DEMO_BASE_NAME:
        log.info("no worker.model set: using the demo model %s", DEMO_BASE_NAME)
        try:
            return ResolvedModel(str(ensure_demo_model(models_dir)), DEMO_BASE_NAME, "demo")
        except (DemoModelError, OSError) as exc:
            raise NodeError(f"the demo model {DEMO_BASE_NAME}: {exc}") from None
    installed = models_dir / name
    if "/" not in name and installed.is_dir():
        return ResolvedModel(str(installed), name, "models-dir")
    local = Path(name).expanduser()
    if local.is_dir():
        return ResolvedModel(str(local.resolve()), local.name)
    return _resolve_hub_model(name, models_dir, download=download)


def _resolve_hub_model(name: str, models_dir: Path, *, download: bool) -> ResolvedModel:
    from mlxcluster.models.hub import (
        HubError,
        cached_snapshot,
        download_snapshot,
        hub_offline,
        looks_like_hub_ref,
        not_cached,
        parse_hub_ref,
    )

    if not looks_like_hub_ref(name):
        where = f"no model {name!r} in the models dir ({models_dir})" if "/" not in name else f"no model dir {name}"
        raise NodeError(
            f"{where}: give a model dir, a name from `mlxcluster models list`, or a Hugging Face repo id ORG/NAME"
        )
    try:
        ref = parse_hub_ref(name)
        snapshot = cached_snapshot(ref)
        if snapshot is not None:
            log.info("model %s: %s (Hugging Face cache)", ref, snapshot)
            return ResolvedModel(str(snapshot), ref.repo_id, "hf-cache")
        if hub_offline():
            raise HubError(not_cached(ref, "HF_HUB_OFFLINE is set"))
        if not download:
            raise HubError(not_cached(ref, "it is not downloaded here"))
        log.info("model %s is not in the Hugging Face cache: downloading it (resumable)", ref)
        started = time.monotonic()
        snapshot = download_snapshot(ref)
        log.info("model %s downloaded in %.0f s: %s", ref, time.monotonic() - started, snapshot)
    except HubError as exc:
        raise NodeError(str(exc)) from None
    return ResolvedModel(str(snapshot), ref.repo_id, "hf-cache")
