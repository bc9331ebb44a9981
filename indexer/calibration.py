"""Scores comparable across modalities: per (query modality, target modality) maps of a score to a calibrated one,
fitted at build time from the index's own multimodal items, and the rule that fuses per-modality result lists.

The cosines of different modality pairs live on different scales (the contrastive gap): an image query's cosine
with another image is far higher than with any caption. A search over several target modalities gets one list
per target; each list's scores go through a monotone map of its own pair (so a modality's items never change
order among themselves), then:

1. near duplicates first: a row whose raw similarity reaches ``duplicate.threshold`` (0.99, or less where the
   build measured that compressed tokens score an exact duplicate lower) is the query itself or a copy of it,
   relevant whatever the calibration says; duplicates come first, by similarity;
2. the rest by calibrated score, ties by raw similarity (a plateau of an isotonic map never reorders a modality);
3. an item with several rows (a picture and its caption) is listed once, by its best row, in dense and late alike.

Methods (``calibration`` of a search):

- ``raw``: the cosine (late: MaxSim).
- ``zscore``: (score - mean) / std of the top-10 scores of the pair at build time (the only method before).
- ``platt``: P(relevant | score) = 1 / (1 + exp(-(a * score + b))), a logistic fit per pair.
- ``isotonic``: P(relevant | score) by isotonic regression (pool adjacent violators) per pair, linear between knots.
- ``centred``: score - the pair's mean score over all rows: for dense, <q - mu_q, x - mu_t> in expectation over
  the target rows (the modality means removed from both sides). The item-side term <mu_q, x> is left out on
  purpose: it differs between items of one modality, so keeping it would reorder them.
- ``rrf``: 1 / (60 + rank in its modality's list), reciprocal-rank fusion.

What is relevant at build time: the rows of one item are a relevant pair (a picture and its caption), rows of
other items are not. For a pair of different modalities a -> b, the training points are each sampled a-query's
top ``TOP`` rows of b plus its own item's b row, labelled 1 for its own item, 0 otherwise, from the queries whose
item has a b row. A pair of one modality (image -> image) has no such pairs apart from the query itself, so its
labels are carried over from the other modalities of each candidate item: the label of image row j is the
fitted P(relevant) of item j's caption (or sound) for the same query. An item is relevant or not whichever of
its rows is looked at, so this puts a -> a on the scale of a -> b. A pair with no positive at all (no item holds
both modalities) maps every score to 0: nothing in the index says such a row is ever relevant. A pair that could
not be fitted (no sample) makes the whole search fall back to ``zscore`` (or ``raw``), as for an index built
before these fits: see :func:`resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression, minimize
from scipy.special import expit

METHODS = ("raw", "zscore", "platt", "isotonic", "centred", "rrf")
FITTED = ("platt", "isotonic", "centred")  # need this module's fits in the manifest
PROBABILITIES = ("platt", "isotonic")  # scores are probabilities of relevance: a duplicate's is 1
DEFAULT = "isotonic"  # the best measured (bench/calibration.py, docs/calibration.md)
FALLBACK = "zscore"
DUPLICATE_SIMILARITY = 0.99
RRF_K = 60
TOP = 50  # candidates of each query per target modality in a fit: the region where rankings are decided
MAX_KNOTS = 64
SHRINK = 5.0  # pseudo-points at the base rate added to each isotonic block


def pair(query_modality: str | None, target: str) -> str:
    return f"{query_modality}->{target}"


# --- fitting ------------------------------------------------------------------------------------------------------


def fit_platt(x: np.ndarray, y: np.ndarray) -> dict:
    """Logistic regression of (soft) labels ``y`` on scores ``x``, slope kept positive (a monotone map)."""
    total = len(x)

    def loss(p: np.ndarray) -> tuple[float, np.ndarray]:
        z = p[0] * x + p[1]
        value = (y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)).sum() / total
        d = expit(z) - y
        return float(value), np.array([(d * x).sum() / total, d.sum() / total])

    res = minimize(loss, np.array([10.0, -5.0]), jac=True, method="L-BFGS-B", bounds=[(1e-3, 1e4), (-1e4, 1e4)])
    return {"a": float(res.x[0]), "b": float(res.x[1])}


def _blocks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the runs of equal values of a non-decreasing array."""
    edges = np.flatnonzero(np.diff(values) > 0) + 1
    return np.concatenate([[0], edges]), np.concatenate([edges, [len(values)]])


