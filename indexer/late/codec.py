"""The residual codec of compressed token stores: a token ≈ normalise(centroid + residual), the residual rotated
(PCA), its coordinates given bits by their error (``allocate_bits``) and quantised to Lloyd-Max levels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import InvalidInput

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
