"""The token store of an index version (``tokens/``): every row's token vectors for late interaction.

CSR layout, memory-mapped (RAM follows the working set), one ``.npy`` per array and a ``meta.json`` that
says what each file is:

- ``offsets.npy`` int64 [R+1]: row r's tokens are numbers ``offsets[r]:offsets[r+1]``. A row is one item seen
  through one modality (as in the dense index), so every token of a row has that row's modality: the modality
  of a token is its row's (``manifest.rows`` gives each modality's row range).
- ``row_item.npy`` int32 [R]: the item each row belongs to (rows of one item across modalities share it).
- ``vectors.npy`` float16 [T, D] (storage ``fp16``), or ``residuals.npy`` uint8 [T, D*nbits/8] plus
  ``buckets.npy`` float32 [D, 2^nbits] (storage ``residual``: token ≈ normalise(centroid + residual), each
  residual coordinate one of 2^nbits per-dimension bucket values, ColBERTv2-style).
- ``centroids.npy`` float32 [K, D] (spherical k-means of the tokens), ``codes.npy`` uint16 [T] (each token's
  centroid), ``ivf_offsets.npy`` int64 [K+1] and ``ivf_rows.npy`` int32: the rows having a token in each
  centroid, for PLAID-like candidate generation.

Optional token pooling merges similar tokens of one row (Ward clustering, ``pool_factor`` tokens per pooled
token) before anything else is built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.faiss_backend import import_faiss
from indexer.late import Segments, ranges_to_indices
from models.errors import BundleError, InvalidInput
from models.files import read_json

FORMAT = "xmodal.tokens/1"
META = "meta.json"
STORAGES = ("fp16", "residual")
ASSIGN_CHUNK = 1 << 16


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --- pooling ------------------------------------------------------------------------------------------------
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


# --- centroids and residual codes ---------------------------------------------------------------------------
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


@dataclass
class ResidualCodec:
    """Each coordinate of a residual (token - its centroid) as one of 2^nbits values per dimension: bucket
    edges at the quantiles of a sample, bucket values at the mean of the sample in each bucket."""

    nbits: int
    cutoffs: np.ndarray  # [D, 2^nbits - 1]
    buckets: np.ndarray  # [D, 2^nbits]

    @classmethod
    def fit(cls, residuals: np.ndarray, nbits: int) -> ResidualCodec:
        if nbits not in (1, 2, 4, 8):
            raise InvalidInput(f"residual compression takes 1, 2, 4 or 8 bits per coordinate, not {nbits}")
        levels = 1 << nbits
        r = np.asarray(residuals, dtype=np.float32)
        cutoffs = np.quantile(r, np.arange(1, levels) / levels, axis=0).T.astype(np.float32)  # [D, levels-1]
        codes = _bucketise(r, cutoffs)
        buckets = np.zeros((r.shape[1], levels), dtype=np.float64)
        counts = np.zeros_like(buckets)
        dims = np.broadcast_to(np.arange(r.shape[1]), r.shape)
        np.add.at(buckets, (dims, codes), r)
        np.add.at(counts, (dims, codes), 1)
        mids = np.concatenate([cutoffs[:, :1], (cutoffs[:, 1:] + cutoffs[:, :-1]) / 2, cutoffs[:, -1:]], axis=1)
        buckets = np.where(counts > 0, buckets / np.maximum(counts, 1), mids)  # an empty bucket: its edges' middle
        return cls(nbits, cutoffs, buckets.astype(np.float32))

    @property
    def per_byte(self) -> int:
        return 8 // self.nbits

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        codes = _bucketise(np.asarray(residuals, dtype=np.float32), self.cutoffs).astype(np.uint8)
        n, d = codes.shape
        groups = codes.reshape(n, d // self.per_byte, self.per_byte)
        shifts = (np.arange(self.per_byte) * self.nbits).astype(np.uint8)
        return np.bitwise_or.reduce(groups << shifts, axis=2).astype(np.uint8)

    def decode_table(self) -> np.ndarray:
        """[D / per_byte, 256, per_byte] float32: the residual coordinates each byte value stands for, at each
        byte position; decoding is one gather."""
        d = self.buckets.shape[0]
        values = np.arange(256, dtype=np.int64)
        mask = (1 << self.nbits) - 1
        table = np.empty((d // self.per_byte, 256, self.per_byte), dtype=np.float32)
        for j in range(self.per_byte):
            level = (values >> (j * self.nbits)) & mask  # [256]
            table[:, :, j] = self.buckets[np.arange(j, d, self.per_byte)][:, level]
        return table


def _bucketise(r: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    out = np.zeros(r.shape, dtype=np.int64)
    for j in range(cutoffs.shape[1]):
        out += r > cutoffs[:, j]
    return out


def decode_residuals(table: np.ndarray, packed: np.ndarray) -> np.ndarray:
    positions = np.arange(table.shape[0])
    return table[positions[None, :], packed.astype(np.intp)].reshape(len(packed), -1)


# --- building -----------------------------------------------------------------------------------------------
def concat_rows(token_rows: Sequence[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 [T, D] vectors and int64 [R+1] offsets from one array of token vectors per row."""
    lengths = np.array([len(t) for t in token_rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    vectors = np.empty((int(offsets[-1]), dim), dtype=np.float16)
    for r, t in enumerate(token_rows):
        vectors[offsets[r] : offsets[r + 1]] = t
    return vectors, offsets


def pool_rows(vectors: np.ndarray, offsets: np.ndarray, pool_factor: int) -> tuple[np.ndarray, np.ndarray]:
    pooled = [
        pool_row(np.asarray(vectors[offsets[r] : offsets[r + 1]], dtype=np.float32), pool_factor)
        for r in range(len(offsets) - 1)
    ]
    return concat_rows(pooled, vectors.shape[1])


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
        packed = np.empty((n_tokens, dim // codec.per_byte), dtype=np.uint8)
        for start in range(0, n_tokens, ASSIGN_CHUNK):
            part = np.arange(start, min(start + ASSIGN_CHUNK, n_tokens))
            packed[part] = codec.encode(_residuals(vectors, cents, codes, part))
        arrays["residuals"] = packed
        arrays["buckets"] = codec.buckets
        meta["nbits"] = nbits
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
                        "residuals.npy": f"uint8 [T, D*{nbits}/8]: packed {nbits}-bit residual bucket per coordinate",
                        "buckets.npy": f"float32 [D, {1 << nbits}]: residual value of each bucket per dimension",
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


# --- reading ------------------------------------------------------------------------------------------------
class TokenStore:
    """A token store opened read-only, its arrays memory-mapped."""

    def __init__(self, path: Path) -> None:
        try:
            self.meta = read_json(path / META)
            load = lambda name: np.load(path / f"{name}.npy", mmap_mode="r")  # noqa: E731
            self.offsets = np.asarray(load("offsets"))
            self.row_item = np.asarray(load("row_item"))
            self.centroids = np.ascontiguousarray(load("centroids"))
            self.codes = load("codes")
            self.ivf_offsets = np.asarray(load("ivf_offsets"))
            self.ivf_rows = load("ivf_rows")
            if self.meta["storage"] == "fp16":
                self.vectors = load("vectors")
            else:
                self.residuals = load("residuals")
                codec = ResidualCodec(self.meta["nbits"], np.zeros(0), np.asarray(load("buckets")))
                self._table = codec.decode_table()
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
            return np.asarray(self.vectors[idx], dtype=np.float32)
        approx = self.centroids[self.codes[idx]] + decode_residuals(self._table, np.asarray(self.residuals[idx]))
        return l2_normalise(approx)

    def row_tokens(self, row: int) -> np.ndarray:
        return self.take(np.arange(self.offsets[row], self.offsets[row + 1]))

    def rows_of_items(self, items: np.ndarray) -> Segments:
        """Every row of each item, grouped by item."""
        items = np.asarray(items, dtype=np.int64)
        lengths = self.item_offsets[items + 1] - self.item_offsets[items]
        rows = self.item_rows[ranges_to_indices(self.item_offsets[items], lengths)]
        return Segments(rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
