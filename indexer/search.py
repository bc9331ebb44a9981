"""Searching a published index version: dense top-k, or late interaction over the token store, with modality
targets and metadata filters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer import calibration as score_calibration
from indexer import faiss_backend
from indexer.calibration import Fusion
from indexer.integrity import check_version_files, consistency_problems
from indexer.items import ItemStore
from indexer.late import SCOPES, LateParams, late_search, similarities
from indexer.layout import DENSE, ITEMS, TOKENS, IndexDir, IndexManifest
from indexer.tokens import TokenStore
from models.errors import BundleError, FingerprintMismatch, InvalidInput


@dataclass
class Hit:
    id: str
    score: float
    modality: str
    text: str | None
    metadata: dict
    similarity: float  # the raw cosine (late: MaxSim); ``score`` ranks, comparable across modalities
    matches: list[TokenMatch] | None = None  # late search with explain: each query token's best item token


@dataclass
class TokenMatch:
    """Query token ``query_token`` matched token ``item_token`` of the item's ``modality`` row best."""

    query_token: int
    modality: str
    item_token: int
    item_tokens: int  # how many tokens that row has
    similarity: float
    heat: np.ndarray | None = None  # with a heat map: the query token's similarity to each of that row's tokens


@dataclass
class LateRequest:
    """A late-interaction query: token vectors [Lq, D], and the pooled vector for dense candidates."""

    tokens: np.ndarray
    vector: np.ndarray | None = None
    params: LateParams = field(default_factory=LateParams)
    explain: bool = False
    heatmap: bool = False  # with explain: each query token's similarity to every token of the row it matched in


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
        verify: bool = True,
    ) -> None:
        """Load ``version`` (default: the published one) of index ``name``. BundleError (never a half-loaded
        index) when a file fails its checksum (with ``verify``), the files disagree with the manifest, or the
        model is not ``expect_fingerprint``."""
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
        if verify:
            check_version_files(path, self.manifest)
        try:
            index = faiss_backend.read(path / DENSE)
        except RuntimeError as exc:  # FAISS's reader on a damaged file (versions without checksums)
            raise BundleError(f"index {name!r} version {self.version}: {DENSE} cannot be read ({exc})") from None
        faiss_backend.apply_params(index, self.manifest.faiss.get("params", {}))
        self.items = ItemStore(path / ITEMS)
        problems = consistency_problems(self.manifest, index.d, index.ntotal, self.items.count)
        if problems:
            self.items.close()
            raise BundleError(f"index {name!r} version {self.version} is inconsistent: {'; '.join(problems)}")
        self.index, self.device = faiss_backend.maybe_to_gpu(index, use_gpu)
        self.modalities = sorted(m for m, n in self.manifest.counts.items() if n > 0)
        self.tokens = TokenStore(path / TOKENS) if self.manifest.tokens else None
        self._allowed: dict[tuple[str, ...], tuple[np.ndarray, int]] = {}

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
        calibration: str | None = None,
        duplicates_first: bool = True,
    ) -> list[Hit]:
        """Top ``k`` items for one L2-normalised query vector, among target ``modalities`` (default all)
        and items whose metadata equals every key/value of ``filter``. An item with several modalities
        has a row each; it appears once, by its best row. When the targets are several modalities, each
        target's scores are mapped to scores comparable across modalities (``score``; ``calibration``, default
        the index's, see indexer.calibration and :meth:`fusion`) and near duplicates of the query come first;
        ``similarity`` stays the raw cosine."""
        q = self._vector(query)
        targets = self._targets(modalities)
        per_target = {t: self._search_modality(q, k, t, filter) for t in targets}
        fusion = self.fusion(calibration, query_modality, targets, "dense", duplicates_first)
        return _merge(per_target, fusion, query_modality, k)

    def fusion(
        self,
        calibration: str | None,
        query_modality: str | None,
        targets: list[str] | None,
        mode: str = "dense",
        duplicates_first: bool = True,
    ) -> Fusion:
        """The calibration a search gets (the requested one, or the fallback when this version lacks its fits)."""
        if calibration is not None and calibration not in score_calibration.METHODS:
            raise InvalidInput(f"calibration must be one of {list(score_calibration.METHODS)}, not {calibration!r}")
        if mode == "late":
            late = self.manifest.tokens or {}
            fitted, zstats = late.get("score_calibration"), late.get("calibration", {})
        else:
            fitted, zstats = self.manifest.score_calibration, self.manifest.calibration
        targets = self._targets(targets)
        return score_calibration.resolve(calibration, fitted, zstats, query_modality, targets, duplicates_first)

    def search_late(
        self,
        query: LateRequest,
        k: int,
        modalities: list[str] | None = None,
        filter: dict | None = None,
        query_modality: str | None = None,
        calibration: str | None = None,
        duplicates_first: bool = True,
    ) -> list[Hit]:
        """Top ``k`` items by late interaction (FILIP MaxSim of the query's tokens over each item's tokens).
        Scope ``modality`` (the default) scores each target modality's rows apart and takes an item's best,
        calibrated as dense scores are when the targets are several (the same rule, with the late fits); scope
        ``all`` scores the union of an item's target rows' tokens as one set (one list: nothing to calibrate).
        Candidates: the token centroids' and, with ``query.vector``,
        the dense index's top rows."""
        self.require_tokens()
        tokens = np.asarray(query.tokens, dtype=np.float32)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] != self.manifest.dim:
            raise InvalidInput(
                f"query tokens have shape {list(tokens.shape)}, index {self.name!r} needs [n >= 1, {self.manifest.dim}]"
            )
        params = query.params
        if params.scope not in SCOPES:
            raise InvalidInput(f"late scope must be one of {list(SCOPES)}, not {params.scope!r}")
        targets = self._targets(modalities)
        vector = None if query.vector is None else self._vector(query.vector)
        groups = [[t] for t in targets] if params.scope == "modality" else [targets]
        found = {"+".join(g): self._late_group(tokens, vector, k, g, filter, params) for g in groups}
        per_group = {g: [hit for hit, _ in pairs] for g, pairs in found.items()}
        fusion = self.fusion(calibration, query_modality, targets, "late", duplicates_first)
        hits = _merge(per_group, fusion, query_modality, k)
        if query.explain:
            rows_of = {id(hit): rows for pairs in found.values() for hit, rows in pairs}
            for hit in hits:
                hit.matches = self._explain(tokens, rows_of[id(hit)], query.heatmap)
        return hits

    def require_tokens(self) -> TokenStore:
        if self.tokens is None:
            raise InvalidInput(
                f"index {self.name!r} has no token store, so `mode: late` is not available; "
                "use dense, or rebuild it with `xmodal index build --late`"
            )
        return self.tokens

    def _late_group(
        self,
        tokens: np.ndarray,
        vector: np.ndarray | None,
        k: int,
        targets: list[str],
        filter: dict | None,
        params: LateParams,
    ) -> list[tuple[Hit, np.ndarray]]:
        """Top k distinct items among the rows of ``targets``, scored as one group, metadata-filtered (widening
        the search until k survive or every item was seen); each with the rows it was scored on."""
        store = self.tokens
        allowed, n_items = self._allowed_rows(tuple(targets))
        extra = None
        if vector is not None and not params.exhaustive:
            # one row of ids per target modality, each as long as that modality allows
            extra = np.concatenate([self._faiss_rows(vector, params.depth, t)[1][0] for t in targets])
            extra = extra[extra >= 0]
        fetch = min(n_items, k * 4 if filter else k)
        while True:
            found = late_search(store, tokens, fetch, allowed, params, extra)
            groups = store.rows_of_items(found.items)
            records = self.items.get([int(r) for r in found.rows])
            hits = []
            for i, (row, score) in enumerate(zip(found.rows.tolist(), found.scores.tolist(), strict=True)):
                item = records[row]
                if not _matches(item["metadata"], filter):
                    continue
                item_rows = groups.rows[groups.bounds[i] : groups.bounds[i + 1]]
                rows = item_rows[allowed[item_rows]] if params.scope == "all" else np.array([row])
                modality = "+".join(sorted({self._modality_of(int(r)) for r in rows}))
                hits.append((Hit(item["id"], score, modality, item["text"], item["metadata"], score), rows))
                if len(hits) == k:
                    return hits
            if fetch >= n_items:
                return hits
            fetch = min(n_items, fetch * 4)

    def _allowed_rows(self, targets: tuple[str, ...]) -> tuple[np.ndarray, int]:
        """The rows of the target modalities (bool [R], read-only) and how many items they hold; kept per
        target set (a handful per index)."""
        if targets not in self._allowed:
            allowed = np.zeros(self.size, dtype=bool)
            for t in targets:
                start, end = self.manifest.rows.get(t, (0, self.size))
                allowed[start:end] = True
            allowed.flags.writeable = False
            self._allowed[targets] = allowed, len(np.unique(self.require_tokens().row_item[allowed]))
        return self._allowed[targets]

    def _explain(self, tokens: np.ndarray, rows: np.ndarray, heatmap: bool = False) -> list[TokenMatch]:
        """Each query token's best match among the tokens of ``rows`` (one row, or an item's rows for scope all);
        with ``heatmap``, also its similarity to every token of the row that match is in."""
        best: list[TokenMatch | None] = [None] * len(tokens)
        for row in rows.tolist():
            item_tokens = self.tokens.row_tokens(row)
            if len(item_tokens) == 0:
                continue
            sim = similarities(tokens, item_tokens)
            index = sim.argmax(axis=1)
            for i, j in enumerate(index.tolist()):
                s = float(sim[i, j])
                if best[i] is None or s > best[i].similarity:
                    heat = sim[i] if heatmap else None
                    best[i] = TokenMatch(i, self._modality_of(row), j, len(item_tokens), s, heat)
        return [m for m in best if m is not None]

    def _modality_of(self, row: int) -> str:
        for modality, (start, end) in self.manifest.rows.items():
            if start <= row < end:
                return modality
        return self.modalities[0]

    def _vector(self, query: np.ndarray) -> np.ndarray:
        if query.shape != (self.manifest.dim,):
            raise InvalidInput(
                f"query vector has shape {list(query.shape)}, index {self.name!r} needs [{self.manifest.dim}]"
            )
        return np.ascontiguousarray(query[None, :], dtype=np.float32)

    def _targets(self, modalities: list[str] | None) -> list[str]:
        targets = sorted(set(modalities or self.modalities))
        unknown = set(targets) - set(self.modalities)
        if unknown:
            raise InvalidInput(f"index {self.name!r} holds no {sorted(unknown)} items; it holds {self.modalities}")
        return targets

    def _faiss_rows(self, q: np.ndarray, fetch: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """FAISS top ``fetch`` among one modality's rows (an ID range): (scores, rows) [1, fetch]."""
        start, end = self.manifest.rows.get(modality, (0, self.size))
        fetch = min(fetch, end - start)
        if (start, end) == (0, self.size):
            return self.index.search(q, fetch)
        params = faiss_backend.range_params(self.index, self.manifest.faiss.get("params", {}), start, end)
        return self.index.search(q, fetch, params=params)

    def _search_modality(self, q: np.ndarray, k: int, modality: str, filter: dict | None) -> list[Hit]:
        """Top k distinct items among one modality's rows (a FAISS ID range), metadata-filtered: over-fetch
        and widen until k survivors are found or the rows are exhausted."""
        start, end = self.manifest.rows.get(modality, (0, self.size))
        n = end - start
        fetch = min(n, k * 4 if filter else k)
        while True:
            scores, rows = self._faiss_rows(q, fetch, modality)
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

    def vectors(self, rows: list[int]) -> np.ndarray | None:
        """The stored vectors of ``rows`` [n, D], or None where the FAISS index cannot give them back (an IVF
        index without a direct map); approximate for compressed (PQ) indexes."""
        try:
            return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))
        except RuntimeError:
            return None

    def close(self) -> None:
        self.items.close()


def _merge(per_target: dict[str, list[Hit]], fusion: Fusion, query_modality: str | None, k: int) -> list[Hit]:
    """One list from each target's hits (each list best first). With several targets, each list's scores go
    through ``fusion``'s map of its (query modality, target) pair, monotone, so a modality's hits keep their
    order; one target keeps the raw similarity. Near duplicates of the query (similarity at or above the
    threshold) come first, then the rest by score, ties by similarity; an item once, by its best hit."""
    fuse = len(per_target) > 1
    merged: list[tuple[bool, Hit]] = []
    for target, hits in per_target.items():
        scores = fusion.scores(query_modality, target, [h.similarity for h in hits]) if fuse else None
        for i, hit in enumerate(hits):
            duplicate = hit.similarity >= fusion.duplicate_threshold
            if fuse:
                hit.score = fusion.duplicate_score(float(scores[i])) if duplicate else float(scores[i])
            merged.append((duplicate and fusion.duplicates_first, hit))
    merged.sort(key=lambda d: (not d[0], -d[1].score, -d[1].similarity))
    best, seen = [], set()
    for _, hit in merged:
        if hit.id not in seen:
            seen.add(hit.id)
            best.append(hit)
    return best[:k]


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
