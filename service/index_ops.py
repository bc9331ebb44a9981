"""Adding, deleting and compacting with the service's settings (model, device, versions kept, segments allowed):
the one place the `xmodal index add|delete|compact` commands and the jobs behind the HTTP routes both call.
Announcing the new version is the caller's (the CLI says to how many replicas; a job records it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from indexer.layout import VersionManifest
from service.settings import Settings


def add_corpus(
    settings: Settings,
    name: str,
    corpus: Path,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 32,
) -> VersionManifest:
    """Encode a corpus's items into a new segment of ``name`` (upserts; tiered compaction past max_segments)."""
    from indexer.build import add_items
    from indexer.corpus import read_corpus
    from models.encoder import Encoder

    items = read_corpus(corpus)
    return add_items(
        indexes_dir=settings.indexes_dir,
        name=name,
        items=items,
        encoder=Encoder(settings.model_dir, device=settings.device, threads=settings.threads),
        batch_size=batch_size,
        use_gpu=settings.device != "cpu",
        progress=progress,
        keep_versions=settings.keep_versions,
        max_segments=settings.max_segments,
    )


def delete_ids(settings: Settings, name: str, ids: list[str]) -> tuple[VersionManifest, list[str]]:
    """Tombstone ``ids``; (the version, the ids the index did not hold)."""
    from indexer.lifecycle import delete_items

    return delete_items(settings.indexes_dir, name, ids, keep_versions=settings.keep_versions)


def compact_index(settings: Settings, name: str) -> VersionManifest:
    """Merge every segment of ``name`` into one, deleted rows dropped."""
    from indexer.lifecycle import compact

    return compact(settings.indexes_dir, name, use_gpu=settings.device != "cpu", keep_versions=settings.keep_versions)
