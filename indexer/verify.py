"""Check an index version against its manifests: every segment's files and checksums, counts and dimension, and
recall@10 of every segment's FAISS indexes re-measured against exact search.

The exact answers are those a segment keeps for a held-out sample of its rows (indexer.heldout): computed at build
time by brute force over the original float vectors, so a compressed index's (SQ8, PQ) loss counts, not only its
partitioning's, and the figure is comparable with the build's held-out one (``recall_at_10_at_build``). A segment
written before held-out answers were kept has no copy of its vectors beside the FAISS index: there the exact answers
are computed over the vectors the index stores, the originals for Flat, IVF-Flat and HNSW codes, their
reconstruction for compressed codes, where the re-measure counts the partitioning's loss but not the quantisation's.
``truth`` says which."""

from __future__ import annotations

from pathlib import Path

from indexer import faiss_backend, heldout, ondisk
from indexer.index_choice import compressed
from indexer.integrity import check_segment_files, consistency_problems
from indexer.items import ItemStore
from indexer.layout import ITEMS, IndexDir, SegmentManifest
from indexer.tuning import combined_recall, recall_hits, truth_hits
from models.errors import BundleError


def segment_recall(path: Path, seg: SegmentManifest, indexes: dict) -> tuple[dict, str]:
    """(recall@10 of the segment's indexes with its search parameters, what the exact answers were computed over)."""
    parts, truths = [], []
    held = seg.recall_at_10.get("heldout") or {}
    for modality, index in indexes.items():
        faiss_backend.apply_params(index, seg.faiss.params)
        truth = heldout.read(path, modality, held.get("k", 10))
        if truth is not None:
            parts.append(truth_hits(index, truth))
            truths.append(held.get("truth", "exact search over the original float vectors"))
        else:
            parts.append(recall_hits(index, faiss_backend.all_vectors(index)))
            truths.append("reconstructed vectors" if compressed(seg.faiss.key) else "stored vectors")
    return combined_recall(parts), "; ".join(sorted(set(truths)))


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
        indexes = {m: ondisk.read_dense(path, m, seg.faiss.ondisk) for m in seg.rows}
        items = ItemStore(path / ITEMS)
        try:
            problems = consistency_problems(seg, indexes, items.count)
        finally:
            items.close()
        if problems:
            raise BundleError(f"index {name} segment {ref.id} is inconsistent: " + "; ".join(problems))
        recall, truth = segment_recall(path, seg, indexes)
        build = seg.recall_at_10
        segments.append(
            {
                "id": ref.id,
                "rows": ref.rows,
                "deleted": len(ref.tombstones),
                "faiss": seg.faiss.key,
                "params": seg.faiss.params,
                "ondisk": seg.faiss.ondisk,
                "recall_at_10": recall,
                "truth": truth,
                "recall_at_10_at_build": build.get("heldout", build),
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
