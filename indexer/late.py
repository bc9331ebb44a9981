"""Late interaction (FILIP / ColBERT MaxSim): exact scoring of token sets, and PLAID-like candidate generation.

An item's score for a query is the mean over the query's real tokens of the best match (max inner product)
among the item's tokens. Tokens live in one CSR layout: ``vectors[offsets[r]:offsets[r + 1]]`` are row r's.
Scoring takes one matrix product per slab of candidates and a segmented max (``np.maximum.reduceat``), with
no Python loop per item; a row without tokens scores -inf (never 0: an empty item must not beat a bad one).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

SLAB_TOKENS = 1 << 18  # tokens per matrix product: [Lq, 262k] float32 stays near 16 MB for 16 query tokens
Take = Callable[[np.ndarray], np.ndarray]  # token numbers → their vectors as float32 [n, D]
Similarity = Callable[[np.ndarray], np.ndarray]  # token numbers → query-token similarities [Lq, n]


# --- products: ONNX Runtime (cast + GEMM in MLAS) when onnxruntime is installed, numpy otherwise ---------------
# numpy's float16 → float32 cast costs ~3 ns an element, more than the product itself, and OpenBLAS is slow on
# these short-and-wide shapes ([16, D] x [D, n]). A one-thread ONNX Runtime session holding just Cast + Gemm does
# both in MLAS, several times faster. The graph is written here as protobuf bytes (`onnx` is for export only).
# Tokens go in blocks of PRODUCT_BLOCK (their float32 copy, 6 MB at D=384, stays in cache; 8x bigger blocks run
# 2-3x slower a token); each block is gathered and multiplied by one thread of a small pool (numpy's gather and
# ONNX Runtime both release the GIL), XMODAL_LATE_THREADS threads, by default OMP_NUM_THREADS, else every core.
PRODUCT_BLOCK = 4096
_ORT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int32): 6, np.dtype(np.int64): 7}
_ORT_TYPES[np.dtype(np.float16)] = 10


def _threads() -> int:
    for name in ("XMODAL_LATE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("only non-negative varints are written here")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode())


def _value_info(name: str, array_type: np.dtype, dims: list) -> bytes:  # ValueInfoProto
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in dims)
    return _str(1, name) + _bytes(2, _bytes(1, _int(1, _ORT_TYPES[np.dtype(array_type)]) + _bytes(2, shape)))


def _node(op: str, inputs: list[str], outputs: list[str], **attrs: int | list[int]) -> bytes:  # NodeProto
    out = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs) + _str(4, op)
    for name, value in attrs.items():  # AttributeProto: INTS (type 7) or INT (type 2)
        if isinstance(value, list):
            body = b"".join(_int(8, v) for v in value) + _int(20, 7)
        else:
            body = _int(3, value) + _int(20, 2)
        out += _bytes(5, _str(1, name) + body)
    return out


def onnx_model(nodes: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    """A serialised ModelProto (IR 8, opset 17) from NodeProto and ValueInfoProto bytes."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _str(2, "xmodal_late")
    graph += b"".join(_bytes(11, v) for v in inputs) + b"".join(_bytes(12, v) for v in outputs)
    return _int(1, 8) + _str(2, "xmodal.indexer.late") + _bytes(7, graph) + _bytes(8, _int(2, 17))


_ORT: list[Any] = []  # [module or None], resolved once
_ORT_LOCK = threading.Lock()


def _onnxruntime() -> Any:
    if not _ORT:
        try:
            import onnxruntime
        except ImportError:
            onnxruntime = None
        _ORT.append(onnxruntime)
    return _ORT[0]


