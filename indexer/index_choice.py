"""Which FAISS index a segment gets: a small pure rule over the vector count, the dimension and a memory budget.

Preference by size (measured on 2 cores, docs/benchmarks.md "Indexes at scale"): exact ``Flat`` while a brute-force
scan is fast enough (``exact_up_to`` vectors); above, an inverted file (IVF) whose codes shrink as the corpus grows:
full vectors (``IVFn,Flat``) up to ``IVF_FLAT_UP_TO``, 8-bit scalar codes (``IVFn,SQ8``, 1 byte a dimension) up to
``IVF_SQ8_UP_TO``, and beyond, IVF-PQ on disk (``IVFn,PQmnp,Refine(SQ8)``, indexer.ondisk): product-quantised codes
(``m = dim/8`` sub-quantisers of 8 bits) in inverted lists kept in a file beside the index and memory-mapped, the
best ``k_factor_rf * k`` candidates re-ranked by SQ8 codes, memory-mapped too. PQ codes alone level off short of
recall@10 0.95 against exact search whatever nprobe (0.82: bench/refine.py); the SQ8 re-ranking
brings them past it. Its memory is what stays resident (the coarse centroids, the PQ tables, the list headers): the
lists and the re-ranking codes are pages of files the OS reads in as searches touch them and may drop again
(``mapped_bytes``). In RAM, PQ codes plus SQ8 codes to re-rank would take more than SQ8 codes alone (dim/8 + 8 + dim
bytes a vector against dim + 8), so fast-scan PQ without a refine step (recall 0.82) is no rung of the ladder.
When the preferred index's estimated memory exceeds the budget, the next smaller one is taken; when none fits,
``IndexTooLarge``.
HNSW is never chosen automatically: at 1M clustered vectors (d=384) HNSW32 built slower than IVF4096,SQ8 and reached
recall@10 0.833 at efSearch 128 against 0.983 at nprobe 8 for the IVF, at half its speed (issue 15). A user's own
factory key is taken as given (built in RAM; only its memory is not estimated).
The number of lists grows as 4*sqrt(n) up to ``NLIST_MAX``: assigning n vectors to their lists costs n * nlist * dim
multiply-adds, and training the centroids as much again on the sample; on this project's 2-core machine, 131,072
vectors (d=384) took 5.5 s to assign among 4,096 centroids and 21.4 s among 16,384, so 10M vectors would take 7 min
against 27 min (and as much again to train): more lists than 4,096 do not build within half an hour there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from models.errors import InvalidInput

EXACT_UP_TO = 50_000  # Flat (exact) up to this many vectors: a scan is then fast enough and perfect
IVF_FLAT_UP_TO = 200_000  # IVF over full float32 vectors up to this many
IVF_SQ8_UP_TO = 5_000_000  # IVF over 8-bit scalar codes in RAM up to this many (~1.8 GiB at d=384); on disk beyond
NLIST_MIN, NLIST_MAX = 16, 4_096
MIN_POINTS_PER_LIST = 39  # FAISS's k-means warns below this many training points a centroid
TRAIN_PER_LIST = 64  # training sample: at most this many vectors a list (FAISS itself caps at 256)
ID_BYTES = 8  # an IVF list stores an int64 id beside every code
LIST_HEADER_BYTES = 64  # a list's bookkeeping in RAM (size, capacity, pointers or file offset)
PQ_BITS = 8  # the on-disk PQ's codes: 8 bits a sub-quantiser (the fast-scan 4-bit layout has no on-disk lists)
GB = 1 << 30


class IndexTooLarge(InvalidInput):
    """No index type's estimated memory fits the budget."""


