"""Recall of an approximate FAISS index against exact search, and its search parameters tuned to a recall target.

The exact answers (``Truth``) are the top ``keep`` rows of every sample query by brute force over the float vectors,
computed chunk by chunk (``TopK``), so that they can be taken while the vectors stream past once (an index built on
disk never holds them all) and stored beside the index (indexer.heldout) for `xmodal index verify` to measure against
after the vectors are gone. Queries are a sample of the index's own vectors, each left out of its own answers (truth
and found alike), so the measure behaves as for queries from outside the index rather than counting every query's
own vector as a hit. Ties in the exact scores are tolerated: a found row is a hit when it is among the stored exact
answers with a score reaching the k-th best (so an exact index scores 1.0 where duplicates make the order of equals
arbitrary, up to ``keep`` rows tied at the k-th score).
Tuning walks a ladder of ``efSearch`` (HNSW) or ``nprobe`` (IVF) values, cheapest first, and keeps the first that
reaches the target on every modality's index of a segment (the last one if none does; the manifest then says so).
An index that re-ranks its candidates with finer codes (``IndexRefine``, the ``Refine(...)`` of a factory key) tunes
``nprobe`` and ``k_factor_rf`` (candidates re-ranked: k_factor_rf * k) together: at each nprobe, the k factors in
increasing order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer import faiss_backend

RECALL_SAMPLE = 256
RECALL_TARGET = 0.95  # recall@10 against exact search, the default every tuned segment is held to
KEEP = 32  # exact answers kept a query: the k best and the rows tied with the k-th
TIE = 1e-5  # exact scores this close to the k-th best count as ties (FAISS and numpy sum in another order)
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
K_FACTOR = (1, 2, 4, 8, 16)  # re-ranked candidates a result, for an index with a refine step


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors.T
    k = min(k, vectors.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def sample_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(n, size=min(RECALL_SAMPLE, n), replace=False)


@dataclass
class Truth:
    """Exact answers of sample queries: each query's best ``ids`` [S, keep] (rows of the index's vectors, best
    first, -1 past the end) and their ``scores``, and ``k`` (recall@k). ``own``: each query's own row in the
    vectors, left out of its answers, or None for queries from outside."""

    queries: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    k: int
    own: np.ndarray | None

    @property
    def kth(self) -> np.ndarray:
        return self.scores[:, self.k - 1] if self.k else np.zeros(len(self.queries), np.float32)


class TopK:
    """The exact top ``keep`` rows of ``queries`` over vectors fed chunk by chunk in row order, each query's ``own``
    row left out."""

    def __init__(self, queries: np.ndarray, keep: int = KEEP, own: np.ndarray | None = None) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.own = own
        self.keep = keep
        self.scores = np.full((len(queries), keep), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), keep), -1, dtype=np.int64)
        self.seen = 0

    def add(self, start: int, block: np.ndarray) -> None:
        """Fold in the rows ``start``.. of ``block``: FAISS's exact search of the chunk (its best ``keep`` + 1, a
        query's own row dropped), merged with the best so far. Memory: queries x (keep + 1) beside the chunk."""
        if start != self.seen:
            raise AssertionError(f"chunks out of order: rows from {start}, expected {self.seen}")
        self.seen += len(block)
        if not len(self.queries) or not len(block):
            return
        faiss = faiss_backend.import_faiss()
        want = min(self.keep + 1, len(block))
        scores, ids = faiss.knn(
            self.queries, np.ascontiguousarray(block, dtype=np.float32), want, faiss.METRIC_INNER_PRODUCT
        )
        ids = np.where(ids >= 0, ids + start, -1)
        if self.own is not None:
            scores[ids == self.own[:, None]] = -np.inf
        scores[ids < 0] = -np.inf
        merged = np.concatenate([self.scores, scores], axis=1)
        merged_ids = np.concatenate([self.ids, ids], axis=1)
        top = np.argpartition(-merged, self.keep - 1, axis=1)[:, : self.keep]
        self.scores = np.take_along_axis(merged, top, axis=1)
        self.ids = np.take_along_axis(merged_ids, top, axis=1)

    def truth(self, k: int = 10) -> Truth:
        """The answers so far, best first; recall@``k`` (at most the rows available to a query)."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        scores = np.take_along_axis(self.scores, order, axis=1)
        ids = np.take_along_axis(self.ids, order, axis=1)
        ids[~np.isfinite(scores)] = -1
        k = max(0, min(k, self.seen - (0 if self.own is None else 1), self.keep))
        return Truth(self.queries, ids, scores, k, self.own)


def exact_truth(
    vectors: np.ndarray, queries: np.ndarray, k: int = 10, own: np.ndarray | None = None, chunk: int = 65_536
) -> Truth:
    """Brute-force answers of ``queries`` over ``vectors`` (an array or a memory map), in chunks of rows, each
    query's ``own`` row left out of its answers."""
    top = TopK(queries, max(KEEP, k), own)
    for start in range(0, vectors.shape[0], chunk):
        top.add(start, np.asarray(vectors[start : start + chunk], dtype=np.float32))
    return top.truth(k)