class OnnxKernel:
    """One small graph in a one-thread CPU session, created on first use."""

    def __init__(self, model: bytes) -> None:
        self.model = model
        self._session: Any = None

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        if self._session is None:
            ort = _onnxruntime()
            with _ORT_LOCK:
                if self._session is None:
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = 1  # parallelism comes from blocks on several threads
                    opts.inter_op_num_threads = 1
                    opts.log_severity_level = 3
                    self._session = ort.InferenceSession(
                        self.model, sess_options=opts, providers=["CPUExecutionProvider"]
                    )
        return self._session.run(None, inputs)[0]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def blockwise(lq: int, n: int, block: Callable[[int, int], np.ndarray], parallel: bool = True) -> np.ndarray:
    """float32 [lq, n] from ``block(a, b)`` → its columns a:b, blocks of PRODUCT_BLOCK spread over threads."""
    out = np.empty((lq, n), dtype=np.float32)
    starts = range(0, n, PRODUCT_BLOCK)

    def work(a: int) -> None:
        b = min(a + PRODUCT_BLOCK, n)
        out[:, a:b] = block(a, b)

    threads = min(_threads(), len(starts)) if parallel else 1
    if threads > 1:
        if threads not in _POOLS:
            with _ORT_LOCK:
                _POOLS.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="xmodal-late"))
        list(_POOLS[threads].map(work, starts))
    else:
        for a in starts:
            work(a)
    return out


def _product_kernel(dtype: np.dtype) -> OnnxKernel:
    """y = float32(x) @ q.T [n, Lq] for q float32 [Lq, D], x [n, D] of ``dtype`` (this orientation, tall times
    thin, runs ~25% faster in MLAS than q @ x.T)."""
    nodes = [_node("Cast", ["x"], ["xf"], to=1), _node("Gemm", ["xf", "q"], ["y"], transB=1)]
    if dtype == np.float32:
        nodes = [_node("Gemm", ["x", "q"], ["y"], transB=1)]
    inputs = [_value_info("q", np.float32, ["lq", "d"]), _value_info("x", dtype, ["n", "d"])]
    return OnnxKernel(onnx_model(nodes, inputs, [_value_info("y", np.float32, ["n", "lq"])]))


_PRODUCTS = {np.dtype(np.float16): _product_kernel(np.float16), np.dtype(np.float32): _product_kernel(np.float32)}


