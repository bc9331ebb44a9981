"""The token store of a segment (``tokens/``): every row's token vectors for late interaction.

CSR layout, memory-mapped (RAM follows the working set), one ``.npy`` per array and a ``meta.json`` that
says what each file is:

- ``offsets.npy`` int64 [R+1]: row r's tokens are numbers ``offsets[r]:offsets[r+1]``. A row is one item seen
  through one modality (as in the dense index), so every token of a row has that row's modality: the modality
  of a token is its row's (``manifest.rows`` gives each modality's row range).
- ``row_item.npy`` int32 [R]: the item each row belongs to (rows of one item across modalities share it).
- ``vectors.npy`` float16 [T, D] (storage ``fp16``), or ``residuals.npy`` uint8 [T, D*nbits/8] (storage
  ``residual``: token ≈ normalise(centroid + residual), the residual in nbits bits a dimension on average, as
  ColBERTv2's; transform-coded, see ``ResidualCodec``) with ``rotation.npy``, ``bits.npy``, ``levels.npy`` and
  ``cutoffs.npy``. Stores written before transform coding have ``buckets.npy`` instead and still read.
- ``centroids.npy`` float32 [K, D] (spherical k-means of the tokens), ``codes.npy`` uint16 [T] (each token's
  centroid), ``ivf_offsets.npy`` int64 [K+1] and ``ivf_rows.npy`` int32: the rows having a token in each
  centroid, for PLAID-like candidate generation.

Optional token pooling merges similar tokens of one row (Ward clustering, ``pool_factor`` tokens per pooled
token) before anything else is built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from indexer.faiss_backend import import_faiss
from indexer.late.codec import LEVEL_BITS, ResidualCodec
from indexer.late.kernels import (
    Similarity,
    blockwise,
    gathered_product,
    l2_normalise,
    ranges_to_indices,
    rows_product,
    token_product,
)
from indexer.late.maxsim import Segments
from indexer.late.pooling import pool_rows
from models.errors import BundleError, InvalidInput
from models.files import read_json

FORMAT = "xmodal.tokens/1"
META = "meta.json"
STORAGES = ("fp16", "residual")
ASSIGN_CHUNK = 1 << 16


def default_centroids(n_tokens: int) -> int:
    """A power of two near 2*sqrt(T): ~sqrt(T)/2 tokens per centroid, cheap to train and to probe."""
    k = 2 ** round(math.log2(max(2.0 * math.sqrt(max(n_tokens, 1)), 1)))
    return int(min(max(k, 8), 1 << 16, max(n_tokens // 4, 1)))


def train_centroids(vectors: np.ndarray, k: int, seed: int, niter: int = 10) -> np.ndarray:
    """Spherical k-means on a sample (at most 64 tokens per centroid) of the tokens."""
    faiss = import_faiss()
    rng = np.random.default_rng(seed)
    n = len(vectors)
    sample = np.sort(rng.choice(n, size=min(n, k * 64), replace=False))
    x = np.ascontiguousarray(vectors[sample], dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, max_points_per_centroid=64, verbose=False)
    km.train(x)
    return l2_normalise(km.centroids)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (max inner product) of every token, in chunks (vectors may be memory-mapped)."""
    faiss = import_faiss()
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    codes = np.empty(len(vectors), dtype=np.uint16 if len(centroids) <= 1 << 16 else np.int32)
    for start in range(0, len(vectors), ASSIGN_CHUNK):
        chunk = np.ascontiguousarray(vectors[start : start + ASSIGN_CHUNK], dtype=np.float32)
        codes[start : start + len(chunk)] = index.search(chunk, 1)[1][:, 0]
    return codes


