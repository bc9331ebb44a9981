"""One segment loaded for search. ``SegmentData`` is what never changes (its FAISS indexes, items store, token
store; checked against its checksums once), shared by every loaded version that lists the segment;
``SegmentView`` is it in one version: with that version's tombstones and its rows' place in the version's
row numbering. A view searches its own rows and never returns a deleted one: the FAISS search is restricted
to live ids (a bitmap selector), so a deleted row costs no result slot.

On a GPU (indexer.gpu decides, per modality's index) a segment searches a clone of its index under the process's GPU
lock, over-fetching by its deleted count and dropping deleted rows (no selector there); a search asking for more rows
than a GPU index returns (indexer.gpu.GPU_MAX_K) runs on the CPU form, which is kept for that and for reconstructing
stored vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer import faiss_backend, gpu, ondisk
from indexer.gpu import GPU_MAX_K, Placement
from indexer.integrity import check_segment_files, consistency_problems
from indexer.items import ItemStore
from indexer.late.store import TokenStore
from indexer.layout import ITEMS, TOKENS, IndexDir, SegmentManifest, SegmentRef, dense_file
from indexer.projection import Projection
from models.errors import BundleError


class SegmentData:
    def __init__(self, d: IndexDir, segment: str, use_gpu: bool, verify: bool) -> None:
        self.manifest: SegmentManifest = d.segment_manifest(segment)
        self.id = segment
        path = d.segment_dir(segment)
        if verify:
            check_segment_files(path, self.manifest)
        self.cpu_indexes: dict[str, Any] = {}  # the files as read, search parameters applied
        self.indexes: dict[str, Any] = {}  # what searches: a GPU clone where one was made, else the CPU form
        self.placement: dict[str, Placement] = {}
        for modality in self.manifest.rows:
            try:
                index = ondisk.read_dense(path, modality, self.manifest.faiss.ondisk)
            except RuntimeError as exc:  # FAISS's reader on a damaged file (when checksums are not checked)
                raise BundleError(f"segment {segment}: {dense_file(modality)} cannot be read ({exc})") from None
            faiss_backend.apply_params(index, self.manifest.faiss.params)
            self.cpu_indexes[modality] = index
        self.items = ItemStore(path / ITEMS)
        problems = consistency_problems(self.manifest, self.cpu_indexes, self.items.count)
        if problems:
            self.items.close()
            raise BundleError(f"segment {segment} is inconsistent: {'; '.join(problems)}")
        for modality, index in self.cpu_indexes.items():  # an index on disk stays on the CPU (indexer.gpu says why)
            self.indexes[modality], self.placement[modality] = faiss_backend.to_device(index, use_gpu)
        self.tokens = TokenStore(path / TOKENS) if self.manifest.tokens else None
        self.row_modality = np.empty(self.manifest.size, dtype=object)
        for modality, (start, end) in self.manifest.rows.items():
            self.row_modality[start:end] = modality

    @property
    def device(self) -> str:
        """Where this segment's indexes are searched: gpu, cpu, or mixed."""
        return gpu.summary([p.device for p in self.placement.values()])

    def on_gpu(self, modality: str) -> bool:
        placed = self.placement.get(modality)
        return placed is not None and placed.device == "gpu"

    def close(self) -> None:
        self.items.close()


@dataclass
class Found:
    """A segment's hit: its row (the segment's own numbering), score and stored record."""

    row: int
    score: float
    record: dict


