"""Searching a published index version: dense top-k, or late interaction over the token stores, with modality
targets and metadata filters, fanned out over the version's segments (indexer.segment_reader) and merged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer import calibration as score_calibration
from indexer import gpu
from indexer.calibration import Fusion
from indexer.items import VersionItems
from indexer.late.maxsim import similarities
from indexer.late.pipeline import SCOPES, LateParams, late_search
from indexer.layout import IndexDir, VersionManifest
from indexer.projection import Projection, Query
from indexer.segment_reader import SegmentData, SegmentView
from models.errors import BundleError, FingerprintMismatch, InvalidInput

if TYPE_CHECKING:
    from models.adapter import Adapter


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
    """One version of one index, loaded for search: a view of each of its segments (a search fans out over them
    and merges their top k). Immutable once built; swapping versions means loading a new LoadedIndex and
    replacing the reference. Segments shared with ``previous`` (the version being replaced) are not loaded or
    checked again: they are immutable."""

    def __init__(
        self,
        indexes_dir: Path,
        name: str,
        version: str | None = None,
        use_gpu: bool = True,
        expect_fingerprint: str | None = None,
        verify: bool = True,
        previous: LoadedIndex | None = None,
        selectors: bool | None = None,
        adapter: Adapter | None = None,
    ) -> None:
        """Load ``version`` (default: the published one) of index ``name``. BundleError (never a half-loaded
        index) when a file fails its checksum (with ``verify``), the files disagree with the manifest, or the
        model is not ``expect_fingerprint``. ``selectors``: how deleted rows are kept out of FAISS results
        (indexer.segment_reader.SegmentView; default: by the segment's device). ``adapter``: during a model upgrade
        (the version's ``upgrade``), the adapter from the version's model to the OLD one, exactly the one the
        version names; the OLD segments are searched through it."""
        d = IndexDir(indexes_dir, name)
        self.name = name
        self.manifest: VersionManifest = d.manifest(version)
        self.version = self.manifest.version
        model = self.manifest.model
        if expect_fingerprint is not None and model.fingerprint != expect_fingerprint:
            raise FingerprintMismatch(
                f"index {name!r} version {self.version} was built with model "
                f"{model.name} ({model.fingerprint[:12]}), not the loaded model ({expect_fingerprint[:12]})"
            )
        projection = self._projection = _projection(name, self.manifest, adapter)
        old = self.manifest.upgrade.from_model if self.manifest.upgrade else None
        shared = {v.data.id: v.data for v in previous.segments} if previous is not None else {}
        opened: list[SegmentData] = []
        self.segments: list[SegmentView] = []
        try:
            offset = 0
            for ref in self.manifest.segments:
                data = shared.get(ref.id)
                if data is None:
                    try:
                        data = SegmentData(d, ref.id, use_gpu, verify)
                    except BundleError as exc:  # which version could not be served, and why
                        raise BundleError(f"index {name!r} version {self.version}: {exc.message}") from None
                    opened.append(data)
                seg_model = data.manifest.model
                if seg_model == model and data.manifest.dim == model.dim:
                    space = None
                elif old is not None and seg_model == old and data.manifest.dim == old.dim:
                    space = projection
                else:
                    raise BundleError(f"index {name!r} version {self.version}: segment {ref.id} has another model")
                if (data.tokens is None) != (self.manifest.tokens is None):
                    raise BundleError(f"index {name!r} version {self.version}: segment {ref.id} differs in tokens")
                self.segments.append(SegmentView(data, ref, offset, selectors, space))
                offset += ref.rows
        except BaseException:
            for data in opened:
                data.close()
            raise
        self._opened = opened
        self.items = VersionItems(self.segments)
        self.device = gpu.summary([view.data.device for view in self.segments])  # gpu, cpu or mixed
        self.modalities = sorted(m for m, n in self.manifest.counts.items() if n > 0)
        self.has_tokens = self.manifest.tokens is not None

    @property
    def size(self) -> int:
        return self.items.count

    def placement(self) -> dict[str, dict[str, dict]]:
        """Where each segment's FAISS index of each modality is searched, and why (indexer.gpu.Placement)."""
        return {view.data.id: {m: p.record() for m, p in view.data.placement.items()} for view in self.segments}

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
        q = Query(self._vector(query), query_modality)
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
        vector = None if query.vector is None else Query(self._vector(query.vector), query_modality)
        tokens = Query(tokens, query_modality)
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

    def require_tokens(self) -> None:
        if not self.has_tokens:
            raise InvalidInput(
                f"index {self.name!r} has no token store, so `mode: late` is not available; "
                "use dense, or rebuild it with `xmodal index build --late`"
            )

    def _late_group(
        self,
        tokens: Query,
        vector: Query | None,
        k: int,
        targets: list[str],
        filter: dict | None,
        params: LateParams,
    ) -> list[tuple[Hit, np.ndarray]]:
        """Top k distinct items among the rows of ``targets``, scored as one group, metadata-filtered; each with
        the rows it was scored on (the version's numbering). Every segment's top k, merged."""
        pairs = [
            p for view in self.segments for p in self._late_segment(view, tokens, vector, k, targets, filter, params)
        ]
        pairs.sort(key=lambda p: -p[0].score)
        return pairs[:k]

    def _late_segment(
        self,
        view: SegmentView,
        tokens: Query,
        vector: Query | None,
        k: int,
        targets: list[str],
        filter: dict | None,
        params: LateParams,
    ) -> list[tuple[Hit, np.ndarray]]:
        """One segment's top k (widening the search until k survive the filter or every item was seen)."""
        store = view.data.tokens
        allowed, n_items = view.allowed_rows(tuple(targets))
        if n_items == 0:
            return []
        space = view.projection
        q_tokens = tokens.of(space)
        extra = None
        if vector is not None and not params.exhaustive:
            extra = np.concatenate([view.faiss_rows(vector.of(space), params.depth, t)[1] for t in targets])
            extra = extra[extra >= 0]
        fetch = min(n_items, k * 4 if filter else k)
        while True:
            found = late_search(store, q_tokens, fetch, allowed, params, extra)
            if space is not None:
                found.scores = space.scores(found.scores)
            groups = store.rows_of_items(found.items)
            records = view.data.items.get([int(r) for r in found.rows])
            hits = []
            for i, (row, score) in enumerate(zip(found.rows.tolist(), found.scores.tolist(), strict=True)):
                item = records[row]
                if not _matches(item["metadata"], filter):
                    continue
                item_rows = groups.rows[groups.bounds[i] : groups.bounds[i + 1]]
                rows = item_rows[allowed[item_rows]] if params.scope == "all" else np.array([row])
                modality = "+".join(sorted({view.data.row_modality[int(r)] for r in rows}))
                hits.append(
                    (Hit(item["id"], score, modality, item["text"], item["metadata"], score), rows + view.offset)
                )
                if len(hits) == k:
                    return hits
            if fetch >= n_items:
                return hits
            fetch = min(n_items, fetch * 4)

    def _explain(self, tokens: Query, rows: np.ndarray, heatmap: bool = False) -> list[TokenMatch]:
        """Each query token's best match among the tokens of ``rows`` (one row, or an item's rows for scope all;
        the version's numbering); with ``heatmap``, also its similarity to every token of the row that match is in."""
        best: list[TokenMatch | None] = [None] * len(tokens.x)
        for row in rows.tolist():
            view, local = self.items.locate(row)
            item_tokens = view.data.tokens.row_tokens(local)
            if len(item_tokens) == 0:
                continue
            sim = similarities(tokens.of(view.projection), item_tokens)
            index = sim.argmax(axis=1)
            modality = view.data.row_modality[local]
            for i, j in enumerate(index.tolist()):
                s = float(sim[i, j])
                if best[i] is None or s > best[i].similarity:
                    heat = sim[i] if heatmap else None
                    best[i] = TokenMatch(i, modality, j, len(item_tokens), s, heat)
        return [m for m in best if m is not None]

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

    def _search_modality(self, q: Query, k: int, modality: str, filter: dict | None) -> list[Hit]:
        """Top k distinct items among one modality's live rows, metadata-filtered: every segment's top k, merged by
        score (ids are live in one segment only). Unfiltered, the records of the merged top k only are read (an
        item has one row per modality, so nothing needs them to deduplicate)."""
        if filter:
            matches = lambda metadata: _matches(metadata, filter)  # noqa: E731
            found = [
                (f.score, f.record)
                for view in self.segments
                for f in view.search_modality(q.of(view.projection), k, modality, matches)
            ]
        else:
            top = []
            for i, view in enumerate(self.segments):
                scores, rows = view.faiss_rows(q.of(view.projection), k, modality)
                top += [(s, i, r) for s, r in zip(scores.tolist(), rows.tolist(), strict=True) if r >= 0]
            if len(self.segments) > 1:
                top.sort(key=lambda t: -t[0])  # stable: ties keep segment order
                top = top[:k]
            records = {}
            for i, view in enumerate(self.segments):
                mine = [r for _, j, r in top if j == i]
                if mine:
                    records |= {(i, r): record for r, record in view.data.items.get(mine).items()}
            found = [(s, records[(i, r)]) for s, i, r in top]
        hits = [Hit(r["id"], score, r["modality"], r["text"], r["metadata"], score) for score, r in found]
        hits.sort(key=lambda h: -h.score)
        return hits[:k]

    def vectors(self, rows: list[int]) -> np.ndarray | None:
        """The stored vectors of ``rows`` (the version's numbering) [n, D], or None where a FAISS index cannot
        give them back (an IVF index without a direct map); approximate for compressed (PQ) indexes."""
        if self._projection is not None:
            return None  # some rows are in OLD's space: no one vector space to give them back in
        out = np.empty((len(rows), self.manifest.dim), dtype=np.float32)
        try:
            for i, row in enumerate(rows):
                view, local = self.items.locate(row)
                modality = view.data.row_modality[local]
                start, _ = view.modality_rows(modality)
                out[i] = view.data.cpu_indexes[modality].reconstruct(int(local - start))
        except RuntimeError:
            return None
        return out

    def close(self) -> None:
        """Close the segments this version opened (those it shares with a newer version stay open for it)."""
        for data in self._opened:
            data.close()


def _projection(name: str, manifest: VersionManifest, adapter: Adapter | None) -> Projection | None:
    """The projection a version's OLD segments are searched through (None when it is not being upgraded); the
    adapter must be exactly the one its upgrade record names, from its model to the OLD one."""
    upgrade = manifest.upgrade
    if upgrade is None:
        return None
    where = f"index {name!r} version {manifest.version}"
    if adapter is None:
        raise BundleError(
            f"{where} is being upgraded from {upgrade.from_model.name} to {manifest.model.name}: its OLD segments "
            f"need adapter {upgrade.adapter} ({upgrade.adapter_fingerprint[:12]})"
        )
    wanted = (manifest.model.fingerprint, upgrade.from_model.fingerprint, upgrade.adapter_fingerprint)
    if (adapter.from_fingerprint, adapter.to_fingerprint, adapter.fingerprint) != wanted:
        raise FingerprintMismatch(
            f"{where}: the adapter given ({adapter.fingerprint[:12]}) is not {upgrade.adapter} "
            f"({upgrade.adapter_fingerprint[:12]}) from {manifest.model.name} to {upgrade.from_model.name}"
        )
    return Projection.of(adapter, upgrade.score_map)


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
