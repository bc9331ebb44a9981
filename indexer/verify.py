"""Check an index version against its manifest: files, counts, dimension, and recall@10 re-measured."""

from __future__ import annotations

from pathlib import Path

from indexer import faiss_backend
from indexer.build import measure_recall
from indexer.integrity import check_version_files, consistency_problems
from indexer.items import ItemStore
from indexer.layout import DENSE, ITEMS, IndexDir
from models.errors import BundleError


def verify_index(indexes_dir: Path, name: str, version: str | None = None) -> dict:
    """BundleError naming what is wrong (a file missing or failing its checksum, a copied folder, files that
    disagree with the manifest), else the version's figures with recall@10 measured again."""
    d = IndexDir(indexes_dir, name)
    manifest = d.manifest(version)
    path = d.version_dir(manifest.version)
    for rel in manifest.files:
        if not (path / rel).exists():
            raise BundleError(f"index {name} version {manifest.version} lacks {rel}")
    check_version_files(path, manifest)
    index = faiss_backend.read(path / DENSE)
    faiss_backend.apply_params(index, manifest.faiss.get("params", {}))
    items = ItemStore(path / ITEMS)
    try:
        problems = consistency_problems(manifest, index.d, index.ntotal, items.count)
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
        "checksums": len(manifest.checksums) or "none (built before checksums were written)",
        "ok": True,
    }
