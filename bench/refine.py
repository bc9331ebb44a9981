"""PQ codes with and without a refine step (issue 15): which re-ranking takes IVF-PQ past recall@10 0.95, at what
cost, on the synthetic clustered vectors of bench/scale.py. What indexer.index_choice's on-disk kind was chosen from.

Usage:
    python bench/refine.py [--n 100000] [--dim 384] [--nlist 1024] [--queries 500]
                           [--keys "IVF1024,PQ192x4fs;IVF1024,PQ192x4fs,Refine(SQ8);..."]

Every key is built the xmodal way (trained on at most 64 vectors a list, indexer.faiss_backend.build) and searched at
every nprobe of --nprobe and k_factor_rf of --k-factors (an index without a refine step: k factor 1 only), with
recall@10 of held-out queries (fresh draws from the same clusters) against exact search (ties tolerated) and
queries/s in one batch. Bytes a vector: the codes of the lists, the id, the refine codes. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import OtherLoad, cpu_model, table  # noqa: E402
from indexer import faiss_backend, tuning  # noqa: E402
from indexer.synthetic import clustered  # noqa: E402

KEYS = (
    "IVF1024,PQ192x4fs;IVF1024,PQ192x4fs,Refine(SQ8);IVF1024,PQ192x4fs,Refine(SQ4);IVF1024,PQ96x4fs,Refine(SQ8);"
    "IVF1024,PQ48np,Refine(SQ8);IVF1024,SQ8"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--keys", default=KEYS, help="';'-separated factory keys")
    parser.add_argument("--nprobe", default="4,8,16")
    parser.add_argument("--k-factors", default="1,2,4,8,16")
    args = parser.parse_args()
    faiss = faiss_backend.import_faiss()
    print(f"- command: `python bench/refine.py {' '.join(sys.argv[1:])}`")
    print(f"- {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, {cpu_model()}, FAISS {faiss.__version__}")
    x = clustered(args.n, args.dim)
    queries = clustered(args.queries, args.dim, stream=1)
    truth = tuning.exact_truth(x, queries, 10)
    rows = []
    with OtherLoad() as load:
        for key in args.keys.split(";"):
            t0 = time.perf_counter()
            index, _ = faiss_backend.build(x, key, use_gpu=False)
            built = time.perf_counter() - t0
            refine = isinstance(index, faiss.IndexRefine)
            if refine:
                base = faiss.downcast_index(index.base_index)
                size = f"{base.code_size} + 8 + {faiss.downcast_index(index.refine_index).code_size}"
            else:
                size = f"{faiss.extract_index_ivf(index).code_size} + 8"
            print(f"{key}: built in {built:.1f} s", file=sys.stderr, flush=True)
            for nprobe in (int(v) for v in args.nprobe.split(",")):
                for kf in (int(v) for v in args.k_factors.split(",")) if refine else (1,):
                    params = {"nprobe": nprobe, **({"k_factor_rf": kf} if refine else {})}
                    faiss_backend.apply_params(index, params)
                    hits, asked, k = tuning.truth_hits(index, truth)
                    qps = tuning.queries_per_second(index, queries, batched=True)
                    rows.append([key, size, f"{built:.0f}", nprobe, kf if refine else "-",
                                 f"{hits / (asked * k):.4f}", f"{qps:.0f}"])  # fmt: skip
    print(f"- n={args.n}, d={args.dim}, {args.queries} held-out queries; other processes took {load.share:.0f}% of "
          "the CPUs meanwhile")  # fmt: skip
    print()
    print(table(["key", "bytes a vector", "build s", "nprobe", "k_factor_rf", "recall@10", "q/s batched"], rows))


if __name__ == "__main__":
    main()
