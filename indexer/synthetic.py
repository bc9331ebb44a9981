"""Synthetic clustered embeddings for tests and bench/scale.py: reproducible (a fixed seed), generated in chunks.

Each vector is a cluster centre plus a low-rank within-cluster variation plus a little isotropic noise, L2-normalised,
so that nearest neighbours mean something (isotropic noise alone makes every neighbour nearly equidistant in high
dimension, unlike real embeddings)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 65_536


def _model(dim: int, clusters: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(dim)  # rows of norm ~1
    return centres, basis


def clustered_chunks(
    n: int, dim: int, *, clusters: int = 1024, rank: int = 32, seed: int = 0, stream: int = 0, chunk: int = CHUNK
) -> Iterator[np.ndarray]:
    """``n`` float32 unit vectors [<=chunk, dim] chunk by chunk; the same arguments give the same rows. ``seed``
    picks the clusters, ``stream`` the draws from them (another stream: fresh queries from the same distribution)."""
    centres, basis = _model(dim, clusters, rank, seed)
    for i, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, stream, i])
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)]
        x = x + (0.9 / np.sqrt(rank)) * rng.standard_normal((m, rank)).astype(np.float32) @ basis
        x += 0.15 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x.astype(np.float32)


def clustered(n: int, dim: int, **kwargs: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    start = 0
    for part in clustered_chunks(n, dim, **kwargs):
        out[start : start + len(part)] = part
        start += len(part)
    return out