def fit_isotonic(x: np.ndarray, y: np.ndarray) -> dict:
    """Non-decreasing least squares fit of ``y`` on ``x`` (pool adjacent violators), each block's value shrunk
    towards the base rate by SHRINK pseudo-points (a block of a few points, the top one above all, would
    otherwise promise certainty from a handful of pairs), pooled again, and kept as at most MAX_KNOTS knots
    (each block's mean score, its value) to interpolate between."""
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    fitted = isotonic_regression(ys, increasing=True).x
    starts, ends = _blocks(fitted)
    sizes = (ends - starts).astype(np.float64)
    shrunk = (sizes * fitted[starts] + SHRINK * ys.mean()) / (sizes + SHRINK)
    pooled = isotonic_regression(shrunk, weights=sizes, increasing=True).x
    per_point = np.repeat(pooled, (ends - starts))
    starts, ends = _blocks(per_point)
    knots_x = np.array([xs[s:e].mean() for s, e in zip(starts, ends, strict=True)])
    knots_y = per_point[starts]
    if len(knots_x) > MAX_KNOTS:
        keep = np.unique(np.linspace(0, len(knots_x) - 1, MAX_KNOTS).round().astype(int))
        knots_x, knots_y = knots_x[keep], knots_y[keep]
    return {"x": [round(float(v), 6) for v in knots_x], "y": [round(float(v), 6) for v in knots_y]}


def apply(method: str, params: dict, scores: np.ndarray) -> np.ndarray:
    """A fitted pair's map applied to raw scores; monotone non-decreasing in every method."""
    scores = np.asarray(scores, dtype=np.float64)
    if method == "zscore":
        return (scores - params["mean"]) / max(params["std"], 1e-6)
    if method == "centred":
        return scores - params["centred"]["mean"]
    fit = params[method]
    if fit is None:  # no positive pair in the index: nothing says such a row is relevant
        return np.zeros_like(scores)
    if method == "platt":
        return expit(fit["a"] * scores + fit["b"])
    if method == "isotonic":
        return np.interp(scores, fit["x"], fit["y"])
    raise ValueError(f"unknown calibration {method!r}")


@dataclass
class _Points:
    """One pair's training points: per query, candidate target rows and their scores."""

    queries: list[int]  # positions in the score block
    rows: list[np.ndarray]  # absolute target rows
    scores: list[np.ndarray]
    labels: list[np.ndarray] | None  # None: a one-modality pair, labels carried over from other modalities


def _points(block: np.ndarray, query_rows: np.ndarray, a: str, b: str, ranges: dict, row_item: np.ndarray) -> _Points:
    """Each query's top TOP rows of b and its own item's b rows. For two modalities, only the queries whose item
    has a b row count; when none has, all queries do, as negatives (no item holds both: nothing is relevant)."""
    start, end = ranges[b]
    answerable, unanswerable = _Points([], [], [], None if a == b else []), _Points([], [], [], [])
    for qi, row in enumerate(query_rows.tolist()):
        scores = block[qi, start:end].astype(np.float64)
        own = row_item[start:end] == row_item[row]
        out = answerable
        if a == b:
            own[:] = False
            if start <= row < end:
                scores[row - start] = -np.inf  # the query itself: the duplicate rule's business
        elif not own.any():
            out = unanswerable
        finite = np.isfinite(scores)
        m = min(TOP, int(finite.sum()))
        if m == 0:
            continue
        top = np.argpartition(-np.where(finite, scores, -np.inf), m - 1)[:m]
        cand = np.union1d(top, np.flatnonzero(own & finite))
        out.queries.append(qi)
        out.rows.append(start + cand)
        out.scores.append(scores[cand])
        if out.labels is not None:
            out.labels.append(own[cand].astype(np.float64))
    return answerable if answerable.queries or a == b else unanswerable


def _row_modality(ranges: dict, n: int) -> list[str]:
    out = [""] * n
    for m, (s, e) in ranges.items():
        out[s:e] = [m] * (e - s)
    return out


def _items_index(row_item: np.ndarray):  # noqa: ANN202 - item -> its rows, from one argsort
    order = np.argsort(row_item, kind="stable")
    keys = row_item[order]

    def rows_of(item: int) -> np.ndarray:
        return order[np.searchsorted(keys, item, "left") : np.searchsorted(keys, item, "right")]

    return rows_of


def _fit_method(method: str, x: np.ndarray, y: np.ndarray) -> dict | None:
    if not (y > 0).any():
        return None
    return fit_platt(x, y) if method == "platt" else fit_isotonic(x, y)