@dataclass(frozen=True)
class Choice:
    """The chosen factory key and why: the figures it was chosen from, recorded in the manifest."""

    key: str
    reason: str
    n: int
    dim: int
    budget_bytes: int | None
    estimated_bytes: int | None
    nlist: int = 0
    train_sample: int = 0
    ondisk: bool = False  # inverted lists and re-ranking codes in memory-mapped files (indexer.ondisk)
    mapped_bytes: int = 0  # those files' size: read in by the OS as searches touch them, not counted in the budget

    def record(self) -> dict:
        return asdict(self)


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~4*sqrt(n) rounded to a power of two, clamped so that every list has enough
    training points (and to [NLIST_MIN, NLIST_MAX])."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    nlist = min(nlist, NLIST_MAX, max(1, n // MIN_POINTS_PER_LIST))
    nlist = 1 << int(math.log2(nlist))  # a power of two after the cap too
    return max(nlist, min(NLIST_MIN, max(1, n // MIN_POINTS_PER_LIST)))


def pq_m(dim: int) -> int:
    """Sub-quantisers of the on-disk PQ code: dim/8 (8 dimensions each, 8 bits each: dim/8 bytes a vector), or the
    largest divisor of dim below."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def code_bytes(code: str, dim: int) -> int:
    return {"Flat": 4 * dim, "SQ8": dim, "PQ": pq_m(dim) * PQ_BITS // 8}[code]


def estimate_bytes(kind: str, n: int, dim: int, nlist: int = 0) -> int:
    """Resident memory of an index of ``n`` vectors: bytes a vector times n, plus the trained tables. ``kind``: Flat,
    IVF-Flat, IVF-SQ8, or IVF-PQ-disk (whose lists and re-ranking codes are memory-mapped: :func:`mapped_bytes`)."""
    if kind == "Flat":
        return 4 * dim * n
    overhead = 4 * dim * nlist + LIST_HEADER_BYTES * nlist  # the coarse centroids, the list headers
    if kind == "IVF-PQ-disk":
        return overhead + 4 * (1 << PQ_BITS) * dim + 2 * 4 * dim  # PQ centroids, the SQ8 minimum and range
    code = kind.split("-", 1)[1]
    per_vector = code_bytes(code, dim) + ID_BYTES
    if code == "SQ8":
        overhead += 2 * 4 * dim  # per-dimension min and range
    return per_vector * n + overhead


def mapped_bytes(kind: str, n: int, dim: int) -> int:
    """Bytes of the files an index maps rather than loads: the on-disk lists (PQ codes and ids) and the SQ8 codes
    that re-rank."""
    return (code_bytes("PQ", dim) + ID_BYTES + code_bytes("SQ8", dim)) * n if kind == "IVF-PQ-disk" else 0


def factory_key(kind: str, dim: int, nlist: int) -> str:
    if kind == "Flat":
        return "Flat"
    if kind == "IVF-PQ-disk":
        return f"IVF{nlist},PQ{pq_m(dim)}np,Refine(SQ8)"  # np: no polysemous training (10x its cost, unused)
    return f"IVF{nlist},{kind.split('-', 1)[1]}"


LADDER = ("Flat", "IVF-Flat", "IVF-SQ8", "IVF-PQ-disk")  # from the most exact and largest resident to the smallest


def compressed(key: str) -> bool:
    """Whether a factory key's codes are lossy (so reconstruct gives approximate vectors)."""
    return any(code in key.upper() for code in ("SQ", "PQ", "LSH", "RQ", "LSQ"))


def preferred(n: int, exact_up_to: int = EXACT_UP_TO) -> int:
    """Index into LADDER of what ``n`` vectors get when memory is no object."""
    if n <= exact_up_to:
        return 0
    if n <= IVF_FLAT_UP_TO:
        return 1
    if n <= IVF_SQ8_UP_TO:
        return 2
    return 3


def choose_index(n: int, dim: int, budget_bytes: int | None = None, exact_up_to: int = EXACT_UP_TO) -> Choice:
    """The index for ``n`` vectors of dimension ``dim`` within ``budget_bytes`` (None: no limit): the preferred
    kind for the size, or the first smaller one whose estimate fits. IndexTooLarge when none does."""
    if n < 1 or dim < 1:
        raise InvalidInput(f"cannot choose an index for {n} vectors of dimension {dim}")
    best = preferred(n, exact_up_to)
    nlist = nlist_for(n)
    # too few vectors to train an inverted file: exact or nothing
    kinds = LADDER[:1] if n < NLIST_MIN * MIN_POINTS_PER_LIST else LADDER[best:]
    tried = []
    for kind in kinds:
        estimate = estimate_bytes(kind, n, dim, nlist)
        tried.append(f"{kind} ~{estimate / GB:.3f} GiB")
        mapped = mapped_bytes(kind, n, dim)
        if budget_bytes is None or estimate <= budget_bytes:
            ivf = kind != "Flat"
            why = f"{n} vectors of dimension {dim}: {kind}"
            why += " (exact search is fast enough)" if not ivf else f" with {nlist} lists"
            if mapped:
                why += f" on disk (~{mapped / GB:.3f} GiB memory-mapped: PQ codes in the lists, SQ8 codes to re-rank)"
            if kind != LADDER[best]:
                why += f", the preferred {LADDER[best]} exceeding the budget"
            if budget_bytes is not None:
                why += f"; ~{estimate / GB:.3f} GiB within the {budget_bytes / GB:.3f} GiB budget"
            return Choice(
                key=factory_key(kind, dim, nlist),
                reason=why,
                n=n,
                dim=dim,
                budget_bytes=budget_bytes,
                estimated_bytes=estimate,
                nlist=nlist if ivf else 0,
                train_sample=min(n, TRAIN_PER_LIST * nlist) if ivf else 0,
                ondisk=mapped > 0,
                mapped_bytes=mapped,
            )
    raise IndexTooLarge(
        f"no FAISS index of {n} vectors of dimension {dim} fits the memory budget of {budget_bytes / GB:.3f} GiB "
        f"(estimated: {', '.join(tried)}): raise XMODAL_INDEX_MEMORY_GB / --memory-budget, or give --faiss-key"
    )
