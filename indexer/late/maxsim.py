"""Exact MaxSim: an item's score for a query is the mean over the query's real tokens of the best match (max inner
product) among the item's tokens. Tokens live in one CSR layout: ``vectors[offsets[r]:offsets[r + 1]]`` are row r's.
Scoring takes one matrix product per slab of candidates and a segmented max (``np.maximum.reduceat``), with
no Python loop per item; a row without tokens scores -inf (never 0: an empty item must not beat a bad one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.late.kernels import Similarity, Take, gathered_product, ranges_to_indices, token_product

SLAB_TOKENS = 1 << 18  # tokens per matrix product: [Lq, 262k] float32 stays near 16 MB for 16 query tokens


def exact_similarity(query: np.ndarray, take: Take) -> Similarity:
    """token numbers → [Lq, n] inner products with ``take``'s vectors (float32, or float16: cast in the product)."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    return lambda idx: token_product(q, take(idx))


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


def similarities(query: np.ndarray, item_tokens: np.ndarray) -> np.ndarray:
    """[Lq, T] float32: each query token against each of an item row's tokens (why an item ranked: the argmax of
    a row is the token that query token matched best)."""
    return np.ascontiguousarray(query, dtype=np.float32) @ np.asarray(item_tokens, dtype=np.float32).T


def exact_scores(
    query_tokens: np.ndarray, vectors: np.ndarray, offsets: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """float32 [len(rows)] (default every row): exact query→item MaxSim over plain token vectors."""
    n = len(offsets) - 1
    picked = np.arange(n) if rows is None else np.asarray(rows)
    q = np.asarray(query_tokens)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"query tokens must be [Lq > 0, D], not {list(q.shape)}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    plain = np.asarray(vectors)  # a memory map's array view: indexing it skips np.memmap's Python wrapper
    return segment_scores(lambda idx: gathered_product(q, plain, idx), offsets, Segments.single(picked))
