"""FAISS: import with a clear error, index construction from a factory key, GPU when present."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from indexer import index_choice
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


def build(vectors: np.ndarray, key: str, use_gpu: bool = True) -> tuple[Any, str]:
    """Build an inner-product index over L2-normalised ``vectors``; returns (CPU index, where it was built). An
    inverted file is trained on a sample of at most TRAIN_PER_LIST vectors a list."""
    faiss = import_faiss()
    dim = vectors.shape[1]
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InvalidInput(f"invalid FAISS index key {key!r}: {exc}") from None
    ivf = faiss.try_extract_index_ivf(index)  # on the CPU form: a GPU copy is no faiss.IndexIVF
    rows = train_rows(len(vectors), ivf.nlist if ivf is not None else 0)
    device = "cpu"
    if use_gpu and gpu_count(faiss) > 0 and "HNSW" not in key:  # HNSW has no GPU build
        index = faiss.index_cpu_to_all_gpus(index)
        device = "gpu"
    if not index.is_trained:
        index.train(vectors if rows is None else np.ascontiguousarray(vectors[rows]))
    index.add(vectors)
    if device == "gpu":
        index = faiss.index_gpu_to_cpu(index)  # files are always written from the CPU form
    return index, device


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


def maybe_to_gpu(index: Any, use_gpu: bool) -> tuple[Any, str]:
    faiss = import_faiss()
    if use_gpu and gpu_count(faiss) > 0 and not isinstance(index, faiss.IndexHNSW):
        try:
            return faiss.index_cpu_to_all_gpus(index), "gpu"
        except RuntimeError as exc:  # not every index type has a GPU twin; serve it from the CPU
            log.warning("cannot move index to GPU (%s); searching on CPU", exc)
    return index, "cpu"