def gathered_product(query: np.ndarray, source: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """float32 [Lq, n]: query tokens float32 [Lq, D] times ``source[idx]`` (all of ``source`` when idx is None;
    float16 or float32 vectors, never cast in numpy when ONNX Runtime is there), transposed."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    src = np.asarray(source)
    n = len(src) if idx is None else len(idx)
    rows = (lambda a, b: src[a:b]) if idx is None else (lambda a, b: src[idx[a:b]])
    if _onnxruntime() is None or src.dtype not in _PRODUCTS:  # numpy's BLAS has its own threads: no pool
        return blockwise(len(q), n, lambda a, b: q @ rows(a, b).astype(np.float32, copy=False).T, parallel=False)
    kernel = _PRODUCTS[src.dtype]
    return blockwise(len(q), n, lambda a, b: kernel(q=q, x=np.ascontiguousarray(rows(a, b))).T)


def rows_product(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 [n, Lq] = rows [n, d] float32 @ query [Lq, d].T in one one-thread ONNX Runtime call (numpy's
    OpenBLAS, with its own threads, runs these small products 3x slower when the other core is busy)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    q = np.ascontiguousarray(query, dtype=np.float32)
    if _onnxruntime() is None or len(x) == 0 or len(q) == 0:
        return x @ q.T
    return _PRODUCTS[np.dtype(np.float32)](q=q, x=x)


def token_product(query: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """float32 [Lq, n]: query tokens [Lq, D] times token vectors [n, D] (any float dtype), transposed."""
    return gathered_product(query, tokens)


def ranges_to_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``range(s, s + n)`` for every (s, n), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    # Each position's offset within its own range, added to its range's start.
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def array_take(vectors: np.ndarray) -> Take:
    """A Take over plain (or memory-mapped) vectors of any float dtype."""
    return lambda idx: np.asarray(vectors[idx], dtype=np.float32)


def exact_similarity(query: np.ndarray, take: Take) -> Similarity:
    """token numbers → [Lq, n] inner products with ``take``'s vectors (float32, or float16: cast in the product)."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    return lambda idx: token_product(q, take(idx))


@dataclass
class Segments:
    """Groups of rows scored as one token set: ``rows[bounds[g]:bounds[g + 1]]`` are group g's rows. One row
    per group is the per-row score; several rows of one item make its all-modality token set."""

    rows: np.ndarray
    bounds: np.ndarray

    @classmethod
    def single(cls, rows: np.ndarray) -> Segments:
        rows = np.asarray(rows, dtype=np.int64)
        return cls(rows, np.arange(len(rows) + 1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.bounds) - 1


def maxsim_scores(
    query: np.ndarray,
    take: Take,
    offsets: np.ndarray,
    segments: Segments,
    symmetric: bool = False,
) -> np.ndarray:
    """float32 [len(segments)]: FILIP query→item scores (mean over query tokens of the max over the group's
    tokens). ``symmetric`` averages it with the item→query score (mean over the group's tokens of the max over
    the query's tokens), FILIP's two directions. Groups without tokens score -inf."""
    q = np.asarray(query)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"query tokens must be [Lq > 0, D], not {list(q.shape)}")
    return segment_scores(exact_similarity(q, take), offsets, segments, symmetric)


def segment_scores(
    similarity: Similarity, offsets: np.ndarray, segments: Segments, symmetric: bool = False
) -> np.ndarray:
    """MaxSim per group of rows for any token similarity (exact vectors, or centroid approximations)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    row_len = offsets[segments.rows + 1] - offsets[segments.rows]
    group_len = np.diff(np.concatenate([[0], np.cumsum(row_len)])[segments.bounds])
    out = np.full(len(segments), -np.inf, dtype=np.float32)
    # Slabs of whole groups, each with at most ~SLAB_TOKENS tokens (a single bigger group gets a slab alone).
    token_end = np.cumsum(group_len)
    g = 0
    while g < len(segments):
        base = token_end[g - 1] if g else 0
        h = max(g + 1, int(np.searchsorted(token_end, base + SLAB_TOKENS, side="right")))
        rows = segments.rows[segments.bounds[g] : segments.bounds[h]]
        idx = ranges_to_indices(offsets[rows], offsets[rows + 1] - offsets[rows])
        if len(idx):
            out[g:h] = _slab_scores(similarity(idx), group_len[g:h], symmetric)
        g = h
    return out


def _slab_scores(sim: np.ndarray, group_len: np.ndarray, symmetric: bool) -> np.ndarray:
    """sim [Lq, tokens of consecutive groups] → one score per group; -inf for a group without tokens."""
    out = np.full(len(group_len), -np.inf, dtype=np.float32)
    full = group_len > 0
    starts = (np.cumsum(group_len) - group_len)[full]
    best = np.maximum.reduceat(sim, starts, axis=1)  # [Lq, non-empty groups]: each query token's best match
    scores = best.mean(axis=0)
    if symmetric:
        back = np.add.reduceat(sim.max(axis=0), starts) / group_len[full]
        scores = (scores + back) / 2
    out[full] = scores
    return out


def similarities(query: np.ndarray, item_tokens: np.ndarray) -> np.ndarray:
    """[Lq, T] float32: each query token against each of an item row's tokens (why an item ranked: the argmax of
    a row is the token that query token matched best)."""
    return np.ascontiguousarray(query, dtype=np.float32) @ np.asarray(item_tokens, dtype=np.float32).T


def exact_scores(
    query_tokens: np.ndarray, vectors: np.ndarray, offsets: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """float32 [len(rows)] (default every row): exact query→item MaxSim over plain token vectors."""
    n = len(offsets) - 1
    picked = np.arange(n) if rows is None else np.asarray(rows)
    q = np.asarray(query_tokens)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"query tokens must be [Lq > 0, D], not {list(q.shape)}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    plain = np.asarray(vectors)  # a memory map's array view: indexing it skips np.memmap's Python wrapper
    return segment_scores(lambda idx: gathered_product(q, plain, idx), offsets, Segments.single(picked))


# --- search: candidates, then exact scoring -----------------------------------------------------------------
SCOPES = ("modality", "all")


@dataclass
class LateParams:
    """PLAID-like pipeline. 1: each query token probes its ``nprobe`` best centroids, and the ``candidates``
    rows with the best imputed centroid scores survive (plus the dense index's top rows, given by the caller).
    2: those items' token sets are scored through their tokens' centroids; the best ``depth`` items survive.
    3: exact MaxSim over their real token vectors. ``scope``: ``modality`` takes an item's best row (CLaMR's
    per-modality max), ``all`` scores the union of its rows' tokens. ``exhaustive`` scores every row exactly
    (the reference). ``symmetric`` averages FILIP's two directions.

    Defaults (bench/late.py, 100k items x 32 tokens, 16-token queries, 2 cores): the exact stage costs ~0.2 us a
    token (one ONNX Runtime cast + GEMM), so every stage-one candidate is scored exactly (``depth`` =
    ``candidates``); stage two prunes only when the dense index's rows push the candidates past ``depth``.
    Centroid-only scores rank near-ties poorly: depth 64 kept 0.48-0.82 of the exhaustive top 10."""

    depth: int = 1024
    candidates: int = 1024
    nprobe: int = 8
    scope: str = "modality"
    symmetric: bool = False
    exhaustive: bool = False


@dataclass
class LateHits:
    items: np.ndarray  # item ordinals, best first
    scores: np.ndarray  # float32 late scores
    rows: np.ndarray  # the row that represents each item (scope modality: its best row; all: its first row)
    scored: int  # rows scored exactly


def centroid_candidates(
    store,  # noqa: ANN001 - a TokenStore (indexer.tokens)
    sim: np.ndarray,
    allowed: np.ndarray,
    keep: int,
    nprobe: int,
) -> np.ndarray:
    """Stage one, from ``sim`` [Lq, K], the query tokens' similarities to the centroids. A row found in a
    query token's probed centroid lists gets that centroid's score for that token; a row not found gets the
    token's lowest probed score (an upper bound of what it could have: WARP's imputation). The ``keep`` rows
    with the best mean over query tokens survive; only ``allowed`` rows are considered."""
    nprobe = min(nprobe, sim.shape[1])
    probe = np.argpartition(-sim, nprobe - 1, axis=1)[:, :nprobe]
    pscore = np.take_along_axis(sim, probe, axis=1)
    impute = pscore.min(axis=1)
    ivf_offsets, ivf_rows = store.ivf_offsets, np.asarray(store.ivf_rows)
    cents = probe.ravel()
    lengths = ivf_offsets[cents + 1] - ivf_offsets[cents]
    rows = ivf_rows[ranges_to_indices(ivf_offsets[cents], lengths)]
    seen = np.zeros(len(allowed), dtype=bool)
    seen[rows] = True
    seen &= allowed
    unique = np.flatnonzero(seen)
    if len(unique) == 0:
        return unique.astype(np.int64)
    # column of each row in ``best``; rows not allowed write to a spare last column, dropped after
    position = np.full(len(allowed), len(unique), dtype=np.int64)
    position[unique] = np.arange(len(unique))
    best = np.empty((len(sim), len(unique) + 1), dtype=np.float32)
    best[:] = impute[:, None]
    # A row's score for a token is the best of its probed centroids: write the token's probes in increasing
    # score order, so the best one is written last (one plain assignment per list: its rows are distinct).
    order = np.argsort(pscore, axis=1, kind="stable")
    for t in range(len(sim)):
        line = best[t]
        for j in order[t]:
            c = probe[t, j]
            line[position[ivf_rows[ivf_offsets[c] : ivf_offsets[c + 1]]]] = pscore[t, j]
    approx = best[:, :-1].mean(axis=0)
    if len(unique) > keep:
        unique = unique[np.argpartition(-approx, keep - 1)[:keep]]
    return unique.astype(np.int64)


@dataclass
class ItemGroups:
    """Candidate items and their allowed rows: ``rows[starts[i]:starts[i + 1]]`` belong to ``items[i]``."""

    items: np.ndarray
    rows: np.ndarray
    starts: np.ndarray  # [len(items) + 1]

    @classmethod
    def of_rows(cls, store, rows: np.ndarray, allowed: np.ndarray) -> ItemGroups:  # noqa: ANN001
        items = np.unique(store.row_item[rows])
        groups = store.rows_of_items(items)
        keep = allowed[groups.rows]
        kept = np.concatenate([[0], np.cumsum(keep)])[groups.bounds]
        nonempty = np.diff(kept) > 0
        return cls(items[nonempty], groups.rows[keep], np.r_[kept[:-1][nonempty], keep.sum()].astype(np.int64))

    def take(self, picked: np.ndarray) -> ItemGroups:
        lengths = self.starts[picked + 1] - self.starts[picked]
        rows = self.rows[ranges_to_indices(self.starts[picked], lengths)]
        return ItemGroups(self.items[picked], rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def scores(self, similarity: Similarity, offsets: np.ndarray, scope: str, symmetric: bool):  # noqa: ANN201
        """(score per item, the row representing it)."""
        if scope == "all":
            return segment_scores(similarity, offsets, Segments(self.rows, self.starts), symmetric), self.rows[
                self.starts[:-1]
            ]
        per_row = segment_scores(similarity, offsets, Segments.single(self.rows), symmetric)
        if len(per_row) == 0:
            return per_row, self.rows
        best = np.maximum.reduceat(per_row, self.starts[:-1])
        group_of = np.repeat(np.arange(len(self.items)), np.diff(self.starts))
        hit = np.flatnonzero(per_row == best[group_of])
        first = np.unique(group_of[hit], return_index=True)[1]  # an item's first row holding its max
        return best, self.rows[hit[first]]


def late_search(
    store,  # noqa: ANN001 - a TokenStore (indexer.tokens)
    query: np.ndarray,
    k: int,
    allowed: np.ndarray,
    params: LateParams,
    extra_rows: np.ndarray | None = None,
) -> LateHits:
    """Top ``k`` items for query tokens [Lq, D] among ``allowed`` rows (bool [R])."""
    if params.scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {params.scope!r}")
    q = np.ascontiguousarray(query, dtype=np.float32)
    centroid_sim = None if params.exhaustive else token_product(q, store.centroids)  # [Lq, K], stages one and two
    if centroid_sim is None:
        cand = np.flatnonzero(allowed)
    else:
        cand = centroid_candidates(store, centroid_sim, allowed, params.candidates, params.nprobe)
        if extra_rows is not None and len(extra_rows):
            extra = np.asarray(extra_rows, dtype=np.int64)
            cand = np.union1d(cand, extra[allowed[extra]])
    groups = ItemGroups.of_rows(store, cand, allowed)
    if centroid_sim is not None and len(groups.items) > max(params.depth, k):
        approx, _ = groups.scores(lambda idx: centroid_sim[:, store.codes[idx]], store.offsets, params.scope, False)
        keep = max(params.depth, k)
        groups = groups.take(np.sort(np.argpartition(-approx, keep - 1)[:keep]))
    # a TokenStore gives products without float32 copies (and reuses the centroid similarities)
    has_own = hasattr(store, "similarity")
    similarity = store.similarity(q, centroid_sim) if has_own else exact_similarity(q, store.take)
    scores, rows = groups.scores(similarity, store.offsets, params.scope, params.symmetric)
    k = min(k, len(groups.items))
    top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind="stable")]
    return LateHits(groups.items[top], scores[top].astype(np.float32), rows[top], int(len(groups.rows)))
