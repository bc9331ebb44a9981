"""Changing an index without encoding: deleting items (tombstones) and compaction (the live rows of every segment
merged into one new segment, deleted rows dropped, vectors and tokens taken from the segments, no encoder).
Adding items is in indexer.build (it encodes)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from indexer import faiss_backend, ondisk
from indexer.index_choice import compressed
from indexer.items import ItemStore
from indexer.late.store import TokenStore
from indexer.layout import ITEMS, TOKENS, IndexDir, SegmentRef, VersionManifest, new_version_name
from indexer.publish import commit, tombstoned
from indexer.segment_writer import LateBuild, RowRecord, write_segment
from models.errors import IndexNotFound, InvalidInput
from models.files import staging_dir

log = logging.getLogger(__name__)
MODALITY_ORDER = ("text", "image", "audio")


def delete_items(
    indexes_dir: Path, name: str, ids: list[str], keep_versions: int | None = None
) -> tuple[VersionManifest, list[str]]:
    """Tombstone every row of ``ids`` and publish that version; (the version, the ids it did not hold). None of
    them held: InvalidInput, and nothing is published."""
    if not ids:
        raise InvalidInput("give at least one id to delete")
    target = IndexDir(indexes_dir, name)
    wanted = set(ids)
    missing: list[str] = []
    build: dict = {"requested": len(wanted)}
    t0 = time.perf_counter()

    def plan(current: VersionManifest | None) -> list[SegmentRef]:
        if current is None:
            raise IndexNotFound(f"index {name!r} has no published version to delete from")
        refs, hit = tombstoned(target, current.segments, wanted)
        if not hit:
            raise InvalidInput(f"index {name!r} holds none of the {len(wanted)} ids to delete")
        missing.extend(sorted(wanted - hit))
        # the counts go into the version file as it is written: a published version is never rewritten
        build.update(deleted=len(hit), missing=len(missing), seconds=round(time.perf_counter() - t0, 3))
        return refs

    return commit(target, "delete", [], plan, build=build, keep_versions=keep_versions), missing


SMALL = 0.25  # a segment with fewer live rows than this share of the largest one is small
DELETED = 0.2  # a segment with at least this share of its rows deleted is worth rewriting


def small_segments(refs: list[SegmentRef]) -> list[SegmentRef]:
    """What a tiered compaction merges: the small segments and those with many deletions (as Lucene's tiered merge
    policy leaves large segments alone). Fewer than two of them and no deletions among them: every segment."""
    live = {r.id: r.rows - len(r.tombstones) for r in refs}
    largest = max(live.values())
    chosen = [r for r in refs if live[r.id] < SMALL * largest or len(r.tombstones) >= DELETED * r.rows]
    if len(chosen) < 2 and not any(r.tombstones for r in chosen):
        return refs
    return chosen


def compact(
    indexes_dir: Path,
    name: str,
    use_gpu: bool = True,
    keep_versions: int | None = None,
    everything: bool = True,
    memory_budget: int | None = None,
) -> VersionManifest:
    """Merge segments' live rows into one segment (deleted rows dropped) and publish it: every segment, or with
    ``everything=False`` the small ones and those with many deletions (:func:`small_segments`; what an add does past
    ``max_segments``), the others kept as they are. The merged segment's index type is chosen within
    ``memory_budget`` (bytes; None: no limit) as a build's is. Holds the writer lock throughout, so no add or
    delete lands in between and is lost; they wait for it."""
    target = IndexDir(indexes_dir, name)
    t0 = time.perf_counter()
    with target.writing():
        base = target.manifest()
        if len(base.segments) == 1 and not base.segments[0].tombstones:
            raise InvalidInput(f"index {name!r} is one segment without deletions: nothing to compact")
        merged = base.segments if everything else small_segments(base.segments)
        manifests = {r.id: target.segment_manifest(r.id) for r in merged}
        if base.upgrade is not None:  # OLD and NEW vectors never share a segment: merge the larger group only
            groups: dict[str, list[SegmentRef]] = {}
            for ref in merged:
                groups.setdefault(manifests[ref.id].model.fingerprint, []).append(ref)
            merged = max(groups.values(), key=len)
            if len(merged) == 1 and not merged[0].tombstones:
                raise InvalidInput(
                    f"index {name!r} is being upgraded: its segments of one model are one segment without "
                    "deletions, nothing to compact until the backfill is done"
                )
        kept = [r for r in base.segments if r not in merged]
        rows, vectors, tokens = [], [], []
        late, lossy = None, set()
        for ref in merged:
            seg = manifests[ref.id]
            if seg.tokens:
                late = LateBuild(**{k: seg.tokens[k] for k in ("storage", "nbits", "pool_factor") if k in seg.tokens})
            if compressed(seg.faiss.key):
                lossy.add(seg.faiss.key)
            part_rows, part_vectors, part_tokens = _live_rows(target, ref, seg.rows, bool(seg.tokens), seg.faiss.ondisk)
            rows += part_rows
            vectors += part_vectors
            tokens += part_tokens
        order = sorted(range(len(rows)), key=lambda i: MODALITY_ORDER.index(rows[i].modality))  # stable
        segment = new_version_name()
        with staging_dir(target.segments_dir, segment) as tmp:
            written = write_segment(
                tmp,
                index=name,
                segment=segment,
                records=[rows[i] for i in order],
                vectors=np.concatenate(vectors)[order],
                tokens=[tokens[i] for i in order] if late else None,
                model=manifests[merged[0].id].model,  # during an upgrade, maybe the OLD one
                use_gpu=use_gpu,
                late=late,
                build={"compacted": [r.id for r in merged]},
                memory_budget=memory_budget,
                truth_over=(
                    f"the vectors reconstructed from the merged segments' codes ({', '.join(sorted(lossy))}: "
                    "compaction keeps no original vectors)"
                    if lossy
                    else "the merged segments' vectors (stored exactly)"
                ),
            )
            build = {
                "segments_merged": len(merged),
                "segments_kept": len(kept),
                "rows_dropped": sum(len(r.tombstones) for r in merged),
                "rows": written.size,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            return commit(
                target,
                "compact",
                [(tmp, written)],
                lambda current: [*kept, SegmentRef(id=segment, rows=written.size)],
                build=build,
                keep_versions=keep_versions,
                locked=True,
            )


def _live_rows(
    target: IndexDir, ref: SegmentRef, ranges: dict[str, list[int]], with_tokens: bool, on_disk: bool
) -> tuple[list[RowRecord], list[np.ndarray], list[np.ndarray]]:
    """A segment's live rows: their records, their vectors (from its FAISS indexes) and token vectors."""
    folder = target.segment_dir(ref.id)
    dead = np.zeros(ref.rows, dtype=bool)
    dead[np.asarray(ref.tombstones, dtype=np.int64)] = True
    store = ItemStore(folder / ITEMS)
    try:
        records = [RowRecord(i, m, s, t, md) for r, i, m, s, t, md in store.all_rows() if not dead[r]]
    finally:
        store.close()
    vectors = []
    for modality, (start, end) in sorted(ranges.items(), key=lambda kv: kv[1][0]):  # row order (JSON sorts keys)
        index = ondisk.read_dense(folder, modality, on_disk)
        vectors.append(faiss_backend.all_vectors(index)[~dead[start:end]])
    tokens = []
    if with_tokens:
        store = TokenStore(folder / TOKENS)
        tokens = [store.row_tokens(r).astype(np.float16) for r in np.flatnonzero(~dead).tolist()]
    return records, vectors, tokens
