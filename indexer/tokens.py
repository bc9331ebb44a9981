"""The token store of an index version (``tokens/``): every row's token vectors for late interaction.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.faiss_backend import import_faiss
from indexer.late import (
    Segments,
    Similarity,
    blockwise,
    gathered_product,
    ranges_to_indices,
    rows_product,
    token_product,
)
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


# Bits a rotated residual coordinate may get: whole bytes then hold 8, 4, 2 or 1 of them.
LEVEL_BITS = (0, 1, 2, 4, 8)
LLOYD_ITERATIONS = 12


@dataclass
class Segment:
    """Consecutive rotated coordinates with the same bit width, packed 8 // bits to a byte."""

    dim_start: int
    dims: int
    bits: int
    byte_start: int

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def n_bytes(self) -> int:
        return self.dims // self.per_byte


@dataclass
class ResidualCodec:
    """Residuals (token - its centroid) in ``nbits`` bits per dimension on average: ``dim * nbits / 8`` bytes a
    token, what ColBERTv2's nbits residuals take. Transform coding: the residual is rotated onto the principal
    directions of a sample of residuals (``z = r @ rotation.T``) and the bits go where they lower the squared
    error most (``allocate_bits``: 0, 1, 2, 4 or 8 bits a coordinate; token vectors are far from isotropic, so
    a few directions get 8 bits and a flat tail none), each coded coordinate quantised by its own Lloyd-Max
    quantiser (``lloyd_max``). Coordinates are ordered by decreasing width, so equal widths pack into bytes.

    Without rotation (``rotation`` None: stores written before transform coding) every coordinate has ``nbits``
    bits: ColBERTv2's scheme (its buckets at quantiles)."""

    nbits: int
    bits: np.ndarray  # [D] int, non-increasing
    cutoffs: np.ndarray  # [D, 255] float32: the first 2^bits - 1 are used
    values: np.ndarray  # [D, 256] float32: the first 2^bits are used
    rotation: np.ndarray | None = None  # [D, D] float32, orthonormal rows

    @classmethod
    def fit(cls, residuals: np.ndarray, nbits: int, rotate: bool = True) -> ResidualCodec:
        if nbits not in (1, 2, 4, 8):
            raise InvalidInput(f"residual compression takes 1, 2, 4 or 8 bits per coordinate, not {nbits}")
        r = np.asarray(residuals, dtype=np.float32)
        dim = r.shape[1]
        if not rotate:
            bits = np.full(dim, nbits, dtype=np.int64)
            fits = {(i, nbits): lloyd_max(r[:, i], 1 << nbits) for i in range(dim)}
            return cls._assemble(nbits, bits, fits, None)
        second = (r.T.astype(np.float64) @ r) / max(len(r), 1)
        _, vecs = np.linalg.eigh(second)  # ascending
        rotation = np.ascontiguousarray(vecs[:, ::-1].T, dtype=np.float32)
        z = r @ rotation.T
        # The squared error of each coordinate at each width, measured with its fitted quantiser on the sample
        # (real residual coordinates are far from Gaussian: a formula would misjudge the wide widths).
        errors = np.zeros((dim, len(LEVEL_BITS)))
        errors[:, 0] = (z.astype(np.float64) ** 2).mean(axis=0)  # no bits: the coordinate decodes to 0
        floor = 1e-9 * max(errors[:, 0].sum(), 1e-30)
        fits: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for i in range(dim):
            if errors[i, 0] <= floor:  # nothing to code here: any width keeps the error it has
                errors[i, 1:] = errors[i, 0]
                continue
            col = z[:, i]
            for j, b in enumerate(LEVEL_BITS[1:], start=1):
                edges, means = fits[i, b] = lloyd_max(col, 1 << b)
                errors[i, j] = float(np.mean((col - means[np.searchsorted(edges, col)]) ** 2))
        bits = allocate_bits(errors, dim * nbits)
        order = np.argsort(-bits, kind="stable")  # rotated coordinates reordered: widths non-increasing
        bits = bits[order]
        fits = {(k, int(bits[k])): fits.get((int(i), int(bits[k]))) for k, i in enumerate(order) if bits[k]}
        for (k, b), fit in list(fits.items()):
            if fit is None:
                fits[k, b] = lloyd_max(z[:, order[k]], 1 << b)
        return cls._assemble(nbits, bits, fits, np.ascontiguousarray(rotation[order]))

    @classmethod
    def _assemble(cls, nbits: int, bits: np.ndarray, fits: dict, rotation: np.ndarray | None) -> ResidualCodec:
        dim = len(bits)
        cutoffs = np.zeros((dim, 255), dtype=np.float32)
        values = np.zeros((dim, 256), dtype=np.float32)
        for (i, _b), (edges, means) in fits.items():
            cutoffs[i, : len(edges)] = edges
            values[i, : len(means)] = means
        return cls(nbits, bits, cutoffs, values, rotation)

    @classmethod
    def from_buckets(cls, buckets: np.ndarray, nbits: int) -> ResidualCodec:
        """The decoder of a store written without rotation (``buckets.npy`` [D, 2^nbits])."""
        dim, levels = buckets.shape
        values = np.zeros((dim, 256), dtype=np.float32)
        values[:, :levels] = buckets
        return cls(nbits, np.full(dim, nbits, dtype=np.int64), np.zeros((dim, 255), np.float32), values, None)

    @property
    def dim(self) -> int:
        return len(self.bits)

    @property
    def n_bytes(self) -> int:
        return self.dim * self.nbits // 8

    def segments(self) -> list[Segment]:
        out, start, byte = [], 0, 0
        for b in sorted({int(b) for b in self.bits if b}, reverse=True):
            count = int(np.sum(self.bits == b))
            out.append(Segment(start, count, b, byte))
            start, byte = start + count, byte + out[-1].n_bytes
        return out

    def rotate(self, r: np.ndarray) -> np.ndarray:
        r = np.asarray(r, dtype=np.float32)
        return r if self.rotation is None else r @ self.rotation.T

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        z = self.rotate(residuals)
        packed = np.zeros((len(z), self.n_bytes), dtype=np.uint8)
        for seg in self.segments():
            dims = range(seg.dim_start, seg.dim_start + seg.dims)
            levels = (1 << seg.bits) - 1
            codes = np.empty((len(z), seg.dims), dtype=np.uint8)
            for j, i in enumerate(dims):
                codes[:, j] = np.searchsorted(self.cutoffs[i, :levels], z[:, i], side="left")
            groups = codes.reshape(len(z), seg.n_bytes, seg.per_byte)
            shifts = (np.arange(seg.per_byte) * seg.bits).astype(np.uint8)
            packed[:, seg.byte_start : seg.byte_start + seg.n_bytes] = np.bitwise_or.reduce(groups << shifts, axis=2)
        return packed

    def decode_tables(self) -> list[tuple[Segment, np.ndarray]]:
        """Per segment, [n_bytes, 256, per_byte] float32: the rotated coordinates each byte value stands for at
        each of its byte positions; decoding is one gather per segment."""
        values = np.arange(256, dtype=np.int64)
        out = []
        for seg in self.segments():
            mask = (1 << seg.bits) - 1
            table = np.empty((seg.n_bytes, 256, seg.per_byte), dtype=np.float32)
            dims = np.arange(seg.dim_start, seg.dim_start + seg.dims)
            for j in range(seg.per_byte):
                level = (values >> (j * seg.bits)) & mask
                table[:, :, j] = self.values[dims[j :: seg.per_byte]][:, level]
            out.append((seg, table))
        return out

    def decode_rotated(self, packed: np.ndarray, tables: list[tuple[Segment, np.ndarray]] | None = None) -> np.ndarray:
        """The coded rotated coordinates [n, coded] float32 (the first ``coded`` of ``z``; the rest decode to 0)."""
        packed = np.asarray(packed)
        tables = tables if tables is not None else self.decode_tables()
        coded = sum(seg.dims for seg, _ in tables)
        z = np.empty((len(packed), coded), dtype=np.float32)
        for seg, table in tables:
            entry = packed[:, seg.byte_start : seg.byte_start + seg.n_bytes].astype(np.intp)
            entry += np.arange(seg.n_bytes) * 256
            flat = table.reshape(seg.n_bytes * 256, seg.per_byte)
            z[:, seg.dim_start : seg.dim_start + seg.dims] = np.take(flat, entry, axis=0).reshape(len(packed), seg.dims)
        return z

    def decode(self, packed: np.ndarray, tables: list[tuple[Segment, np.ndarray]] | None = None) -> np.ndarray:
        """Residuals [n, D] float32 (back in the original coordinates) from packed codes."""
        coded = self.decode_rotated(packed, tables)
        if self.rotation is None:
            return np.pad(coded, ((0, 0), (0, self.dim - coded.shape[1])))
        return coded @ self.rotation[: coded.shape[1]]