def _brier(method: str, fit: dict | None, x: np.ndarray, y: np.ndarray) -> float:
    p = np.zeros_like(x) if fit is None else apply(method, {method: fit}, x)
    return round(float(np.mean((p - y) ** 2)), 6)


def fit(blocks: dict[str, tuple[np.ndarray, np.ndarray]], ranges: dict[str, list[int]], row_item: np.ndarray) -> dict:
    """The manifest's ``score_calibration`` entry. ``blocks``: for each query modality, (scores [Q, R] of sampled
    rows of that modality against every row of the index, those rows [Q]). Scores of rows that cannot match
    (no tokens) are -inf.

    Per pair: the training points' count and positives, the platt, isotonic and centring fits, and the Brier
    score of each probability fit on held-out queries (fit on the even queries, scored on the odd ones and the
    other way round) beside a constant base rate's (what the fit gains). Plus the duplicate threshold, the
    lowest score a sampled row got against itself, and how many sampled rows have a distinct row of their own
    modality at or above the threshold (distinct items that count as near duplicates)."""
    by_item = _items_index(row_item)
    pairs: dict[str, dict] = {}
    self_scores, near = [], []
    for a, (block, query_rows) in sorted(blocks.items()):
        if len(query_rows) == 0:
            continue
        s, e = ranges[a]
        own = block[np.arange(len(query_rows)), query_rows]
        self_scores += own[np.isfinite(own)].tolist()
        others = block[:, s:e].copy()
        others[np.arange(len(query_rows)), query_rows - s] = -np.inf
        near += others.max(axis=1).tolist()
        fits: dict[str, dict] = {"platt": {}, "isotonic": {}}
        points = {b: _points(block, query_rows, a, b, ranges, row_item) for b in sorted(ranges)}
        # pairs of two modalities first: a one-modality pair's labels come from them
        for b in sorted(ranges, key=lambda t: t == a):
            pts = points[b]
            if not pts.queries:
                continue
            entry: dict = {"queries": len(pts.queries)}
            halves = np.arange(len(pts.queries)) % 2
            brier: dict[str, dict] = {}
            for method in PROBABILITIES:
                if pts.labels is not None:
                    x, y = np.concatenate(pts.scores), np.concatenate(pts.labels)
                    split = np.concatenate([np.full(len(v), h) for v, h in zip(pts.scores, halves, strict=True)])
                else:
                    x, y, split = _carried(pts, block, a, fits[method], method, ranges, row_item, by_item, halves)
                if len(x) == 0:
                    continue
                entry.update(points=len(x), positives=round(float(y.sum()), 3))
                fits[method][pair(a, b)] = entry[method] = _fit_method(method, x, y)
                brier[method] = _held_out(method, x, y, split)
            if "points" not in entry:
                continue
            entry["centred"] = {"mean": _pair_mean(block, query_rows, ranges[b], a == b)}
            entry["held_out_brier"] = brier
            pairs[pair(a, b)] = entry
    threshold = DUPLICATE_SIMILARITY
    if self_scores:
        threshold = min(threshold, round(float(np.min(self_scores)) - 1e-3, 4))
    return {
        "methods": list(METHODS),
        "default": DEFAULT,
        "fallback": FALLBACK,
        "top": TOP,
        "pairs": pairs,
        "duplicate": {
            "threshold": threshold,
            "self_score_min": round(float(np.min(self_scores)), 6) if self_scores else None,
            "distinct_at_or_above": round(float(np.mean(np.array(near) >= threshold)), 4) if near else None,
            "sample": len(near),
        },
    }


