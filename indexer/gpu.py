"""Where a FAISS index runs: which CPU indexes have a GPU twin, and the placement decision, as small pure functions
(no GPU needed to decide, so they are tested on any machine).

FAISS clones a CPU index to the GPU with ``ToGpuCloner`` (faiss/gpu/GpuCloner.cpp): Flat, a float16 scalar quantizer
(as a float16 flat), IVF-Flat, IVF with scalar quantizer codes, and IVF-PQ with 8-bit codes; an ID map or a
pre-transform is kept on the CPU around a cloned inner index. Everything else throws "not implemented on GPU": HNSW,
the fast-scan PQ codes that indexer.index_choice uses for IVF-PQ (``PQmx4fs``), PQ without an inverted file, refined
indexes. Each twin has limits of its own, checked here before a clone is tried, so that a segment the GPU cannot hold
stays on the CPU with its reason logged and recorded (the segment manifest's ``faiss.placement``, ``/readyz``).
The limits are those of FAISS's own GPU code (not cuVS, which xmodal turns off when cloning so that these hold).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# top-k and nprobe on a GPU index: GPU_MAX_SELECTION_K (faiss/gpu/utils/DeviceDefs.cuh), checked by validateKSelect and
# validateNProbe; a search asking for more goes to the CPU form of the index
GPU_MAX_K = 2048
# bytes of an IVF-PQ code the GPU scans (IVFPQ::isSupportedPQCodeLength, faiss/gpu/impl/IVFPQ.cu)
GPU_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
# shared memory a block may use without opting in (sharedMemPerBlock of every CUDA GPU since Kepler): an IVF-PQ's
# lookup tables (M x 256 entries) and an 8/4-bit scalar quantizer's per-dimension parameters must fit in it
SHARED_MEMORY = 48 * 1024


@dataclass(frozen=True)
class Support:
    """Whether FAISS has a GPU twin for an index, why (or why not), and whether the twin needs float16 lookup tables
    (IVF-PQ codes of more than 48 bytes)."""

    ok: bool
    reason: str
    float16_lookup: bool = False


@dataclass(frozen=True)
class Placement:
    """Where one FAISS index runs (``gpu`` or ``cpu``) and why; ``gpus``: how many GPUs hold a replica."""

    device: str
    reason: str
    gpus: int = 0
    float16_lookup: bool = False

    def record(self) -> dict:
        return asdict(self)


def _faiss() -> Any:
    from indexer.faiss_backend import import_faiss  # faiss_backend imports this module

    return import_faiss()


def gpu_support(index: Any) -> Support:
    """Whether ``index`` (a CPU FAISS index) can be cloned to a GPU, from its type and parameters alone."""
    faiss = _faiss()
    # ``index`` stays referenced here while its downcast view is looked at (the view does not own the C++ index)
    return _support(faiss, faiss.downcast_index(index))


def _support(faiss: Any, index: Any) -> Support:
    """``index``: the downcast view of an index its caller keeps referenced."""
    name = type(index).__name__
    if isinstance(index, faiss.IndexPreTransform):
        inner = gpu_support(index.index)
        return Support(inner.ok, f"{inner.reason} (its vector transform stays on the CPU)", inner.float16_lookup)
    if isinstance(index, faiss.IndexIDMap):
        return gpu_support(index.index)
    if type(index) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2):
        return Support(True, "Flat has a GPU twin (GpuIndexFlat)")
    if type(index) is faiss.IndexScalarQuantizer:
        if index.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
            return Support(True, "a float16 scalar quantizer has a GPU twin (a float16 GpuIndexFlat)")
        return Support(False, "a scalar quantizer without an inverted file has no GPU twin unless it is float16")
    if isinstance(index, faiss.IndexHNSW):
        return Support(False, f"{name} has no GPU twin (FAISS's GPU graph index is CAGRA, another index)")
    if isinstance(index, faiss.IndexIVF):
        return _ivf_support(faiss, index)
    return Support(False, f"{name} has no GPU twin in FAISS (faiss/gpu/GpuCloner.cpp)")


def _ivf_support(faiss: Any, ivf: Any) -> Support:
    name = type(ivf).__name__
    codes = _ivf_codes_support(faiss, ivf)
    if not codes.ok:
        return codes
    lists = type(faiss.downcast_InvertedLists(ivf.invlists)).__name__
    if lists != "ArrayInvertedLists":
        return Support(
            False, f"{name} keeps its inverted lists in {lists} (on disk or memory-mapped): they stay on the CPU"
        )
    if ivf.nprobe > GPU_MAX_K:
        return Support(False, f"nprobe {ivf.nprobe} is above the GPU's limit of {GPU_MAX_K}")
    quantizer = gpu_support(ivf.quantizer)
    if not quantizer.ok:
        return Support(False, f"{name}'s coarse quantizer cannot go to the GPU: {quantizer.reason}")
    return codes


def _ivf_codes_support(faiss: Any, ivf: Any) -> Support:
    """Whether the GPU has a twin for an inverted file's kind of codes."""
    if type(ivf) is faiss.IndexIVFFlat:
        return Support(True, "IVF-Flat has a GPU twin (GpuIndexIVFFlat)")
    if type(ivf) is faiss.IndexIVFScalarQuantizer:
        qt = faiss.ScalarQuantizer
        supported = {qt.QT_8bit, qt.QT_8bit_uniform, qt.QT_8bit_direct, qt.QT_4bit, qt.QT_4bit_uniform, qt.QT_6bit}
        if ivf.sq.qtype not in supported | {qt.QT_fp16}:
            return Support(False, f"scalar quantizer type {ivf.sq.qtype} has no GPU twin")
        # QT_8bit and QT_4bit keep a min and a range per dimension in shared memory (verifySQSettings_)
        if ivf.sq.qtype in (qt.QT_8bit, qt.QT_4bit) and ivf.d >= SHARED_MEMORY // 8:
            return Support(False, f"{ivf.d} dimensions are too many for the GPU's per-dimension SQ parameters")
        return Support(True, "IVF with scalar quantizer codes has a GPU twin (GpuIndexIVFScalarQuantizer)")
    if type(ivf) is faiss.IndexIVFPQ:
        return _ivfpq_support(ivf)
    if isinstance(ivf, faiss.IndexIVFFastScan):
        return Support(False, f"{type(ivf).__name__}: fast-scan (x4fs) codes have no GPU twin")
    return Support(
        False, f"{type(ivf).__name__} has no GPU twin in FAISS (only IVF-Flat, IVF-SQ and IVF-PQ with 8-bit codes do)"
    )


