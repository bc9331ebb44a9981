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
        self, query: np.ndarray, k: int, modalities: list[str] | None = None, filter: dict | None = None
    ) -> list[Hit]:
        """Top ``k`` items for one L2-normalised query vector, restricted to target ``modalities`` and to
        items whose metadata equals every key/value of ``filter``. Scores of different modalities are
        compared raw (no calibration yet)."""
        if query.shape != (self.manifest.dim,):
            raise InvalidInput(
                f"query vector has shape {list(query.shape)}, index {self.name!r} needs [{self.manifest.dim}]"
            )
        targets = set(modalities or self.modalities)
        unknown = targets - set(self.modalities)
        if unknown:
            raise InvalidInput(f"index {self.name!r} holds no {sorted(unknown)} items; it holds {self.modalities}")
        # An item with several modalities has a row each: hits are deduplicated by item, best row first.
        restricted = bool(filter) or targets != set(self.modalities) or len(self.modalities) > 1
        q = np.ascontiguousarray(query[None, :], dtype=np.float32)
        # Post-filtering: over-fetch and widen until k survivors are found or the index is exhausted.
        fetch = min(self.size, k * 4 if restricted else k)
        while True:
            scores, rows = self.index.search(q, fetch)
            keep = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
            found = self.items.get([r for r, _ in keep])
            hits, seen = [], set()
            for row, score in keep:
                item = found[row]
                if item["modality"] not in targets or item["id"] in seen or not _matches(item["metadata"], filter):
                    continue
                seen.add(item["id"])
                hits.append(Hit(item["id"], score, item["modality"], item["text"], item["metadata"]))
                if len(hits) == k:
                    return hits
            if fetch >= self.size:
                return hits
            fetch = min(self.size, fetch * 4)

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
