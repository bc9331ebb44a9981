"""The PLAID-like late-interaction search over a token store: centroid candidates, pruning by centroid scores,
exact MaxSim over the survivors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from indexer.late.kernels import Similarity, ranges_to_indices, token_product
from indexer.late.maxsim import Segments, segment_scores


class TokenSource(Protocol):
    """What the search reads of a token store (indexer.late.store.TokenStore is the one implementation)."""

    offsets: np.ndarray  # int64 [R + 1]: row r's tokens are offsets[r]:offsets[r + 1]
    row_item: np.ndarray  # int32 [R]
    centroids: np.ndarray  # float32 [K, D]
    codes: np.ndarray  # [T]: each token's centroid
    ivf_offsets: np.ndarray  # int64 [K + 1]
    ivf_rows: np.ndarray  # the rows having a token in each centroid

    def rows_of_items(self, items: np.ndarray) -> Segments: ...

    def similarity(self, query: np.ndarray, centroid_sim: np.ndarray | None = None) -> Similarity: ...


SCOPES = ("modality", "all")


@dataclass
class LateParams:
    """PLAID-like pipeline. 1: each query token probes its ``nprobe`` best centroids, and the ``candidates``
    rows with the best imputed centroid scores survive (plus the dense index's top rows, given by the caller).
    2: those items' token sets are scored through their tokens' centroids; the best ``depth`` items survive.
    3: exact MaxSim over their real token vectors. ``scope``: ``modality`` takes an item's best row (CLaMR's
    per-modality max), ``all`` scores the union of its rows' tokens. ``exhaustive`` scores every row exactly
    (the reference). ``symmetric`` averages FILIP's two directions.

    Defaults (bench/late.py, 100k items x 32 tokens, 16-token queries, 2 cores): the exact stage costs ~0.2 us a
    token (one ONNX Runtime cast + GEMM), so every stage-one candidate is scored exactly (``depth`` =
    ``candidates``); stage two prunes only when the dense index's rows push the candidates past ``depth``.
    Centroid-only scores rank near-ties poorly: depth 64 kept 0.48-0.82 of the exhaustive top 10."""

    depth: int = 1024
    candidates: int = 1024
    nprobe: int = 8
    scope: str = "modality"
    symmetric: bool = False
    exhaustive: bool = False


@dataclass
class LateHits:
    items: np.ndarray  # item ordinals, best first
    scores: np.ndarray  # float32 late scores
    rows: np.ndarray  # the row that represents each item (scope modality: its best row; all: its first row)
    scored: int  # rows scored exactly


def centroid_candidates(
    store: TokenSource,
    sim: np.ndarray,
    allowed: np.ndarray,
    keep: int,
    nprobe: int,
) -> np.ndarray:
    """Stage one, from ``sim`` [Lq, K], the query tokens' similarities to the centroids. A row found in a
    query token's probed centroid lists gets that centroid's score for that token; a row not found gets the
    token's lowest probed score (an upper bound of what it could have: WARP's imputation). The ``keep`` rows
    with the best mean over query tokens survive; only ``allowed`` rows are considered."""
    nprobe = min(nprobe, sim.shape[1])
    probe = np.argpartition(-sim, nprobe - 1, axis=1)[:, :nprobe]
    pscore = np.take_along_axis(sim, probe, axis=1)
    impute = pscore.min(axis=1)
    ivf_offsets, ivf_rows = store.ivf_offsets, np.asarray(store.ivf_rows)
    cents = probe.ravel()
    lengths = ivf_offsets[cents + 1] - ivf_offsets[cents]
    rows = ivf_rows[ranges_to_indices(ivf_offsets[cents], lengths)]
    seen = np.zeros(len(allowed), dtype=bool)
    seen[rows] = True
    seen &= allowed
    unique = np.flatnonzero(seen)
    if len(unique) == 0:
        return unique.astype(np.int64)
    # column of each row in ``best``; rows not allowed write to a spare last column, dropped after
    position = np.full(len(allowed), len(unique), dtype=np.int64)
    position[unique] = np.arange(len(unique))
    best = np.empty((len(sim), len(unique) + 1), dtype=np.float32)
    best[:] = impute[:, None]
    # A row's score for a token is the best of its probed centroids: write the token's probes in increasing
    # score order, so the best one is written last (one plain assignment per list: its rows are distinct).
    order = np.argsort(pscore, axis=1, kind="stable")
    for t in range(len(sim)):
        line = best[t]
        for j in order[t]:
            c = probe[t, j]
            line[position[ivf_rows[ivf_offsets[c] : ivf_offsets[c + 1]]]] = pscore[t, j]
    approx = best[:, :-1].mean(axis=0)
    if len(unique) > keep:
        unique = unique[np.argpartition(-approx, keep - 1)[:keep]]
    return unique.astype(np.int64)


@dataclass
class ItemGroups:
    """Candidate items and their allowed rows: ``rows[starts[i]:starts[i + 1]]`` belong to ``items[i]``."""

    items: np.ndarray
    rows: np.ndarray
    starts: np.ndarray  # [len(items) + 1]

    @classmethod
    def of_rows(cls, store: TokenSource, rows: np.ndarray, allowed: np.ndarray) -> ItemGroups:
        items = np.unique(store.row_item[rows])
        groups = store.rows_of_items(items)
        keep = allowed[groups.rows]
        kept = np.concatenate([[0], np.cumsum(keep)])[groups.bounds]
        nonempty = np.diff(kept) > 0
        return cls(items[nonempty], groups.rows[keep], np.r_[kept[:-1][nonempty], keep.sum()].astype(np.int64))

    def take(self, picked: np.ndarray) -> ItemGroups:
        lengths = self.starts[picked + 1] - self.starts[picked]
        rows = self.rows[ranges_to_indices(self.starts[picked], lengths)]
        return ItemGroups(self.items[picked], rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def scores(self, similarity: Similarity, offsets: np.ndarray, scope: str, symmetric: bool):  # noqa: ANN201
        """(score per item, the row representing it)."""
        if scope == "all":
            return segment_scores(similarity, offsets, Segments(self.rows, self.starts), symmetric), self.rows[
                self.starts[:-1]
            ]
        per_row = segment_scores(similarity, offsets, Segments.single(self.rows), symmetric)
        if len(per_row) == 0:
            return per_row, self.rows
        best = np.maximum.reduceat(per_row, self.starts[:-1])
        group_of = np.repeat(np.arange(len(self.items)), np.diff(self.starts))
        hit = np.flatnonzero(per_row == best[group_of])
        first = np.unique(group_of[hit], return_index=True)[1]  # an item's first row holding its max
        return best, self.rows[hit[first]]


def late_search(
    store: TokenSource,
    query: np.ndarray,
    k: int,
    allowed: np.ndarray,
    params: LateParams,
    extra_rows: np.ndarray | None = None,
) -> LateHits:
    """Top ``k`` items for query tokens [Lq, D] among ``allowed`` rows (bool [R])."""
    if params.scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {params.scope!r}")
    q = np.ascontiguousarray(query, dtype=np.float32)
    centroid_sim = None if params.exhaustive else token_product(q, store.centroids)  # [Lq, K], stages one and two
    if centroid_sim is None:
        cand = np.flatnonzero(allowed)
    else:
        cand = centroid_candidates(store, centroid_sim, allowed, params.candidates, params.nprobe)
        if extra_rows is not None and len(extra_rows):
            extra = np.asarray(extra_rows, dtype=np.int64)
            cand = np.union1d(cand, extra[allowed[extra]])
    groups = ItemGroups.of_rows(store, cand, allowed)
    if centroid_sim is not None and len(groups.items) > max(params.depth, k):
        approx, _ = groups.scores(lambda idx: centroid_sim[:, store.codes[idx]], store.offsets, params.scope, False)
        keep = max(params.depth, k)
        groups = groups.take(np.sort(np.argpartition(-approx, keep - 1)[:keep]))
    # the store gives products without float32 copies (and reuses the centroid similarities)
    similarity = store.similarity(q, centroid_sim)
    scores, rows = groups.scores(similarity, store.offsets, params.scope, params.symmetric)
    k = min(k, len(groups.items))
    top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    return LateHits(groups.items[top], scores[top].astype(np.float32), rows[top], int(len(groups.rows)))
