"""Late interaction (FILIP / ColBERT MaxSim): exact scoring of token sets, and PLAID-like candidate generation.

An item's score for a query is the mean over the query's real tokens of the best match (max inner product)
among the item's tokens. Tokens live in one CSR layout: ``vectors[offsets[r]:offsets[r + 1]]`` are row r's.
Scoring takes one matrix product per slab of candidates and a segmented max (``np.maximum.reduceat``), with
no Python loop per item; a row without tokens scores -inf (never 0: an empty item must not beat a bad one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SLAB_TOKENS = 1 << 18  # tokens per matrix product: [Lq, 262k] float32 stays near 16 MB for 16 query tokens
Take = Callable[[np.ndarray], np.ndarray]  # token numbers → their vectors as float32 [n, D]
Similarity = Callable[[np.ndarray], np.ndarray]  # token numbers → query-token similarities [Lq, n]


def ranges_to_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``range(s, s + n)`` for every (s, n), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    # Each position's offset within its own range, added to its range's start.
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def array_take(vectors: np.ndarray) -> Take:
    """A Take over plain (or memory-mapped) vectors of any float dtype."""
    return lambda idx: np.asarray(vectors[idx], dtype=np.float32)


def exact_similarity(query: np.ndarray, take: Take) -> Similarity:
    q = np.ascontiguousarray(query, dtype=np.float32)
    return lambda idx: q @ take(idx).T


@dataclass
class Segments:
    """Groups of rows scored as one token set: ``rows[bounds[g]:bounds[g + 1]]`` are group g's rows. One row
    per group is the per-row score; several rows of one item make its all-modality token set."""

    rows: np.ndarray
    bounds: np.ndarray

    @classmethod
    def single(cls, rows: np.ndarray) -> Segments:
        rows = np.asarray(rows, dtype=np.int64)
        return cls(rows, np.arange(len(rows) + 1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.bounds) - 1


def maxsim_scores(
    query: np.ndarray,
    take: Take,
    offsets: np.ndarray,
    segments: Segments,
    symmetric: bool = False,
) -> np.ndarray:
    """float32 [len(segments)]: FILIP query→item scores (mean over query tokens of the max over the group's
    tokens). ``symmetric`` averages it with the item→query score (mean over the group's tokens of the max over
    the query's tokens), FILIP's two directions. Groups without tokens score -inf."""
    q = np.asarray(query)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"query tokens must be [Lq > 0, D], not {list(q.shape)}")
    return segment_scores(exact_similarity(q, take), offsets, segments, symmetric)


def segment_scores(
    similarity: Similarity, offsets: np.ndarray, segments: Segments, symmetric: bool = False
) -> np.ndarray:
    """MaxSim per group of rows for any token similarity (exact vectors, or centroid approximations)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    row_len = offsets[segments.rows + 1] - offsets[segments.rows]
    group_len = np.diff(np.concatenate([[0], np.cumsum(row_len)])[segments.bounds])
    out = np.full(len(segments), -np.inf, dtype=np.float32)
    # Slabs of whole groups, each with at most ~SLAB_TOKENS tokens (a single bigger group gets a slab alone).
    token_end = np.cumsum(group_len)
    g = 0
    while g < len(segments):
        base = token_end[g - 1] if g else 0
        h = max(g + 1, int(np.searchsorted(token_end, base + SLAB_TOKENS, side="right")))
        rows = segments.rows[segments.bounds[g] : segments.bounds[h]]
        idx = ranges_to_indices(offsets[rows], offsets[rows + 1] - offsets[rows])
        if len(idx):
            out[g:h] = _slab_scores(similarity(idx), group_len[g:h], symmetric)
        g = h
    return out


def _slab_scores(sim: np.ndarray, group_len: np.ndarray, symmetric: bool) -> np.ndarray:
    """sim [Lq, tokens of consecutive groups] → one score per group; -inf for a group without tokens."""
    out = np.full(len(group_len), -np.inf, dtype=np.float32)
    full = group_len > 0
    starts = (np.cumsum(group_len) - group_len)[full]
    best = np.maximum.reduceat(sim, starts, axis=1)  # [Lq, non-empty groups]: each query token's best match
    scores = best.mean(axis=0)
    if symmetric:
        back = np.add.reduceat(sim.max(axis=0), starts) / group_len[full]
        scores = (scores + back) / 2
    out[full] = scores
    return out


def best_matches(query: np.ndarray, item_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query token, the item token it matched best and that similarity: why an item ranked."""
    sim = np.ascontiguousarray(query, dtype=np.float32) @ np.asarray(item_tokens, dtype=np.float32).T
    best = sim.argmax(axis=1)
    return best, sim[np.arange(len(best)), best]


def exact_scores(
    query_tokens: np.ndarray, vectors: np.ndarray, offsets: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """float32 [len(rows)] (default every row): exact query→item MaxSim over plain token vectors."""
    n = len(offsets) - 1
    picked = np.arange(n) if rows is None else np.asarray(rows)
    return maxsim_scores(query_tokens, array_take(vectors), offsets, Segments.single(picked))


# --- search: candidates, then exact scoring -----------------------------------------------------------------
SCOPES = ("modality", "all")


@dataclass
class LateParams:
    """PLAID-like pipeline. 1: each query token probes its ``nprobe`` best centroids, and the ``candidates``
    rows with the best imputed centroid scores survive (plus the dense index's top rows, given by the caller).
    2: those items' token sets are scored through their tokens' centroids; the best ``depth`` items survive.
    3: exact MaxSim over their real token vectors. ``scope``: ``modality`` takes an item's best row (CLaMR's
    per-modality max), ``all`` scores the union of its rows' tokens. ``exhaustive`` scores every row exactly
    (the reference). ``symmetric`` averages FILIP's two directions."""

    depth: int = 64
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
    store,  # noqa: ANN001 - a TokenStore (indexer.tokens)
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
    cents = probe.ravel()
    lengths = store.ivf_offsets[cents + 1] - store.ivf_offsets[cents]
    rows = np.asarray(store.ivf_rows[ranges_to_indices(store.ivf_offsets[cents], lengths)], dtype=np.int64)
    qtok = np.repeat(np.repeat(np.arange(len(sim)), nprobe), lengths)
    score = np.repeat(pscore.ravel(), lengths)
    ok = allowed[rows]
    rows, qtok, score = rows[ok], qtok[ok], score[ok]
    if len(rows) == 0:
        return rows
    seen = np.zeros(len(allowed), dtype=bool)
    seen[rows] = True
    unique = np.flatnonzero(seen)
    position = np.empty(len(allowed), dtype=np.int64)
    position[unique] = np.arange(len(unique))
    best = np.repeat(impute[:, None], len(unique), axis=1)
    np.maximum.at(best, (qtok, position[rows]), score)
    approx = best.mean(axis=0)
    if len(unique) > keep:
        unique = unique[np.argpartition(-approx, keep - 1)[:keep]]
    return unique


@dataclass
class ItemGroups:
    """Candidate items and their allowed rows: ``rows[starts[i]:starts[i + 1]]`` belong to ``items[i]``."""

    items: np.ndarray
    rows: np.ndarray
    starts: np.ndarray  # [len(items) + 1]

    @classmethod
    def of_rows(cls, store, rows: np.ndarray, allowed: np.ndarray) -> ItemGroups:  # noqa: ANN001
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
    store,  # noqa: ANN001 - a TokenStore (indexer.tokens)
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
    centroid_sim = None if params.exhaustive else q @ store.centroids.T  # [Lq, K], for stages one and two
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
    scores, rows = groups.scores(exact_similarity(q, store.take), store.offsets, params.scope, params.symmetric)
    k = min(k, len(groups.items))
    top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    return LateHits(groups.items[top], scores[top].astype(np.float32), rows[top], int(len(groups.rows)))
