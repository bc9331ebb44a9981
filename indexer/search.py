"""Searching a published index version: dense top-k with metadata, modality targets and metadata filters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import faiss_backend
from indexer.items import ItemStore
from indexer.layout import DENSE, ITEMS, IndexDir, IndexManifest
from models.errors import FingerprintMismatch, InvalidInput


@dataclass
class Hit:
    id: str
    score: float
    modality: str
    text: str | None
    metadata: dict
    similarity: float  # the raw cosine; ``score`` ranks, and is calibrated when modalities are mixed


class LoadedIndex:
    """One version of one index, loaded for search. Immutable once built; swapping versions means
    loading a new LoadedIndex and replacing the reference."""

    def __init__(
        self,
        indexes_dir: Path,
        name: str,
        version: str | None = None,
        use_gpu: bool = True,
        expect_fingerprint: str | None = None,
    ) -> None:
        d = IndexDir(indexes_dir, name)
        self.name = name
        self.manifest: IndexManifest = d.manifest(version)
        self.version = self.manifest.version
        fp = self.manifest.model["fingerprint"]
        if expect_fingerprint is not None and fp != expect_fingerprint:
            raise FingerprintMismatch(
                f"index {name!r} version {self.version} was built with model "
                f"{self.manifest.model['name']} ({fp[:12]}), not the loaded model ({expect_fingerprint[:12]})"
            )
        path = d.version_dir(self.version)
        index = faiss_backend.read(path / DENSE)
        faiss_backend.apply_params(index, self.manifest.faiss.get("params", {}))
        self.index, self.device = faiss_backend.maybe_to_gpu(index, use_gpu)
        self.items = ItemStore(path / ITEMS)
        self.modalities = sorted(m for m, n in self.manifest.counts.items() if n > 0)

    @property
    def size(self) -> int:
        return self.items.count

    def search(
        self,
        query: np.ndarray,
        k: int,
        modalities: list[str] | None = None,
        filter: dict | None = None,
        query_modality: str | None = None,
    ) -> list[Hit]:
        """Top ``k`` items for one L2-normalised query vector, among target ``modalities`` (default all)
        and items whose metadata equals every key/value of ``filter``. An item with several modalities
        has a row each; it appears once, by its best row. When the targets are several modalities and the
        query's modality is known, each target's scores are z-normalised with the build-time statistics
        of that pair (``score``), so that no modality wins by its scale alone; ``similarity`` stays the
        raw cosine."""
        if query.shape != (self.manifest.dim,):
            raise InvalidInput(
                f"query vector has shape {list(query.shape)}, index {self.name!r} needs [{self.manifest.dim}]"
            )
        targets = sorted(set(modalities or self.modalities))
        unknown = set(targets) - set(self.modalities)
        if unknown:
            raise InvalidInput(f"index {self.name!r} holds no {sorted(unknown)} items; it holds {self.modalities}")
        q = np.ascontiguousarray(query[None, :], dtype=np.float32)
        stats = self.manifest.calibration
        pairs = [f"{query_modality}->{t}" for t in targets]
        calibrate = len(targets) > 1 and all(p in stats for p in pairs)
        merged: list[Hit] = []
        for target, pair in zip(targets, pairs, strict=True):
            for hit in self._search_modality(q, k, target, filter):
                if calibrate:
                    hit.score = (hit.similarity - stats[pair]["mean"]) / max(stats[pair]["std"], 1e-6)
                merged.append(hit)
        merged.sort(key=lambda h: -h.score)
        best, seen = [], set()
        for hit in merged:
            if hit.id not in seen:
                seen.add(hit.id)
                best.append(hit)
        return best[:k]

    def _search_modality(self, q: np.ndarray, k: int, modality: str, filter: dict | None) -> list[Hit]:
        """Top k distinct items among one modality's rows (a FAISS ID range), metadata-filtered: over-fetch
        and widen until k survivors are found or the rows are exhausted."""
        start, end = self.manifest.rows.get(modality, (0, self.size))
        whole = (start, end) == (0, self.size)
        n = end - start
        fetch = min(n, k * 4 if filter else k)
        while True:
            if whole:
                scores, rows = self.index.search(q, fetch)
            else:
                params = faiss_backend.range_params(self.index, self.manifest.faiss.get("params", {}), start, end)
                scores, rows = self.index.search(q, fetch, params=params)
            keep = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
            found = self.items.get([r for r, _ in keep])
            hits, seen = [], set()
            for row, score in keep:
                item = found[row]
                if item["id"] in seen or not _matches(item["metadata"], filter):
                    continue
                seen.add(item["id"])
                hits.append(Hit(item["id"], score, item["modality"], item["text"], item["metadata"], score))
                if len(hits) == k:
                    return hits
            if fetch >= n:
                return hits
            fetch = min(n, fetch * 4)

    def close(self) -> None:
        self.items.close()


def _matches(metadata: dict, filter: dict | None) -> bool:
    if not filter:
        return True
    for key, want in filter.items():
        have = metadata.get(key)
        if isinstance(want, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True