def build_ivf(codes: np.ndarray, offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For every centroid, the sorted distinct rows that have a token in it (CSR: offsets [K+1], rows)."""
    n_rows = len(offsets) - 1
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(offsets))
    pairs = np.unique(codes.astype(np.int64) * n_rows + row_of)
    cent, rows = pairs // n_rows, (pairs % n_rows).astype(np.int32)
    ivf_offsets = np.concatenate([[0], np.cumsum(np.bincount(cent, minlength=k))]).astype(np.int64)
    return ivf_offsets, rows


def write_token_store(
    path: Path,
    vectors: np.ndarray,
    offsets: np.ndarray,
    row_item: np.ndarray,
    *,
    storage: str = "fp16",
    nbits: int = 2,
    pool_factor: int = 1,
    centroids: int | None = None,
    seed: int = 0,
) -> dict:
    """Write ``tokens/`` into a version's staging folder from fp16/fp32 ``vectors`` [T, D] and ``offsets``;
    returns its meta (also written as meta.json). Pooling and compression happen here."""
    if storage not in STORAGES:
        raise InvalidInput(f"token storage must be one of {STORAGES}, not {storage!r}")
    if pool_factor < 1:
        raise InvalidInput(f"pool factor must be >= 1, not {pool_factor}")
    dim = vectors.shape[1]
    if storage == "residual" and dim % (8 // nbits if nbits in (1, 2, 4, 8) else 1):
        raise InvalidInput(f"dimension {dim} is not a multiple of {8 // nbits} ({nbits}-bit residuals pack a byte)")
    raw_tokens = int(offsets[-1])
    if pool_factor > 1:
        vectors, offsets = pool_rows(vectors, offsets, pool_factor)
    n_tokens = int(offsets[-1])
    if n_tokens == 0:
        raise InvalidInput("no token vectors to store")
    path.mkdir(parents=True, exist_ok=True)
    k = centroids or default_centroids(n_tokens)
    cents = train_centroids(vectors, k, seed)
    codes = assign(vectors, cents)
    ivf_offsets, ivf_rows = build_ivf(codes, offsets, len(cents))
    arrays = {
        "offsets": offsets,
        "row_item": np.asarray(row_item, dtype=np.int32),
        "centroids": cents,
        "codes": codes,
        "ivf_offsets": ivf_offsets,
        "ivf_rows": ivf_rows,
    }
    meta: dict = {"storage": storage}
    if storage == "fp16":
        arrays["vectors"] = np.asarray(vectors, dtype=np.float16)
    else:
        sample = np.random.default_rng(seed).choice(n_tokens, size=min(n_tokens, 1 << 16), replace=False)
        sample.sort()
        codec = ResidualCodec.fit(_residuals(vectors, cents, codes, sample), nbits)
        packed = np.empty((n_tokens, codec.n_bytes), dtype=np.uint8)
        for start in range(0, n_tokens, ASSIGN_CHUNK):
            part = np.arange(start, min(start + ASSIGN_CHUNK, n_tokens))
            packed[part] = codec.encode(_residuals(vectors, cents, codes, part))
        arrays["residuals"] = packed
        arrays["rotation"] = np.eye(dim, dtype=np.float32) if codec.rotation is None else codec.rotation
        arrays["bits"] = codec.bits.astype(np.uint8)
        arrays["levels"] = codec.values
        arrays["cutoffs"] = codec.cutoffs
        meta["nbits"] = nbits
        meta["codec"] = "pca"
        meta["bits_histogram"] = {str(b): int(np.sum(codec.bits == b)) for b in LEVEL_BITS}
    for name, array in arrays.items():
        np.save(path / f"{name}.npy", array)
    meta.update(
        {
            "format": FORMAT,
            "dim": dim,
            "rows": len(offsets) - 1,
            "tokens": n_tokens,
            "tokens_before_pooling": raw_tokens,
            "pool_factor": pool_factor,
            "centroids": len(cents),
            "bytes": sum((path / f"{name}.npy").stat().st_size for name in arrays),
            "files": {
                "offsets.npy": "int64 [R+1]: row r's tokens are offsets[r]:offsets[r+1]",
                "row_item.npy": "int32 [R]: the item of each row",
                "centroids.npy": "float32 [K, D]: spherical k-means centroids of the tokens",
                "codes.npy": "[T]: each token's centroid",
                "ivf_offsets.npy": "int64 [K+1]: CSR over ivf_rows",
                "ivf_rows.npy": "int32: rows having a token in each centroid",
                **(
                    {"vectors.npy": "float16 [T, D] token vectors"}
                    if storage == "fp16"
                    else {
                        "residuals.npy": f"uint8 [T, D*{nbits}/8]: packed bucket numbers of the rotated residual",
                        "rotation.npy": "float32 [D, D]: principal directions of the residuals (rows), z = r @ R.T",
                        "bits.npy": "uint8 [D]: bits of each rotated coordinate (0, 1, 2, 4 or 8), non-increasing",
                        "levels.npy": "float32 [D, 256]: value of each bucket per rotated coordinate",
                        "cutoffs.npy": "float32 [D, 255]: bucket edges per rotated coordinate (for encoding)",
                    }
                ),
            },
        }
    )
    meta["bytes_per_token"] = round(meta["bytes"] / n_tokens, 2)
    (path / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _residuals(vectors: np.ndarray, cents: np.ndarray, codes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.asarray(vectors[idx], dtype=np.float32) - cents[codes[idx]]


class TokenStore:
    """A token store opened read-only, its arrays memory-mapped."""

    def __init__(self, path: Path) -> None:
        try:
            self.meta = read_json(path / META)
            load = lambda name: np.load(path / f"{name}.npy", mmap_mode="r")  # noqa: E731
            self.offsets = np.asarray(load("offsets"))
            self.row_item = np.asarray(load("row_item"))
            self.centroids = np.ascontiguousarray(load("centroids"))
            # np.asarray: plain arrays over the same mapped bytes (indexing them skips np.memmap's Python wrapper)
            self.codes = np.asarray(load("codes"))
            self.ivf_offsets = np.asarray(load("ivf_offsets"))
            self.ivf_rows = np.asarray(load("ivf_rows"))
            if self.meta["storage"] == "fp16":
                self.vectors = load("vectors")
                self._plain = np.asarray(self.vectors)
            else:
                self.residuals = load("residuals")
                self._plain = np.asarray(self.residuals)
                if self.meta.get("codec") == "pca":
                    self.codec = ResidualCodec(
                        self.meta["nbits"],
                        np.asarray(load("bits"), dtype=np.int64),
                        np.zeros((0, 255), np.float32),  # encoding only
                        np.asarray(load("levels")),
                        np.ascontiguousarray(load("rotation")),
                    )
                else:  # written before transform coding: plain per-dimension buckets
                    self.codec = ResidualCodec.from_buckets(np.asarray(load("buckets")), self.meta["nbits"])
                self._tables = self.codec.decode_tables()
                coded = sum(seg.dims for seg, _ in self._tables)
                rotated = self.centroids if self.codec.rotation is None else self.centroids @ self.codec.rotation.T
                self._centroids_coded = np.ascontiguousarray(rotated[:, :coded], dtype=np.float32)
                self._centroid_norm2 = np.sum(self.centroids.astype(np.float64) ** 2, axis=1).astype(np.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"token store {path} cannot be read: {exc}") from exc
        if self.meta.get("format") != FORMAT or len(self.offsets) != self.meta["rows"] + 1:
            raise BundleError(f"token store {path} does not match its meta.json")
        # item → its rows (CSR), for all-modality scoring and per-item expansion of candidates
        order = np.argsort(self.row_item, kind="stable")
        counts = np.bincount(self.row_item, minlength=int(self.row_item.max()) + 1 if len(self.row_item) else 0)
        self.item_rows = order.astype(np.int64)
        self.item_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Token vectors [len(idx), D] float32 (decoded from residual codes when compressed)."""
        idx = np.asarray(idx)
        if self.meta["storage"] == "fp16":
            return self._plain[idx].astype(np.float32)
        approx = self.centroids[self.codes[idx]] + self.codec.decode(self._plain[idx], self._tables)
        return l2_normalise(approx)

    def similarity(self, query: np.ndarray, centroid_sim: np.ndarray | None = None) -> Similarity:
        """token numbers → float32 [Lq, n]: the query tokens' inner products with these stored tokens, as
        ``query @ take(idx).T`` but cheaper. fp16: the vectors are cast inside one ONNX Runtime product
        (``indexer.late.gathered_product``). Residual: nothing is decoded to full vectors. In the codec's rotated
        coordinates a token is normalise(c + z) with z zero past the coded coordinates, so
        q·token = (q·c + q[:coded]·z[:coded]) / |c + z|, where q·c comes from ``centroid_sim`` [Lq, K] (the
        query's centroid similarities, which the search has already) and |c + z|² = |c|² + 2 c·z + |z|² needs
        only the coded coordinates too."""
        q = np.ascontiguousarray(query, dtype=np.float32)
        if self.meta["storage"] == "fp16":
            return lambda idx: gathered_product(q, self._plain, np.asarray(idx))
        rot = self.codec.rotation
        coded = self._centroids_coded.shape[1]
        q_coded = np.ascontiguousarray((q if rot is None else q @ rot.T)[:, :coded])  # [Lq, coded]
        sim = token_product(q, self.centroids) if centroid_sim is None else centroid_sim
        by_centroid = np.ascontiguousarray(sim.T, dtype=np.float32)  # [K, Lq]: one contiguous row per token

        def block(part: np.ndarray) -> np.ndarray:
            codes = self.codes[part]
            z = self.codec.decode_rotated(self._plain[part], self._tables)
            raw = by_centroid[codes] + rows_product(z, q_coded)  # [n, Lq]
            cz = np.einsum("nd,nd->n", self._centroids_coded[codes], z)
            norm2 = self._centroid_norm2[codes] + 2 * cz + np.einsum("nd,nd->n", z, z)
            return (raw / np.sqrt(np.maximum(norm2, 1e-24))[:, None]).T

        def similarity(idx: np.ndarray) -> np.ndarray:
            idx = np.asarray(idx)
            return blockwise(len(q), len(idx), lambda a, b: block(idx[a:b]))

        return similarity

    def row_tokens(self, row: int) -> np.ndarray:
        return self.take(np.arange(self.offsets[row], self.offsets[row + 1]))

    def rows_of_items(self, items: np.ndarray) -> Segments:
        """Every row of each item, grouped by item."""
        items = np.asarray(items, dtype=np.int64)
        lengths = self.item_offsets[items + 1] - self.item_offsets[items]
        rows = self.item_rows[ranges_to_indices(self.item_offsets[items], lengths)]
        return Segments(rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