def truth_hits(index: Any, truth: Truth, params: Any = None) -> tuple[int, int, int]:
    """(hits, queries, k): found rows that are among the exact answers with a score reaching the k-th best (ties
    tolerated)."""
    if truth.k < 1 or not len(truth.queries):
        return 0, 0, 0
    extra = 0 if truth.own is None else 1
    q, k = truth.queries, truth.k
    _, found = index.search(q, k + extra) if params is None else index.search(q, k + extra, params=params)
    kth = truth.kth - TIE
    hits = 0
    for i, f in enumerate(found):
        own = -2 if truth.own is None else int(truth.own[i])
        got = [r for r in f.tolist() if r != own and r >= 0][:k]
        good = set(truth.ids[i][truth.scores[i] >= kth[i]].tolist())
        hits += sum(r in good for r in got)
    return hits, len(q), k


def self_truth(vectors: np.ndarray, k: int = 10, seed: int = 0) -> Truth:
    """The truth of a sample of ``vectors``' own rows as queries, each left out of its own answers."""
    rows = sample_rows(vectors.shape[0], seed)
    return exact_truth(vectors, np.asarray(vectors[rows], dtype=np.float32), k, own=rows)


def recall_hits(index: Any, vectors: np.ndarray, k: int = 10, params: Any = None) -> tuple[int, int, int]:
    """(hits, queries, k) of ``index`` against exact inner-product search over ``vectors`` (its contents), a sample
    of them as queries, each query's own row left out."""
    return truth_hits(index, self_truth(vectors, k), params)


def queries_per_second(index: Any, queries: np.ndarray, k: int = 10, batched: bool = False) -> float:
    """Searches a second, one query at a time or all of ``queries`` in one call (repeated for at least 0.2 s)."""
    t0, done = time.perf_counter(), 0
    while True:
        if batched:
            index.search(queries, k)
        else:
            for q in queries:
                index.search(q[None, :], k)
        done += len(queries)
        elapsed = time.perf_counter() - t0
        if elapsed >= 0.2:
            return done / elapsed


def combined_recall(parts: list[tuple[int, int, int]]) -> dict:
    parts = [p for p in parts if p[1]]
    if not parts:
        return {"value": 1.0, "k": 0, "sample": 0}
    hits, asked = sum(p[0] for p in parts), sum(p[1] * p[2] for p in parts)
    return {"value": hits / asked, "k": max(p[2] for p in parts), "sample": sum(p[1] for p in parts)}


def measure(indexes: list[tuple[Any, Truth]]) -> dict:
    """Recall@k of every (index, its truth) together, each searched with the parameters set on it."""
    return combined_recall([truth_hits(index, truth) for index, truth in indexes])


def ladder(index: Any) -> tuple[tuple[str, ...], list[tuple[int, ...]]] | None:
    """The parameters a search of ``index`` can trade speed for recall with, and their values cheapest first
    (tuples, one value a parameter); None for exact ones."""
    faiss = faiss_backend.import_faiss()
    if isinstance(index, faiss.IndexHNSW):
        return ("efSearch",), [(v,) for v in EF_SEARCH]
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    nprobes = tuple(v for v in NPROBE if v <= ivf.nlist) or (ivf.nlist,)
    if isinstance(index, faiss.IndexRefine):
        return ("nprobe", "k_factor_rf"), [(p, f) for p in nprobes for f in K_FACTOR]
    return ("nprobe",), [(v,) for v in nprobes]


def tune(indexes: list[tuple[Any, Truth]], default: dict, target: float = RECALL_TARGET) -> tuple[dict, dict]:
    """Search parameters that reach ``target`` recall@10 on each (index, its truth), cheapest first, and the
    recall and speed (single-query and batched) measured with them (``tuned``: what was tried; ``reached``: whether
    the target was). Exact indexes keep ``default``. The parameters are left set on the indexes."""
    steps = ladder(indexes[0][0]) if indexes else None
    params, extra = default, {}
    if steps is None:
        recall = measure(indexes)
    else:
        names, values = steps
        tried = []
        for value in values:
            params = {**default, **dict(zip(names, value, strict=True))}
            for index, _ in indexes:
                faiss_backend.apply_params(index, params)
            recall = measure(indexes)
            tried.append([*value, round(recall["value"], 4)])
            if recall["value"] >= target:
                break
        extra["tuned"] = {"/".join(names): tried}
    speed = {}
    if indexes and len(indexes[0][1].queries):
        index, queries = indexes[0][0], indexes[0][1].queries
        speed["queries_per_second"] = round(queries_per_second(index, queries[:64]))
        speed["queries_per_second_batched"] = round(queries_per_second(index, queries, batched=True))
    return params, {**recall, "target": target, "reached": recall["value"] >= target, **extra, **speed}
