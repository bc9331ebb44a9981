"""FAISS: import with a clear error, index construction from a factory key, GPU when present (indexer.gpu decides
where each index runs; this module clones it there)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from indexer import gpu, index_choice
from indexer.gpu import Placement
from models.errors import InvalidInput, MissingDependency

log = logging.getLogger(__name__)
EXACT_UP_TO = index_choice.EXACT_UP_TO  # below this many vectors an exact (flat) index is both fast enough and perfect


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependency(
            "FAISS is not installed: install exactly one of the extras, "
            "`pip install 'xmodal[cpu]'` or, on a CUDA machine, `pip install 'xmodal[gpu]'`"
        ) from exc
    return faiss


def gpu_count(faiss: Any) -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def default_key(n: int, dim: int = 384, budget_bytes: int | None = None) -> str:
    """The automatic choice (indexer.index_choice): Flat for small corpora, IVF with smaller codes as they grow."""
    return index_choice.choose_index(n, dim, budget_bytes).key


def train_rows(n: int, nlist: int, seed: int = 0) -> np.ndarray | None:
    """Rows to train an inverted file of ``nlist`` lists on (sorted, a fixed seed), None for all of them."""
    size = index_choice.TRAIN_PER_LIST * nlist
    if nlist <= 0 or n <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def build(vectors: np.ndarray, key: str, use_gpu: bool = True) -> tuple[Any, Placement]:
    """Build an inner-product index over L2-normalised ``vectors``; returns (CPU index, where it was built and why).
    An inverted file is trained on a sample of at most TRAIN_PER_LIST vectors a list. On the GPU when one is there
    and the index type has a GPU twin (indexer.gpu); a GPU failure (out of memory, say) builds on the CPU instead."""
    faiss = import_faiss()
    dim = vectors.shape[1]
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InvalidInput(f"invalid FAISS index key {key!r}: {exc}") from None
    ivf = faiss.try_extract_index_ivf(index)  # on the CPU form: a GPU copy is no faiss.IndexIVF
    rows = train_rows(len(vectors), ivf.nlist if ivf is not None else 0)
    gpus = gpu_count(faiss) if use_gpu else 0
    placement = gpu.place(index, use_gpu, gpus)
    if placement.device == "gpu":
        placement = dataclasses.replace(placement, gpus=1)  # a build uses one GPU (replicas would repeat the work)
        try:
            return _build_on_gpu(faiss, index, vectors, rows, placement), placement
        except RuntimeError as exc:  # the CPU index is untouched: the GPU worked on a clone
            placement = gpu.fallback(exc)
            log.warning("FAISS %s: %s", key, placement.reason)
    elif gpus > 0:
        log.warning("FAISS %s is built on the CPU: %s", key, placement.reason)
    _train_add(index, vectors, rows)
    return index, placement


def _train_add(index: Any, vectors: np.ndarray, rows: np.ndarray | None) -> None:
    if not index.is_trained:
        index.train(vectors if rows is None else np.ascontiguousarray(vectors[rows]))
    index.add(vectors)


def _build_on_gpu(faiss: Any, index: Any, vectors: np.ndarray, rows: np.ndarray | None, placement: Placement) -> Any:
    """Train and fill a clone of ``index`` on GPU 0 with GPU resources of its own (a build may run beside searches,
    which share theirs under a lock), and return its CPU form: files are always written from the CPU form."""
    resources = faiss.StandardGpuResources()
    clone = faiss.index_cpu_to_gpu_multiple_py([resources], index, cloner_options(faiss, placement), [0])
    _train_add(clone, vectors, rows)
    return faiss.index_gpu_to_cpu(clone)


def cloner_options(faiss: Any, placement: Placement) -> Any:
    """How an index is cloned to the GPU: every vector and id kept as it is (64-bit ids, float32 vectors and coarse
    centroids), float16 lookup tables only where an IVF-PQ code needs them (indexer.gpu), one replica per GPU, and
    FAISS's own GPU code rather than cuVS (whose limits differ from those indexer.gpu checks)."""
    co = faiss.GpuMultipleClonerOptions()
    co.indicesOptions = faiss.INDICES_64_BIT
    co.useFloat16 = placement.float16_lookup
    co.useFloat16CoarseQuantizer = False
    co.shard = False
    if hasattr(co, "use_cuvs"):
        co.use_cuvs = False
    return co