def _ivfpq_support(ivf: Any) -> Support:
    m, nbits = ivf.pq.M, ivf.pq.nbits
    if nbits != 8:
        return Support(False, f"IVF-PQ codes of {nbits} bits: the GPU takes 8-bit codes only")
    if not ivf.by_residual or ivf.polysemous_ht:
        return Support(False, "IVF-PQ without residuals or with polysemous codes has no GPU twin")
    if m not in GPU_PQ_CODE_BYTES:
        return Support(False, f"IVF-PQ codes of {m} bytes: the GPU scans {GPU_PQ_CODE_BYTES} bytes only")
    if 4 * m * 256 <= SHARED_MEMORY:
        return Support(True, f"IVF-PQ ({m} bytes a code) has a GPU twin (GpuIndexIVFPQ)")
    if 2 * m * 256 <= SHARED_MEMORY:
        return Support(True, f"IVF-PQ ({m} bytes a code) has a GPU twin with float16 lookup tables", True)
    return Support(False, f"IVF-PQ codes of {m} bytes need more shared memory than a GPU block has")


def place(index: Any, use_gpu: bool, gpus: int) -> Placement:
    """Where ``index`` (a CPU FAISS index) should run: on the GPU when GPU use is on, FAISS sees a GPU and the index
    has a GPU twin; on the CPU otherwise, with the reason."""
    if not use_gpu:
        return Placement("cpu", "GPU use is turned off (device cpu)")
    if gpus <= 0:
        return Placement("cpu", "FAISS sees no GPU (faiss-cpu installed, or no CUDA device visible)")
    support = gpu_support(index)
    if not support.ok:
        return Placement("cpu", support.reason)
    return Placement("gpu", support.reason, gpus, support.float16_lookup)


def fallback(error: Exception) -> Placement:
    """The CPU placement after a GPU clone, build or search failed (out of GPU memory, say)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return Placement("cpu", f"the GPU failed ({first}); on the CPU instead")


def summary(devices: list[str]) -> str:
    """One word for several indexes' (or sessions') devices: the one they share (gpu, cuda, cpu), or ``mixed``."""
    kinds = set(devices)
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "cpu")