class SegmentView:
    def __init__(
        self,
        data: SegmentData,
        ref: SegmentRef,
        offset: int,
        selectors: bool | None = None,
        projection: Projection | None = None,
    ) -> None:
        """``selectors``: restrict FAISS to live rows with a bitmap selector (default: on). A GPU index takes none:
        there a search over-fetches by the deleted count and drops deleted rows, and the selectors serve the searches
        that go to the CPU form (more rows than the GPU returns). False: over-fetch on the CPU too.
        ``projection``: the segment holds another model's vectors (a model upgrade in progress): queries are
        projected into its space and its scores mapped back (indexer.projection)."""
        self.projection = projection
        if ref.rows != data.manifest.size:
            raise BundleError(f"segment {ref.id} holds {data.manifest.size} rows, the version says {ref.rows}")
        self.data, self.offset = data, offset
        self.dead = np.zeros(ref.rows, dtype=bool)
        tomb = np.asarray(ref.tombstones, dtype=np.int64)
        if len(tomb) and (tomb.min() < 0 or tomb.max() >= ref.rows):
            raise BundleError(f"segment {ref.id}: a tombstone names a row it does not have")
        self.dead[tomb] = True
        self.dead.flags.writeable = False
        # built now, not on first use: FAISS holds raw pointers to the bitmap, which must outlive every search
        use = True if selectors is None else selectors
        self._selectors = {m: self._selector(m) if use else None for m in data.manifest.rows}
        self._dead_count = {m: int(self.dead[s:e].sum()) for m, (s, e) in data.manifest.rows.items()}
        self.live = {m: data.manifest.counts[m] - self._dead_count[m] for m in data.manifest.rows}
        self.size = int(ref.rows - len(tomb))
        self._allowed: dict[tuple[str, ...], tuple[np.ndarray, int]] = {}

    def modality_rows(self, modality: str) -> tuple[int, int]:
        start, end = self.data.manifest.rows.get(modality, (0, 0))
        return start, end

    def _selector(self, modality: str) -> tuple[Any, np.ndarray, Any] | None:
        """(search parameters restricting ``modality``'s FAISS index to live rows, their bitmap, the selector), or
        None when none of its rows is deleted."""
        start, end = self.modality_rows(modality)
        dead = self.dead[start:end]
        if not dead.any():
            return None
        faiss = faiss_backend.import_faiss()
        bits = np.packbits(~dead, bitorder="little")  # FAISS reads bit i & 7 of byte i >> 3
        selector = faiss.IDSelectorBitmap(len(dead), faiss.swig_ptr(bits))
        index = self.data.cpu_indexes[modality]
        params = faiss_backend.selector_params(index, self.data.manifest.faiss.params, selector)
        return params, bits, selector

    def faiss_rows(self, q: np.ndarray, fetch: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top ``fetch`` live rows of one modality: (scores, segment rows) [fetch], rows -1 past the end.
        ``q`` is in this segment's space (indexer.projection.Query.of); scores come back on the query model's scale."""
        scores, rows = self._faiss_rows(q, fetch, modality)
        return (scores if self.projection is None else self.projection.scores(scores)), rows

    def _faiss_rows(self, q: np.ndarray, fetch: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
        if modality not in self.data.indexes or self.live.get(modality, 0) == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        start, _ = self.modality_rows(modality)
        fetch = min(fetch, self.live[modality])
        dead = self._dead_count[modality]
        if self.data.on_gpu(modality) and fetch + dead <= GPU_MAX_K:
            with faiss_backend.gpu_lock():
                scores, ids = self.data.indexes[modality].search(q, fetch + dead)
            return self._drop_dead(scores[0], ids[0], start, fetch, dead)
        index = self.data.cpu_indexes[modality]
        held = self._selectors[modality]
        if held is not None:
            scores, ids = index.search(q, fetch, params=held[0])
            return scores[0], np.where(ids[0] >= 0, ids[0] + start, -1)
        scores, ids = index.search(q, fetch + dead)  # a deleted row takes at most one of the extra slots
        return self._drop_dead(scores[0], ids[0], start, fetch, dead)

    def _drop_dead(
        self, scores: np.ndarray, ids: np.ndarray, start: int, fetch: int, dead: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = np.where(ids >= 0, ids + start, -1)
        if dead:
            keep = (rows < 0) | ~self.dead[np.maximum(rows, 0)]
            return scores[keep][:fetch], rows[keep][:fetch]
        return scores, rows

    def search_modality(self, q: np.ndarray, k: int, modality: str, matches) -> list[Found]:  # noqa: ANN001
        """Top k distinct items among one modality's live rows whose metadata ``matches``: over-fetch and widen
        until k survive or the rows are exhausted."""
        n = self.live.get(modality, 0)
        fetch = min(n, k * 4 if matches is not None else k)
        while fetch > 0:
            scores, rows = self.faiss_rows(q, fetch, modality)
            keep = [(int(r), float(s)) for r, s in zip(rows, scores, strict=True) if r >= 0]
            records = self.data.items.get([r for r, _ in keep])
            found, seen = [], set()
            for row, score in keep:
                record = records[row]
                if record["id"] in seen or (matches is not None and not matches(record["metadata"])):
                    continue
                seen.add(record["id"])
                found.append(Found(row, score, record))
                if len(found) == k:
                    return found
            if fetch >= n:
                return found
            fetch = min(n, fetch * 4)
        return []

    def allowed_rows(self, targets: tuple[str, ...]) -> tuple[np.ndarray, int]:
        """The live rows of the target modalities (bool [R], read-only) and how many items they hold; kept per
        target set (a handful per index)."""
        if targets not in self._allowed:
            allowed = np.zeros(self.data.manifest.size, dtype=bool)
            for t in targets:
                start, end = self.modality_rows(t)
                allowed[start:end] = True
            allowed &= ~self.dead
            allowed.flags.writeable = False
            self._allowed[targets] = allowed, len(np.unique(self.data.tokens.row_item[allowed]))
        return self._allowed[targets]
