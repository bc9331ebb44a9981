"""Check an index version against its manifest: files, counts, dimension, and recall@10 re-measured."""

from __future__ import annotations

from pathlib import Path

from indexer import faiss_backend
from indexer.build import measure_recall
from indexer.items import ItemStore
from indexer.layout import DENSE, ITEMS, IndexDir
from models.errors import BundleError


def verify_index(indexes_dir: Path, name: str, version: str | None = None) -> dict:
    d = IndexDir(indexes_dir, name)
    manifest = d.manifest(version)
    path = d.version_dir(manifest.version)
    for rel in manifest.files:
        if not (path / rel).exists():
            raise BundleError(f"index {name} version {manifest.version} lacks {rel}")
    index = faiss_backend.read(path / DENSE)
    faiss_backend.apply_params(index, manifest.faiss.get("params", {}))
    items = ItemStore(path / ITEMS)
    try:
        problems = []
        if index.d != manifest.dim:
            problems.append(f"FAISS dimension {index.d} != manifest dim {manifest.dim}")
        if index.ntotal != items.count or items.count != sum(manifest.counts.values()):
            problems.append(
                f"FAISS holds {index.ntotal} vectors, items store {items.count}, manifest counts {manifest.counts}"
            )
        if problems:
            raise BundleError(f"index {name} version {manifest.version} is inconsistent: " + "; ".join(problems))
        recall = measure_recall(index, index.reconstruct_n(0, index.ntotal))
    finally:
        items.close()
    return {
        "name": name,
        "version": manifest.version,
        "items": items.count,
        "dim": manifest.dim,
        "faiss": manifest.faiss["key"],
        "recall_at_10": recall,
        "recall_at_10_at_build": manifest.recall_at_10,
        "ok": True,
    }
