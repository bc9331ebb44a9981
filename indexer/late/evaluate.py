"""What a late-interaction index costs in quality, measured at build time and written in its manifest.

Sample queries are token sets of the index's own rows (up to ``QUERY_TOKENS`` of their tokens, from every
modality); a query's own item is excluded from its results. Three recalls@10, each against exhaustive MaxSim:

- ``storage``: exhaustive MaxSim over the stored tokens (pooled and/or compressed) against exhaustive MaxSim
  over the encoder's fp16 tokens: what pooling and compression cost (absent when the tokens are stored as is).
- ``engine``: the PLAID-like fast path at default settings against exhaustive MaxSim over the stored tokens.
  The service also adds the dense index's top rows to the candidates; this measure does not, so it is a floor.
- ``end_to_end``: the fast path over the stored tokens against exhaustive MaxSim over the encoder's tokens.

Plus the late calibration statistics: mean and spread of the top-10 late scores that queries of modality q
get among rows of modality t (``"q->t"``), so results that mix modalities can be z-normalised as dense ones are,
and indexer.calibration's fits on the late scores of a larger sample (``score_calibration``).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from indexer import calibration as score_calibration
from indexer.late.kernels import Take, array_take, ranges_to_indices
from indexer.late.pipeline import LateParams, late_search

SAMPLE = 96  # queries, spread over the modalities
CALIBRATION_SAMPLE = 384  # queries of the score calibration's fits (indexer.calibration)
QUERY_TOKENS = 32
K = 10
SLAB = 1 << 14  # item tokens per product: [SAMPLE * QUERY_TOKENS, SLAB] float32 stays near 200 MB


def sample_queries(
    vectors: np.ndarray, offsets: np.ndarray, ranges: dict[str, list[int]], seed: int = 2, total: int = SAMPLE
) -> list[tuple[str, int, np.ndarray]]:
    """(modality, row, query tokens float32 [<= QUERY_TOKENS, D]) for rows with tokens, spread over modalities."""
    rng = np.random.default_rng(seed)
    per = max(1, total // max(len(ranges), 1))
    out = []
    for modality, (start, end) in sorted(ranges.items()):
        rows = np.arange(start, end)
        rows = rows[np.diff(offsets)[rows] > 0]
        for row in np.sort(rng.choice(rows, size=min(per, len(rows)), replace=False)):
            n = int(offsets[row + 1] - offsets[row])
            pick = np.sort(rng.choice(n, size=min(n, QUERY_TOKENS), replace=False))
            out.append((modality, int(row), np.asarray(vectors[offsets[row] + pick], dtype=np.float32)))
    return out


def row_scores(queries: list[np.ndarray], take: Take, offsets: np.ndarray) -> np.ndarray:
    """float32 [Q, R]: exact MaxSim of every query against every row, all queries in one product per slab (each
    slab of tokens is decoded once for all of them). Rows without tokens score -inf."""
    lengths = np.array([len(q) for q in queries], dtype=np.int64)
    q_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stacked = np.concatenate(queries).astype(np.float32)
    n_rows = len(offsets) - 1
    out = np.full((len(queries), n_rows), -np.inf, dtype=np.float32)
    row_end = offsets[1:]
    r = 0
    while r < n_rows:
        h = max(r + 1, int(np.searchsorted(row_end, offsets[r] + SLAB, side="right")))
        rows = np.arange(r, h)
        length = offsets[rows + 1] - offsets[rows]
        full = rows[length > 0]
        if len(full):
            sim = stacked @ take(ranges_to_indices(offsets[full], length[length > 0])).T
            starts = np.concatenate([[0], np.cumsum(length[length > 0])[:-1]])
            best = np.maximum.reduceat(sim, starts, axis=1)  # [sum Lq, rows]: each query token's best match
            out[:, full] = np.add.reduceat(best, q_starts, axis=0) / lengths[:, None]
        r = h
    return out


def item_topk(scores: np.ndarray, row_item: np.ndarray, exclude: np.ndarray, k: int = K) -> list[set[int]]:
    """The top-k items of each query by their best row (the per-modality max), its own item excluded."""
    order = np.argsort(row_item, kind="stable")
    items, starts = np.unique(row_item[order], return_index=True)
    best = np.full((len(scores), int(row_item.max()) + 1), -np.inf, dtype=np.float32)
    best[:, items] = np.maximum.reduceat(scores[:, order], starts, axis=1)
    best[np.arange(len(scores)), exclude] = -np.inf
    n_items = len(items)
    k = min(k, n_items - 1)
    top = np.argpartition(-best, k - 1, axis=1)[:, :k]
    return [set(t[np.isfinite(best[q, t])].tolist()) for q, t in enumerate(top)]


def recall(found: list[set[int]], truth: list[set[int]]) -> float:
    hits = sum(len(f & t) for f, t in zip(found, truth, strict=True))
    return round(hits / max(sum(len(t) for t in truth), 1), 4)


def measure_late(
    raw_vectors: np.ndarray,
    raw_offsets: np.ndarray,
    row_item: np.ndarray,
    store,  # noqa: ANN001 - the TokenStore written from them
    ranges: dict[str, list[int]],
    params: LateParams | None = None,
) -> dict:
    params = params or LateParams()
    queries = sample_queries(raw_vectors, raw_offsets, ranges)
    if not queries:
        return {}
    tokens = [q for _, _, q in queries]
    own = row_item[[row for _, row, _ in queries]]
    raw = row_scores(tokens, array_take(raw_vectors), raw_offsets)
    truth_raw = item_topk(raw, row_item, own)
    transformed = store.meta["storage"] != "fp16" or store.meta["pool_factor"] > 1
    stored = row_scores(tokens, store.take, store.offsets) if transformed else raw
    truth_stored = item_topk(stored, row_item, own) if transformed else truth_raw
    found = []
    for q, item in zip(tokens, own, strict=True):
        allowed = np.ones(len(row_item), dtype=bool)
        allowed[row_item == item] = False
        found.append(set(late_search(store, q, K, allowed, params).items.tolist()))
    differs = [f"pool factor {store.meta['pool_factor']}"] if store.meta["pool_factor"] > 1 else []
    if store.meta["storage"] != "fp16":
        differs.append(f"{store.meta['nbits']}-bit residuals")
    return {
        "k": K,
        "sample": len(queries),
        "query_tokens": f"up to {QUERY_TOKENS} tokens of a row, its own item excluded",
        "storage_recall_at_10": (
            {"value": recall(truth_stored, truth_raw), "cost_of": differs} if transformed else None
        ),
        "engine_recall_at_10": {"value": recall(found, truth_stored), "params": asdict(params)},
        "end_to_end_recall_at_10": recall(found, truth_raw),
        "calibration": calibration(stored, queries, ranges, row_item),
        "score_calibration": fit_calibration(store, raw_vectors, raw_offsets, ranges, row_item),
    }


def fit_calibration(
    store,  # noqa: ANN001 - the TokenStore
    raw_vectors: np.ndarray,
    raw_offsets: np.ndarray,
    ranges: dict[str, list[int]],
    row_item: np.ndarray,
) -> dict:
    """indexer.calibration's fits on the late scores (over the stored tokens) of CALIBRATION_SAMPLE sample queries:
    more than the recall sample, as a fit per modality pair needs a few dozen relevant pairs."""
    queries = sample_queries(raw_vectors, raw_offsets, ranges, seed=4, total=CALIBRATION_SAMPLE)
    scores = row_scores([q for _, _, q in queries], store.take, store.offsets)
    blocks = {}
    for q in sorted({m for m, _, _ in queries}):
        picked = [i for i, (m, _, _) in enumerate(queries) if m == q]
        blocks[q] = (scores[picked], np.array([queries[i][1] for i in picked]))
    return score_calibration.fit(blocks, ranges, row_item)


def calibration(
    scores: np.ndarray, queries: list[tuple[str, int, np.ndarray]], ranges: dict[str, list[int]], row_item: np.ndarray
) -> dict:
    stats = {}
    for q in sorted({m for m, _, _ in queries}):
        picked = [i for i, (m, _, _) in enumerate(queries) if m == q]
        for t, (start, end) in sorted(ranges.items()):
            block = scores[picked, start:end].copy()
            for j, i in enumerate(picked):
                block[j, row_item[start:end] == row_item[queries[i][1]]] = -np.inf  # the query's own item
            k = min(K, end - start)
            top = -np.sort(-block, axis=1)[:, :k]
            top = top[np.isfinite(top)]
            if len(top):
                stats[f"{q}->{t}"] = {"mean": float(top.mean()), "std": float(top.std()), "sample": len(picked)}
    return stats


__all__ = ["measure_late", "row_scores", "sample_queries"]
