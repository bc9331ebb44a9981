"""One segment loaded for search. ``SegmentData`` is what never changes (its FAISS indexes, items store, token
store; checked against its checksums once), shared by every loaded version that lists the segment;
``SegmentView`` is it in one version: with that version's tombstones and its rows' place in the version's
row numbering. A view searches its own rows and never returns a deleted one: the FAISS search is restricted
to live ids (a bitmap selector), so a deleted row costs no result slot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer import faiss_backend, ondisk
from indexer.integrity import check_segment_files, consistency_problems
from indexer.items import ItemStore
from indexer.late.store import TokenStore
from indexer.layout import ITEMS, TOKENS, IndexDir, SegmentManifest, SegmentRef, dense_file
from models.errors import BundleError


class SegmentData:
    def __init__(self, d: IndexDir, segment: str, use_gpu: bool, verify: bool) -> None:
        self.manifest: SegmentManifest = d.segment_manifest(segment)
        self.id = segment
        path = d.segment_dir(segment)
        if verify:
            check_segment_files(path, self.manifest)
        self.indexes: dict[str, Any] = {}
        self.device = "cpu"
        for modality in self.manifest.rows:
            try:
                index = ondisk.read_dense(path, modality, self.manifest.faiss.ondisk)
            except RuntimeError as exc:  # FAISS's reader on a damaged file (when checksums are not checked)
                raise BundleError(f"segment {segment}: {dense_file(modality)} cannot be read ({exc})") from None
            faiss_backend.apply_params(index, self.manifest.faiss.params)
            self.indexes[modality] = index
        self.items = ItemStore(path / ITEMS)
        problems = consistency_problems(self.manifest, self.indexes, self.items.count)
        if problems:
            self.items.close()
            raise BundleError(f"segment {segment} is inconsistent: {'; '.join(problems)}")
        gpu = use_gpu and not self.manifest.faiss.ondisk  # an index on disk stays on the CPU, memory-mapped
        for modality, index in self.indexes.items():
            self.indexes[modality], self.device = faiss_backend.maybe_to_gpu(index, gpu)
        self.tokens = TokenStore(path / TOKENS) if self.manifest.tokens else None
        self.row_modality = np.empty(self.manifest.size, dtype=object)
        for modality, (start, end) in self.manifest.rows.items():
            self.row_modality[start:end] = modality

    def close(self) -> None:
        self.items.close()


@dataclass
class Found:
    """A segment's hit: its row (the segment's own numbering), score and stored record."""

    row: int
    score: float
    record: dict


class SegmentView:
    def __init__(self, data: SegmentData, ref: SegmentRef, offset: int, selectors: bool | None = None) -> None:
        """``selectors``: restrict FAISS to live rows with a bitmap selector (default: on the CPU; FAISS's GPU
        indexes take no selectors, so there a search over-fetches by the deleted count and drops deleted rows)."""
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
        use = data.device == "cpu" if selectors is None else selectors
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
        params = faiss_backend.selector_params(self.data.indexes[modality], self.data.manifest.faiss.params, selector)
        return params, bits, selector

    def faiss_rows(self, q: np.ndarray, fetch: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top ``fetch`` live rows of one modality: (scores, segment rows) [fetch], rows -1 past the end."""
        if modality not in self.data.indexes or self.live.get(modality, 0) == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        start, _ = self.modality_rows(modality)
        fetch = min(fetch, self.live[modality])
        held = self._selectors[modality]
        index = self.data.indexes[modality]
        if held is not None:
            scores, ids = index.search(q, fetch, params=held[0])
            return scores[0], np.where(ids[0] >= 0, ids[0] + start, -1)
        dead = self._dead_count[modality]
        scores, ids = index.search(q, fetch + dead)  # a deleted row takes at most one of the extra slots
        rows = np.where(ids[0] >= 0, ids[0] + start, -1)
        if dead:
            keep = (rows < 0) | ~self.dead[np.maximum(rows, 0)]
            return scores[0][keep][:fetch], rows[keep][:fetch]
        return scores[0], rows

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
