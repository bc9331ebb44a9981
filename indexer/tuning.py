"""Recall of an approximate FAISS index against exact search, and its search parameters tuned to a recall target.

Queries are a sample of the index's own vectors, each left out of its own answers (truth and found alike), so the
measure behaves as for queries from outside the index rather than counting every query's own vector as a hit;
ties in the exact scores are tolerated.
Tuning walks a ladder of ``efSearch`` (HNSW) or ``nprobe`` (IVF) values, cheapest first, and keeps the first that
reaches the target on every modality's index of a segment (the last one if none does; the manifest then says so).
"""

from __future__ import annotations

import time
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


def recall_hits(index: Any, vectors: np.ndarray, k: int = 10, params: Any = None) -> tuple[int, int, int]:
    """(hits, queries, k) of ``index`` against exact inner-product search over ``vectors`` (its contents), a sample
    of them as queries, each query's own row left out. Ties are tolerated (as faiss.contrib.evaluation does): a
    found row is a hit when its exact score reaches the k-th best exact score, so an exact index scores 1.0 even
    where duplicate vectors make the order of equals arbitrary."""
    n = vectors.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return 0, 0, 0
    rows = sample_rows(n)
    queries = np.ascontiguousarray(vectors[rows])
    scores = queries @ vectors.T
    scores[np.arange(len(rows)), rows] = -np.inf  # not its own answer
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    _, found = index.search(queries, k + 1) if params is None else index.search(queries, k + 1, params=params)
    hits = 0
    for i, (row, f) in enumerate(zip(rows.tolist(), found, strict=True)):
        got = [r for r in f.tolist() if r != row and r >= 0][:k]
        hits += int((scores[i, got] >= kth[i] - 1e-5).sum())
    return hits, len(rows), k


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
    recall and single-query speed measured with them (``tuned``: what was tried). Exact indexes keep ``default``."""
    steps = ladder(indexes[0][0]) if indexes else None
    if steps is None:
        return default, {**combined_recall([recall_hits(i, v) for i, v in indexes]), "target": target}
    name, values = steps
    tried = []
    for value in values:
        params = {**default, name: value}
        for index, _ in indexes:
            faiss_backend.apply_params(index, params)
        recall = combined_recall([recall_hits(i, v) for i, v in indexes])
        tried.append([value, round(recall["value"], 4)])
        if recall["value"] >= target:
            break
    queries = np.ascontiguousarray(indexes[0][1][sample_rows(len(indexes[0][1]), seed=1)[:64]])
    t0 = time.perf_counter()
    for q in queries:
        indexes[0][0].search(q[None, :], 10)
    per_query = (time.perf_counter() - t0) / max(len(queries), 1)
    return params, {**recall, "target": target, "tuned": {name: tried}, "queries_per_second": round(1 / per_query)}
