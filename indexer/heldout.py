"""Held-out exact answers kept in a segment, so that `xmodal index verify` can re-measure recall against exact search
over the original float vectors after they are gone (a segment keeps only its FAISS indexes, whose compressed codes
would otherwise be the only truth left, hiding the compression's loss).

At build time two disjoint samples of a modality's rows are drawn: one tunes the search parameters
(indexer.tuning.tune), the other is held out and measured once the parameters are set. The held-out queries (the
rows' float vectors), their own rows and their exact answers (the best ``tuning.KEEP`` rows and scores by brute
force over every float vector of the modality) are written as ``.npy`` files under ``heldout/`` and checksummed
with the segment's other files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from indexer.tuning import RECALL_SAMPLE, Truth

FOLDER = "heldout"
PARTS = ("queries", "own", "ids", "scores")


def split_samples(n: int, size: int = RECALL_SAMPLE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tuning rows, held-out rows), disjoint, ``size`` each at most; a modality of at most ``size`` rows has none to
    hold out, and its held-out sample is the tuning sample."""
    order = np.random.default_rng(seed).permutation(n)
    tune = order[:size]
    held = order[size : 2 * size]
    return tune, (held if len(held) else tune)


def path(folder: Path, modality: str, part: str) -> Path:
    return folder / FOLDER / f"{modality}.{part}.npy"


def files(modality: str) -> dict[str, str]:
    return {
        f"{FOLDER}/{modality}.queries.npy": f"held-out sample queries of the {modality} rows (their float vectors)",
        f"{FOLDER}/{modality}.own.npy": "each held-out query's own row (left out of its answers)",
        f"{FOLDER}/{modality}.ids.npy": "each held-out query's exact best rows over the original float vectors",
        f"{FOLDER}/{modality}.scores.npy": "their exact inner products, best first",
    }


def write(folder: Path, modality: str, truth: Truth) -> None:
    (folder / FOLDER).mkdir(exist_ok=True)
    own = truth.own if truth.own is not None else np.full(len(truth.queries), -1, dtype=np.int64)
    for part, array in zip(PARTS, (truth.queries, own, truth.ids, truth.scores), strict=True):
        np.save(path(folder, modality, part), np.ascontiguousarray(array), allow_pickle=False)


def read(folder: Path, modality: str, k: int) -> Truth | None:
    """The held-out truth of a modality (None for a segment written before it was kept)."""
    if not path(folder, modality, "queries").exists():
        return None
    queries, own, ids, scores = (np.load(path(folder, modality, p), allow_pickle=False) for p in PARTS)
    return Truth(queries=queries, ids=ids, scores=scores, k=k, own=own)