def _carried(
    pts: _Points,
    block: np.ndarray,
    a: str,
    fits: dict,
    method: str,
    ranges: dict,
    row_item: np.ndarray,
    by_item,  # noqa: ANN001
    halves: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, fold) of a one-modality pair: each candidate row's label is the best fitted P(relevant)
    of its item's rows of other modalities for the same query; candidates whose item has no other modality (or
    no fitted pair) are left out."""
    modality_of = _row_modality(ranges, len(row_item))
    xs, ys, split = [], [], []
    for i, (qi, rows, scores) in enumerate(zip(pts.queries, pts.rows, pts.scores, strict=True)):
        for row, score in zip(rows.tolist(), scores.tolist(), strict=True):
            labels = [
                float(apply(method, {method: fits[pair(a, modality_of[o])]}, np.array([block[qi, o]]))[0])
                for o in by_item(row_item[row]).tolist()
                if modality_of[o] != a and pair(a, modality_of[o]) in fits and np.isfinite(block[qi, o])
            ]
            if labels:
                xs.append(score)
                ys.append(max(labels))
                split.append(halves[i])
    return np.array(xs), np.array(ys), np.array(split)


def _held_out(method: str, x: np.ndarray, y: np.ndarray, split: np.ndarray) -> dict:
    """Brier score of the fit and of the base rate on held-out queries (two folds), averaged over points."""
    fit_err = base_err = 0.0
    n = 0
    for h in (0, 1):
        train, test = split != h, split == h
        if not test.any() or not train.any():
            continue
        f = _fit_method(method, x[train], y[train])
        fit_err += _brier(method, f, x[test], y[test]) * test.sum()
        base_err += float(np.mean((y[train].mean() - y[test]) ** 2)) * test.sum()
        n += int(test.sum())
    if n == 0:
        return {}
    return {"fit": round(float(fit_err / n), 6), "base_rate": round(float(base_err / n), 6)}


def _pair_mean(block: np.ndarray, query_rows: np.ndarray, target: list[int], same: bool) -> float:
    """Mean score of the sampled queries over every target row (their own row left out), a few queries at a
    time (no float64 copy of a block of a large index)."""
    start, end = target
    total, count = 0.0, 0
    for a in range(0, len(query_rows), 16):
        sub = block[a : a + 16, start:end]
        finite = np.isfinite(sub)
        if same:
            finite[np.arange(len(sub)), query_rows[a : a + 16] - start] = False
        total += float(sub[finite].sum(dtype=np.float64))
        count += int(finite.sum())
    return round(total / max(count, 1), 6)


# --- at search time -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fusion:
    """How one search fuses its per-modality lists: the method in effect and what it reads."""

    method: str
    requested: str
    pairs: dict  # "q->t" -> fitted entry (platt/isotonic/centred) or z statistics (zscore)
    duplicate_threshold: float
    duplicates_first: bool = True  # False only to measure the ranking without the rule (bench/calibration.py)

    def scores(self, query_modality: str | None, target: str, similarities: np.ndarray) -> np.ndarray:
        """Calibrated scores of one target modality's list (in its order, best first)."""
        sims = np.asarray(similarities, dtype=np.float64)
        if self.method == "raw":
            return sims
        if self.method == "rrf":
            return 1.0 / (RRF_K + 1 + np.arange(len(sims)))
        return apply(self.method, self.pairs[pair(query_modality, target)], sims)

    def duplicate_score(self, score: float) -> float:
        """A near duplicate's score: certain relevance for probability methods, its own score otherwise."""
        return 1.0 if self.method in PROBABILITIES else score


def resolve(
    requested: str | None,
    fitted: dict | None,
    zstats: dict,
    query_modality: str | None,
    targets: list[str],
    duplicates_first: bool = True,
) -> Fusion:
    """The fusion a search gets. ``requested`` (default: the index's default, else DEFAULT) when the index holds
    what it needs for every (query modality, target) pair; otherwise ``zscore`` with the build's z statistics,
    else ``raw``: an index built before the fits, or a query of unknown modality (a raw embedding), still serves."""
    fitted = fitted or {}
    method = requested or (fitted.get("default") if fitted.get("default") in METHODS else DEFAULT)
    if method not in METHODS:
        raise ValueError(f"unknown calibration {method!r}")
    threshold = float((fitted.get("duplicate") or {}).get("threshold", DUPLICATE_SIMILARITY))
    names = [pair(query_modality, t) for t in targets]
    fits = fitted.get("pairs") or {}
    chosen = method
    if chosen in FITTED and (query_modality is None or not all(chosen in fits.get(n, {}) for n in names)):
        chosen = FALLBACK
    if chosen == "zscore" and (query_modality is None or not all(n in zstats for n in names)):
        chosen = "raw"
    return Fusion(chosen, method, zstats if chosen == "zscore" else fits, threshold, duplicates_first)


def fit_dense(vectors: np.ndarray, ranges: dict[str, list[int]], row_item: np.ndarray, sample: int, seed: int = 3):
    """:func:`fit` for the dense index: up to ``sample`` rows of each modality as queries, cosines against every
    row (one [sample, R] product per query modality)."""
    rng = np.random.default_rng(seed)
    blocks = {}
    for a, (s, e) in ranges.items():
        rows = np.sort(s + rng.choice(e - s, size=min(sample, e - s), replace=False))
        blocks[a] = (vectors[rows] @ vectors.T, rows)
    return fit(blocks, ranges, row_item)


__all__ = ["DEFAULT", "METHODS", "Fusion", "fit", "fit_dense", "resolve"]
