"""Token products for late interaction: ONNX Runtime (cast + GEMM in MLAS) when onnxruntime is installed, numpy
otherwise; in blocks, on a small thread pool. Also the CSR index helpers every room uses."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

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


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def concat_rows(token_rows: Sequence[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 [T, D] vectors and int64 [R+1] offsets from one array of token vectors per row."""
    lengths = np.array([len(t) for t in token_rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    vectors = np.empty((int(offsets[-1]), dim), dtype=np.float16)
    for r, t in enumerate(token_rows):
        vectors[offsets[r] : offsets[r + 1]] = t
    return vectors, offsets