def lloyd_max(sample: np.ndarray, levels: int, iterations: int = LLOYD_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """A scalar quantiser of ``levels`` buckets for one coordinate: (edges [levels-1], values [levels]), Lloyd-Max
    (edges midway between values, values at their bucket's mean) from the high-rate optimal start. Equal-probability
    buckets (ColBERTv2's quantiles) are wide in the tails: at 8 bits they lose 10-50x more than this on real token
    residuals."""
    col = np.sort(np.asarray(sample, dtype=np.float64))
    cumulative = np.r_[0.0, np.cumsum(col)]
    # Start from the high-rate optimum: bucket density proportional to the cube root of the sample's density.
    hist, bin_edges = np.histogram(col, bins=int(np.clip(16 * levels, 64, 4096)))
    weight = np.r_[0.0, np.cumsum(hist.astype(np.float64) ** (1 / 3))]
    edges = np.interp(np.arange(1, levels) / levels, weight / max(weight[-1], 1e-300), bin_edges)
    means = np.zeros(levels)
    for it in range(iterations + 1):
        ends = np.r_[np.searchsorted(col, edges, side="right"), len(col)]  # bucket j: col[ends[j-1]:ends[j]]
        starts = np.r_[0, ends[:-1]]
        counts = ends - starts
        mids = np.concatenate([edges[:1], (edges[1:] + edges[:-1]) / 2, edges[-1:]])
        # an empty bucket (ties in the sample) keeps the middle of its edges
        means = np.where(counts > 0, (cumulative[ends] - cumulative[starts]) / np.maximum(counts, 1), mids)
        means = np.maximum.accumulate(means)  # keep the values ordered, as the edges are
        if it < iterations:
            edges = (means[1:] + means[:-1]) / 2
    return edges.astype(np.float32), means.astype(np.float32)


def allocate_bits(errors: np.ndarray, budget: int) -> np.ndarray:
    """Bits per coordinate (0, 1, 2, 4 or 8) within ``budget`` bits in all, from ``errors`` [D, 5]: each
    coordinate's squared error at each of those widths. Greedy: again and again the step to a coordinate's next
    width that lowers the error most per bit spent; then each width's count is cut to fill whole bytes (the
    coordinates that lose least drop to the next smaller width)."""
    err = np.asarray(errors, dtype=np.float64)
    dim = len(err)
    level = np.zeros(dim, dtype=np.int64)  # index into LEVEL_BITS
    widths = np.array(LEVEL_BITS)
    left = int(budget)
    rows = np.arange(dim)
    while True:
        up = np.minimum(level + 1, len(LEVEL_BITS) - 1)
        cost = widths[up] - widths[level]
        rate = np.where((cost > 0) & (cost <= left), (err[rows, level] - err[rows, up]) / np.maximum(cost, 1), -1.0)
        i = int(np.argmax(rate))
        if rate[i] <= 0:
            break
        level[i], left = up[i], left - int(cost[i])
    for width in (4, 2, 1):
        k = LEVEL_BITS.index(width)
        idx = np.flatnonzero(level == k)
        extra = len(idx) % (8 // width)
        if extra:  # drop those that lose least by one width
            loss = err[idx, k - 1] - err[idx, k]
            level[idx[np.argsort(loss, kind="stable")[:extra]]] = k - 1
    return widths[level]


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
