"""Recall of an approximate FAISS index against exact search, and its search parameters tuned to a recall target.

Queries are a sample of the index's own vectors, each left out of its own answers (truth and found alike), so the
measure behaves as for queries from outside the index rather than counting every query's own vector as a hit;
ties in the exact scores are tolerated.
Tuning walks a ladder of ``efSearch`` (HNSW) or ``nprobe`` (IVF) values, cheapest first, and keeps the first that
reaches the target on every modality's index of a segment (the last one if none does; the manifest then says so).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer import faiss_backend

RECALL_SAMPLE = 256
RECALL_TARGET = 0.95  # recall@10 against exact search, the default every tuned segment is held to
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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
    """Exact answers of sample queries: the k-th best exact inner product of each (its own row, if any, left out)."""

    queries: np.ndarray
    kth: np.ndarray
    k: int
    own: np.ndarray | None  # each query's own row in the vectors, or None for queries from outside


def exact_truth(
    vectors: np.ndarray, queries: np.ndarray, k: int = 10, own: np.ndarray | None = None, chunk: int = 65_536
) -> Truth:
    """Brute-force top-``k`` scores of ``queries`` over ``vectors`` in chunks of rows (memory: queries x chunk), each
    query's ``own`` row left out of its answers."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    index = np.arange(len(queries))
    for start in range(0, vectors.shape[0], chunk):
        scores = queries @ vectors[start : start + chunk].T
        if own is not None:
            inside = (own >= start) & (own < start + scores.shape[1])
            scores[index[inside], own[inside] - start] = -np.inf
        merged = np.concatenate([best, scores], axis=1)
        best = -np.partition(-merged, k - 1, axis=1)[:, :k]
    return Truth(queries=queries, kth=best.min(axis=1), k=k, own=own)


def truth_hits(index: Any, vectors: np.ndarray, truth: Truth, params: Any = None) -> tuple[int, int, int]:
    """(hits, queries, k): found rows whose exact score reaches the k-th best exact score (ties tolerated)."""
    if truth.k < 1 or not len(truth.queries):
        return 0, 0, 0
    extra = 0 if truth.own is None else 1
    q, k = truth.queries, truth.k
    _, found = index.search(q, k + extra) if params is None else index.search(q, k + extra, params=params)
    hits = 0
    for i, f in enumerate(found):
        own = -2 if truth.own is None else int(truth.own[i])
        got = [r for r in f.tolist() if r != own and r >= 0][:k]
        if got:
            hits += int((vectors[got] @ q[i] >= truth.kth[i] - 1e-5).sum())
    return hits, len(q), k


def self_truth(vectors: np.ndarray, k: int = 10) -> Truth:
    """The truth of a sample of ``vectors``' own rows as queries, each left out of its own answers."""
    n = vectors.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return Truth(queries=vectors[:0], kth=np.zeros(0, np.float32), k=0, own=np.zeros(0, np.int64))
    rows = sample_rows(n)
    return exact_truth(vectors, vectors[rows], k, own=rows)


def recall_hits(index: Any, vectors: np.ndarray, k: int = 10, params: Any = None) -> tuple[int, int, int]:
    """(hits, queries, k) of ``index`` against exact inner-product search over ``vectors`` (its contents), a sample
    of them as queries, each query's own row left out. Ties are tolerated (as faiss.contrib.evaluation does): a
    found row is a hit when its exact score reaches the k-th best exact score, so an exact index scores 1.0 even
    where duplicate vectors make the order of equals arbitrary."""
    return truth_hits(index, vectors, self_truth(vectors, k), params)


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


def ladder(index: Any) -> tuple[str, tuple[int, ...]] | None:
    """The parameter a search of ``index`` can trade speed for recall with, and its values; None for exact ones."""
    faiss = faiss_backend.import_faiss()
    if isinstance(index, faiss.IndexHNSW):
        return "efSearch", EF_SEARCH
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", tuple(v for v in NPROBE if v <= ivf.nlist) or (ivf.nlist,)
    return None


def tune(indexes: list[tuple[Any, np.ndarray]], default: dict, target: float = RECALL_TARGET) -> tuple[dict, dict]:
    """Search parameters that reach ``target`` recall@10 on each (index, its vectors), cheapest first, and the
    recall and speed (single-query and batched) measured with them (``tuned``: what was tried; ``reached``: whether
    the target was). The exact answers are computed once. Exact indexes keep ``default``."""
    truths = [self_truth(v) for _, v in indexes]

    def measure() -> dict:
        return combined_recall([truth_hits(i, v, t) for (i, v), t in zip(indexes, truths, strict=True)])

    steps = ladder(indexes[0][0]) if indexes else None
    params, extra = default, {}
    if steps is None:
        recall = measure()
    else:
        name, values = steps
        tried = []
        for value in values:
            params = {**default, name: value}
            for index, _ in indexes:
                faiss_backend.apply_params(index, params)
            recall = measure()
            tried.append([value, round(recall["value"], 4)])
            if recall["value"] >= target:
                break
        extra["tuned"] = {name: tried}
    speed = {}
    if indexes and len(truths[0].queries):
        index, queries = indexes[0][0], truths[0].queries
        speed["queries_per_second"] = round(queries_per_second(index, queries[:64]))
        speed["queries_per_second_batched"] = round(queries_per_second(index, queries, batched=True))
    return params, {**recall, "target": target, "reached": recall["value"] >= target, **extra, **speed}
