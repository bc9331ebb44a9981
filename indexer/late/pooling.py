"""Token pooling: similar tokens of one row merged (Ward clustering, ``pool_factor`` tokens per pooled token), as
PyLate's pooling does, before a token store is built."""

from __future__ import annotations

import math

import numpy as np

from indexer.late.kernels import concat_rows, l2_normalise


def pool_row(tokens: np.ndarray, pool_factor: int) -> np.ndarray:
    """Merge a row's similar tokens: Ward clustering into ceil(n / pool_factor) clusters, each replaced by
    its normalised mean (the hierarchical pooling of Clavié et al., 2024)."""
    n = len(tokens)
    keep = math.ceil(n / pool_factor)
    if pool_factor <= 1 or n <= 2 or keep >= n:
        return tokens
    from scipy.cluster.hierarchy import fcluster, linkage

    labels = fcluster(linkage(np.asarray(tokens, dtype=np.float64), method="ward"), t=keep, criterion="maxclust")
    sums = np.zeros((labels.max(), tokens.shape[1]), dtype=np.float32)
    np.add.at(sums, labels - 1, tokens)
    return l2_normalise(sums[np.bincount(labels - 1) > 0])


def pool_rows(vectors: np.ndarray, offsets: np.ndarray, pool_factor: int) -> tuple[np.ndarray, np.ndarray]:
    pooled = [
        pool_row(np.asarray(vectors[offsets[r] : offsets[r + 1]], dtype=np.float32), pool_factor)
        for r in range(len(offsets) - 1)
    ]
    return concat_rows(pooled, vectors.shape[1])
