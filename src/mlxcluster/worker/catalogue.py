"""A worker's catalogue: every model it may serve, loaded or not, and what placement needs to know of each.

Built at start from ``worker.model`` (loaded at start), ``worker.models`` (dirs, names in the models dir,
Hugging Face repo ids) and, with ``worker.scan_models_dir``, every model dir of the models dir. Each entry is
resolved from local files only (a repo id from the Hugging Face cache): nothing downloads while the catalogue
is built. A repo id not downloaded yet stays in the catalogue with unknown size (source ``hub``) and is
downloaded when it is first loaded. An entry that names nothing (no such dir, not a repo id) ends the start
with one line, as a bad ``worker.model`` does.

The echo engine loads nothing: its catalogue entries are names, sized from a dir when they name one (so
control-plane tests can budget real sizes without loading anything).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from mlxcluster.config import Config
from mlxcluster.errors import NodeError
from mlxcluster.protocol import CatalogueModel
from mlxcluster.worker.models import ResolvedModel, resolve_model
from mlxcluster.worker.placement import model_shape

log = logging.getLogger(__name__)

Facts = Callable[[str], CatalogueModel]
"""What a model dir says of itself (weights, KV per token, context length), named later."""


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One model of the catalogue: its served name, what names it, and its local dir once known."""

    name: str
    spec: str | None
    """What ``resolve_model`` takes (``None``: the demo model)."""
    path: str | None
    """The local dir; ``None`` until a repo id is downloaded (or for an echo name)."""
    facts: CatalogueModel


def model_facts(path: str, name: str, source: str) -> CatalogueModel:
    """What placement needs from a local model dir: weight bytes, KV bytes per token, the context length; an
    embedding model (sentence-transformers files) is of kind ``embedding`` with its vector length."""
    from mlxcluster.worker.embedding_spec import NotAnEmbeddingModel, is_embedding_dir, read_spec
    from mlxcluster.worker.kv_size import kv_size
    from mlxcluster.worker.vision import is_vision_model

    shape = model_shape(path)
    vision = is_vision_model(path)
    weights = shape.weights_bytes if shape is not None else 0
    if is_embedding_dir(path):
        dimensions = max_seq_length = 0
        try:
            spec = read_spec(path)
            dimensions, max_seq_length = spec.dimensions, spec.max_seq_length
        except NotAnEmbeddingModel as exc:  # listed; its load says why it cannot serve
            log.warning("embedding model %s: %s", name, exc)
        context = 0
        try:
            kv = kv_size(path)
            context = kv.context_length if kv is not None else 0
        except (OSError, ValueError):
            pass
        if max_seq_length:  # sentence-transformers' limit, below the model's own
            context = min(context, max_seq_length) if context else max_seq_length
        return CatalogueModel(
            name=name,
            kind="embedding",
            source=source,
            weights_bytes=weights,
            context_length=context,
            dimensions=dimensions,
        )
    try:
        kv = kv_size(path)
    except (OSError, ValueError) as exc:
        log.warning("model %s: cannot tell its KV size (%s)", name, exc)
        kv = None
    if kv is None:
        return CatalogueModel(name=name, source=source, weights_bytes=weights, vision=vision)
    return CatalogueModel(
        name=name,
        vision=vision,
        source=source,
        weights_bytes=weights,
        kv_bytes_per_token=kv.bytes_per_token,
        kv_fixed_bytes=kv.capped_fixed_bytes,
        context_length=kv.context_length,
    )


class Catalogue:
    """The models one worker may serve, by served name, in the order they were configured."""

    def __init__(self, entries: Iterable[CatalogueEntry] = ()) -> None:
        self._entries: dict[str, CatalogueEntry] = {}
        for entry in entries:
            self._entries.setdefault(entry.name, entry)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: CatalogueEntry) -> None:
        """Add ``entry`` unless a model of that name is already in."""
        self._entries.setdefault(entry.name, entry)

    def get(self, name: str) -> CatalogueEntry | None:
        """The entry served as ``name``, or ``None``."""
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Served names, in catalogue order."""
        return list(self._entries)

    def models(self) -> list[CatalogueModel]:
        """The wire form of every entry (heartbeats, registration)."""
        return [entry.facts for entry in self._entries.values()]

    def resolved(self, name: str, model: ResolvedModel) -> CatalogueEntry:
        """Record that ``name`` now has a local dir (a repo id downloaded at load); the updated entry."""
        entry = self._entries[name]
        facts = model_facts(model.path, name, model.source)
        updated = self._entries[name] = replace(entry, path=model.path, facts=facts)
        return updated


def build_catalogue(config: Config, start_model: ResolvedModel | None = None) -> Catalogue:
    """The catalogue of this worker (see the module's docstring); ``start_model``: ``worker.model`` resolved."""
    worker = config.worker
    echo = worker.engine == "echo"
    entries: list[CatalogueEntry] = []
    if start_model is not None:
        entries.append(
            CatalogueEntry(
                start_model.served_name,
                worker.model,
                start_model.path,
                model_facts(start_model.path, start_model.served_name, start_model.source),
            )
        )
    elif echo and worker.model:
        entries.append(_echo_entry(worker.model))
    specs = list(worker.models)
    if worker.scan_models_dir:
        from mlxcluster.models.registry import list_models

        specs += [info.name for info in list_models(config.models_dir)]
    for spec in specs:
        entries.append(_echo_entry(spec) if echo else _entry(spec, config.models_dir))
    return Catalogue(entries)


def _entry(spec: str, models_dir: Path) -> CatalogueEntry:
    """A catalogue entry from local files only; a repo id not in the cache is listed, to download at load."""
    from mlxcluster.models.hub import looks_like_hub_ref, parse_hub_ref

    try:
        model = resolve_model(spec, models_dir, download=False)
    except NodeError:
        if not looks_like_hub_ref(spec):
            raise
        name = parse_hub_ref(spec).repo_id
        return CatalogueEntry(name, spec, None, CatalogueModel(name=name, source="hub"))
    return CatalogueEntry(model.served_name, spec, model.path, model_facts(model.path, model.served_name, model.source))


def _echo_entry(spec: str) -> CatalogueEntry:
    path = Path(spec).expanduser()
    if path.is_dir():
        return CatalogueEntry(path.name, spec, str(path), model_facts(str(path), path.name, "local"))
    return CatalogueEntry(spec, spec, None, CatalogueModel(name=spec, source="echo"))
