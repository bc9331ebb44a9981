"""Check an index version against its manifests: every segment's files and checksums, counts and dimension, and
recall@10 of every segment's FAISS indexes re-measured against exact search.

A segment keeps no copy of its vectors beside the FAISS index, so the exact answers are computed over the vectors the
index stores: the originals for Flat, IVF-Flat and HNSW codes, their reconstruction for compressed codes (SQ, PQ),
where the re-measure then counts the partitioning's loss but not the quantisation's (``truth`` says which; the
build's figure, ``recall_at_10_at_build``, was measured against the original vectors)."""

from __future__ import annotations

from pathlib import Path

from indexer import faiss_backend
from indexer.integrity import check_segment_files, consistency_problems
from indexer.items import ItemStore
from indexer.layout import ITEMS, IndexDir, dense_file
from indexer.tuning import combined_recall, recall_hits
from models.errors import BundleError


def compressed(key: str) -> bool:
    """Whether a factory key's codes are lossy (so reconstruct gives approximate vectors)."""
    return any(code in key.upper() for code in ("SQ", "PQ", "LSH", "RQ", "LSQ"))


def verify_index(indexes_dir: Path, name: str, version: str | None = None) -> dict:
    """BundleError naming what is wrong (a segment missing, a file missing or failing its checksum, a copied
    folder, files that disagree with the manifest), else the version's figures with recall@10 measured again."""
    d = IndexDir(indexes_dir, name)
    manifest = d.manifest(version)
    segments = []
    for ref in manifest.segments:
        path = d.segment_dir(ref.id)
        try:
            seg = d.segment_manifest(ref.id)
            check_segment_files(path, seg)
        except BundleError as exc:
            raise BundleError(f"index {name} version {manifest.version}: {exc.message}") from None
        if ref.rows != seg.size:
            raise BundleError(
                f"index {name} segment {ref.id} holds {seg.size} rows, version {manifest.version} says {ref.rows}"
            )
        indexes = {m: faiss_backend.read(path / dense_file(m)) for m in seg.rows}
        items = ItemStore(path / ITEMS)
        try:
            problems = consistency_problems(seg, indexes, items.count)
        finally:
            items.close()
        if problems:
            raise BundleError(f"index {name} segment {ref.id} is inconsistent: " + "; ".join(problems))
        parts = []
        for index in indexes.values():
            faiss_backend.apply_params(index, seg.faiss.params)
            parts.append(recall_hits(index, faiss_backend.all_vectors(index)))
        segments.append(
            {
                "id": ref.id,
                "rows": ref.rows,
                "deleted": len(ref.tombstones),
                "faiss": seg.faiss.key,
                "params": seg.faiss.params,
                "recall_at_10": combined_recall(parts),
                "truth": "reconstructed vectors" if compressed(seg.faiss.key) else "stored vectors",
                "recall_at_10_at_build": seg.recall_at_10,
                "checksums": len(seg.checksums),
            }
        )
    return {
        "name": name,
        "version": manifest.version,
        "items": sum(manifest.counts.values()),
        "dim": manifest.dim,
        "segments": segments,
        "ok": True,
    }