def apply_params(index: Any, params: dict) -> None:
    """Search-time parameters recorded in the manifest (nprobe, efSearch)."""
    faiss = import_faiss()
    if params:
        ps = faiss.ParameterSpace()
        for name, value in params.items():
            ps.set_index_parameter(index, name, value)


def default_params(key: str) -> dict:
    params: dict = {}
    if "HNSW" in key:
        params["efSearch"] = 128
    if key.startswith("IVF") or ",IVF" in key:
        params["nprobe"] = 16
    return params


def all_vectors(index: Any) -> np.ndarray:
    """Every stored vector [ntotal, D] in id order (approximate for compressed codes), e.g. to merge segments. An
    index with a refine step gives its finer codes' vectors (held in id order)."""
    faiss = import_faiss()
    if isinstance(index, faiss.IndexRefine):
        return faiss.downcast_index(index.refine_index).reconstruct_n(0, index.ntotal)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def selector_params(index: Any, params: dict, selector: Any) -> Any:
    """Search parameters restricting a search to the ids ``selector`` accepts, carrying the index's own search
    settings (per-call parameters replace them: an HNSW search would fall back to efSearch=16)."""
    faiss = import_faiss()
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(base, faiss.IndexRefine):  # the selector restricts the candidates, which are then re-ranked
        inner = selector_params(faiss.downcast_index(base.base_index), params, selector)
        out = faiss.IndexRefineSearchParameters(
            k_factor=float(params.get("k_factor_rf", base.k_factor)), base_index_params=inner
        )
        out.base_params = inner  # FAISS holds a raw pointer to it
        return out
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(params.get("efSearch", 16)))
    if isinstance(base, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(params.get("nprobe", 1)))
    return faiss.SearchParameters(sel=selector)


def write(index: Any, path: Path) -> None:
    import_faiss().write_index(index, str(path))


def read(path: Path, mmap: bool = False) -> Any:
    faiss = import_faiss()
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)


@functools.cache
def _search_resources(ngpu: int) -> list[Any]:
    """GPU resources for serving, one per GPU, made on first use and shared by every index the process serves: each
    holds a pool of temporary GPU memory, and one per index would take a GPU's memory many times over."""
    faiss = import_faiss()
    return [faiss.StandardGpuResources() for _ in range(ngpu)]


@functools.cache
def gpu_lock() -> threading.Lock:
    """Held around every use of the serving GPU resources (cloning to them, searching a clone): FAISS GPU indexes are
    not thread-safe, even to search (FAISS wiki, "Threads and asynchronous calls"), and searches run on a thread
    pool."""
    return threading.Lock()


def to_device(index: Any, use_gpu: bool) -> tuple[Any, Placement]:
    """The index to search with and where it runs: a replica on every GPU when one is there and the index has a GPU
    twin (indexer.gpu), else ``index`` itself on the CPU, the reason logged. Search parameters set on ``index``
    (nprobe) carry over to the clone."""
    faiss = import_faiss()
    gpus = gpu_count(faiss) if use_gpu else 0
    placement = gpu.place(index, use_gpu, gpus)
    if placement.device == "cpu":
        if gpus > 0:
            log.warning("FAISS %s is searched on the CPU: %s", type(index).__name__, placement.reason)
        return index, placement
    try:
        with gpu_lock():
            resources = _search_resources(gpus)
            return faiss.index_cpu_to_gpu_multiple_py(resources, index, cloner_options(faiss, placement)), placement
    except RuntimeError as exc:  # out of GPU memory, or a limit indexer.gpu does not know of
        placement = gpu.fallback(exc)
        log.warning("FAISS %s: %s", type(index).__name__, placement.reason)
        return index, placement
