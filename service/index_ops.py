"""Adding, deleting and compacting with the service's settings (model, device, versions kept, segments allowed):
the one place the `xmodal index add|delete|compact` commands and the jobs behind the HTTP routes both call.
Announcing the new version is the caller's (the CLI says to how many replicas; a job records it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.layout import VersionManifest
from service.settings import Settings

if TYPE_CHECKING:
    from models.encoder import Encoder


def add_corpus(
    settings: Settings,
    name: str,
    corpus: Path,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 32,
    memory_budget: int | None = None,
) -> VersionManifest:
    """Encode a corpus's items into a new segment of ``name`` (upserts; tiered compaction past max_segments), its
    index chosen within ``memory_budget`` (bytes; default XMODAL_INDEX_MEMORY_GB)."""
    from indexer.build import add_items
    from indexer.corpus import read_corpus

    items = read_corpus(corpus)
    return add_items(
        indexes_dir=settings.indexes_dir,
        name=name,
        items=items,
        encoder=index_encoder(settings, name),
        batch_size=batch_size,
        use_gpu=settings.device != "cpu",
        progress=progress,
        keep_versions=settings.keep_versions,
        max_segments=settings.max_segments,
        memory_budget=memory_budget if memory_budget is not None else settings.index_memory_bytes,
    )


def index_encoder(settings: Settings, name: str, model: str | None = None) -> Encoder:
    """The encoder of bundle ``model`` if given, else of the model ``name`` was built with (found among the bundles
    by its fingerprint), so that a service serving several models adds to and rebuilds each index with its own;
    XMODAL_MODEL for a new index."""
    from indexer.layout import IndexDir
    from models.bundle import find_bundle
    from models.encoder import Encoder

    index = IndexDir(settings.indexes_dir, name)
    if model is not None:
        return Encoder(settings.all_models_dir / model, device=settings.device, threads=settings.threads)
    if not index.exists():
        return Encoder(settings.model_dir, device=settings.device, threads=settings.threads)
    ref = index.manifest().model
    bundle = find_bundle(settings.all_models_dir, ref.name, ref.fingerprint)
    return Encoder(bundle, device=settings.device, threads=settings.threads)


def delete_ids(settings: Settings, name: str, ids: list[str]) -> tuple[VersionManifest, list[str]]:
    """Tombstone ``ids``; (the version, the ids the index did not hold)."""
    from indexer.lifecycle import delete_items

    return delete_items(settings.indexes_dir, name, ids, keep_versions=settings.keep_versions)


def compact_index(settings: Settings, name: str, memory_budget: int | None = None) -> VersionManifest:
    """Merge every segment of ``name`` into one, deleted rows dropped, its index chosen within ``memory_budget``
    (bytes; default XMODAL_INDEX_MEMORY_GB)."""
    from indexer.lifecycle import compact

    return compact(
        settings.indexes_dir,
        name,
        use_gpu=settings.device != "cpu",
        keep_versions=settings.keep_versions,
        memory_budget=memory_budget if memory_budget is not None else settings.index_memory_bytes,
    )
