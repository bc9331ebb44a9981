"""Which FAISS index a segment gets: a small pure rule over the vector count, the dimension and a memory budget.

Preference by size (measured on 2 cores, docs/benchmarks.md "Indexes at scale"): exact ``Flat`` while a brute-force
scan is fast enough (``exact_up_to`` vectors); above, an inverted file (IVF) whose codes shrink as the corpus grows:
full vectors (``IVFn,Flat``) up to ``IVF_FLAT_UP_TO``, 8-bit scalar codes (``IVFn,SQ8``, 1 byte a dimension) up to
``IVF_SQ8_UP_TO``, product-quantised codes beyond (``IVFn,PQmx4fs``: FAISS's fast-scan PQ, ``m = dim/2``
sub-quantisers of 4 bits, dim/4 bytes a vector). SQ8 is kept as long as that: PQ codes of this size level off
short of recall@10 0.95 against exact search whatever nprobe (0.84 on bench/scale.py's clustered vectors), so they
are for corpora or budgets SQ8 cannot serve, and the manifest then says the target was not reached. When the
preferred index's estimated memory exceeds the budget, the next smaller code is taken; when none fits,
``IndexTooLarge``.
HNSW is never chosen automatically: at 1M clustered vectors (d=384) HNSW32 built slower than IVF4096,SQ8 and reached
recall@10 0.833 at efSearch 128 against 0.983 at nprobe 8 for the IVF, at half its speed (issue 15). A user's own
factory key is taken as given (only its memory is not estimated).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from models.errors import InvalidInput

EXACT_UP_TO = 50_000  # Flat (exact) up to this many vectors: a scan is then fast enough and perfect
IVF_FLAT_UP_TO = 200_000  # IVF over full float32 vectors up to this many
IVF_SQ8_UP_TO = 10_000_000  # IVF over 8-bit scalar codes up to this many (~3.7 GiB at d=384); PQ beyond
NLIST_MIN, NLIST_MAX = 16, 65_536
MIN_POINTS_PER_LIST = 39  # FAISS's k-means warns below this many training points a centroid
TRAIN_PER_LIST = 64  # training sample: at most this many vectors a list (FAISS itself caps at 256)
ID_BYTES = 8  # an IVF list stores an int64 id beside every code
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
    """Sub-quantisers of the PQ code: dim/2 (2 dimensions each, 4 bits each), or the largest divisor of dim below."""
    m = max(1, dim // 2)
    while dim % m:
        m -= 1
    return m


def code_bytes(code: str, dim: int) -> int:
    return {"Flat": 4 * dim, "SQ8": dim, "PQ": (pq_m(dim) + 1) // 2}[code]


def estimate_bytes(kind: str, n: int, dim: int, nlist: int = 0) -> int:
    """Memory of an index of ``n`` vectors: bytes a vector times n, plus the trained tables. ``kind``: Flat,
    IVF-Flat, IVF-SQ8 or IVF-PQ."""
    if kind == "Flat":
        return 4 * dim * n
    code = kind.split("-", 1)[1]
    per_vector = code_bytes(code, dim) + ID_BYTES
    overhead = 4 * dim * nlist + 64 * nlist  # the coarse centroids, the list headers
    if code == "SQ8":
        overhead += 2 * 4 * dim  # per-dimension min and range
    if code == "PQ":
        overhead += 4 * 16 * dim  # 16 centroids of every sub-quantiser
    return per_vector * n + overhead


def factory_key(kind: str, dim: int, nlist: int) -> str:
    if kind == "Flat":
        return "Flat"
    code = kind.split("-", 1)[1]
    return f"IVF{nlist},{f'PQ{pq_m(dim)}x4fs' if code == 'PQ' else code}"


LADDER = ("Flat", "IVF-Flat", "IVF-SQ8", "IVF-PQ")  # from the most exact and largest to the smallest


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
        if budget_bytes is None or estimate <= budget_bytes:
            ivf = kind != "Flat"
            why = f"{n} vectors of dimension {dim}: {kind}"
            why += " (exact search is fast enough)" if not ivf else f" with {nlist} lists"
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
            )
    raise IndexTooLarge(
        f"no FAISS index of {n} vectors of dimension {dim} fits the memory budget of {budget_bytes / GB:.3f} GiB "
        f"(estimated: {', '.join(tried)}): raise XMODAL_INDEX_MEMORY_GB / --memory-budget, or give --faiss-key"
    )
