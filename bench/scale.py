"""Indexes at scale (issue 15): the automatic FAISS index choice on synthetic clustered vectors, against bare FAISS with
the same key and parameters, and against brute force.

Usage:
    python bench/scale.py [--sizes 100000,1000000] [--dim 384] [--queries 1000] [--memory-budget GB]

For each size: ``n`` synthetic clustered unit vectors (indexer.synthetic, fixed seed, generated in chunks); the key
indexer.index_choice chooses for (n, dim, budget); the xmodal build (indexer.faiss_backend.build: training on at most
64 vectors a list) and its search parameters tuned to recall@10 0.95 by indexer.tuning (sample queries from the index,
as at build time), timed; peak RSS during the build (VmHWM, reset before it, so the vectors themselves count);
recall@10 of held-out queries (fresh draws from the same clusters) against exact search by brute force in chunks, ties
tolerated; queries/s single-query and batched. Side by side: bare FAISS (index_factory, train on every vector, add)
with the same key searched at the same parameters, and brute force (IndexFlatIP) queries/s.

Prints markdown tables (progress on stderr). About 1 minute at 100k and 10 at 1M on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import OtherLoad, cpu_model, table  # noqa: E402
from indexer import faiss_backend, index_choice, tuning  # noqa: E402
from indexer.synthetic import clustered_chunks  # noqa: E402

SINGLE_QUERIES = 200  # single-query speed: this many queries one at a time (brute force: a tenth)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def vectors_of(n: int, dim: int, stream: int = 0) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    start = 0
    for part in clustered_chunks(n, dim, stream=stream):
        out[start : start + len(part)] = part
        start += len(part)
    return out


def held_out_recall(index: object, vectors: np.ndarray, truth: tuning.Truth) -> float:
    hits, asked, k = tuning.truth_hits(index, vectors, truth)
    return hits / max(asked * k, 1)


def index_mb(index: object) -> float:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss_backend.write(index, Path(f.name))
        return os.path.getsize(f.name) / 2**20


def speed(index: object, queries: np.ndarray, single: int) -> tuple[float, float]:
    return (
        tuning.queries_per_second(index, queries[:single]),
        tuning.queries_per_second(index, queries, batched=True),
    )


def measure(key: str, vectors: np.ndarray, queries: np.ndarray, truth: tuning.Truth) -> tuple[dict, dict]:
    """The xmodal path for ``key``: build (sampled training), tune, held-out recall, size, speed; (row, params)."""
    row: dict = {"key": key}
    row["rss_before_mb"] = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    index, _ = faiss_backend.build(vectors, key, use_gpu=False)
    row["build_s"] = time.perf_counter() - t0
    row["peak_rss_mb"] = peak_rss_mb()
    log(f"{key}: built in {row['build_s']:.1f} s; tuning")
    t0 = time.perf_counter()
    params, recall = tuning.tune([(index, vectors)], faiss_backend.default_params(key))
    row["tune_s"] = time.perf_counter() - t0
    row["params"] = params
    row["tuned_recall"] = recall["value"]
    row["recall"] = held_out_recall(index, vectors, truth)
    row["index_mb"] = index_mb(index)
    row["qps_single"], row["qps_batched"] = speed(index, queries, SINGLE_QUERIES)
    log(f"{key}: {params}, held-out recall {row['recall']:.4f}, {row['qps_batched']:.0f} q/s batched")
    return row, params


def run_size(n: int, dim: int, n_queries: int, budget: int | None, also: list[str]) -> list[dict]:
    faiss = faiss_backend.import_faiss()
    log(f"{n} vectors of dimension {dim}: generating")
    t0 = time.perf_counter()
    vectors = vectors_of(n, dim)
    queries = vectors_of(n_queries, dim, stream=1)
    log(f"generated in {time.perf_counter() - t0:.1f} s; exact answers of {n_queries} held-out queries")
    truth = tuning.exact_truth(vectors, queries, 10)
    choice = index_choice.choose_index(n, dim, budget)
    log(f"chosen {choice.key}: {choice.reason}")
    row, params = measure(choice.key, vectors, queries, truth)
    row.update(n=n, estimated_mb=(choice.estimated_bytes or 0) / 2**20)
    others = []
    for key in also:
        other, _ = measure(key, vectors, queries, truth)
        others.append({**other, "n": n, "estimated_mb": 0.0, "extra": True})

    if choice.key != "Flat":
        log("bare FAISS, same key, trained on every vector")
        t0 = time.perf_counter()
        bare = faiss.index_factory(dim, choice.key, faiss.METRIC_INNER_PRODUCT)
        bare.train(vectors)
        bare.add(vectors)
        row["bare_build_s"] = time.perf_counter() - t0
        ps = faiss.ParameterSpace()
        for name, value in params.items():
            ps.set_index_parameter(bare, name, value)
        row["bare_recall"] = held_out_recall(bare, vectors, truth)
        row["bare_single"], row["bare_batched"] = speed(bare, queries, SINGLE_QUERIES)
        log(f"bare: recall {row['bare_recall']:.4f}, {row['bare_batched']:.0f} q/s batched")
        del bare

    log("brute force")
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    row["flat_single"], row["flat_batched"] = speed(flat, queries, max(SINGLE_QUERIES // 10, 1))
    del flat
    return [row, *others]


def key_cell(row: dict) -> str:
    return row["key"] + (" (--also)" if row.get("extra") else "")


def size_cell(row: dict) -> str:
    return f"{row['index_mb']:.0f}" + (f" ({row['estimated_mb']:.0f})" if row["estimated_mb"] else "")


def fmt(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated vector counts")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (recall, batched q/s)")
    parser.add_argument("--also", default="", help="more factory keys to measure the same way, ';'-separated")
    parser.add_argument("--memory-budget", type=float, default=None, help="GiB (default: no limit)")
    args = parser.parse_args()
    budget = None if args.memory_budget is None else int(args.memory_budget * 2**30)
    faiss = faiss_backend.import_faiss()
    print(f"- command: `python bench/scale.py {' '.join(sys.argv[1:])}`".rstrip() + "")
    print(f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; machine: {cpu_model()}, os.cpu_count()={os.cpu_count()}")
    print(
        f"- FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads; load average at start {os.getloadavg()}"
    )
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        with OtherLoad() as load:
            started = time.perf_counter()
            found = run_size(n, args.dim, args.queries, budget, [k for k in args.also.split(";") if k])
        for row in found:
            row["load"] = f"{load.share:.0f}%"
            row["seconds"] = time.perf_counter() - started
            row["loadavg"] = os.getloadavg()[0]
        rows.extend(found)
    print()
    print(
        table(
            ["n", "chosen key", "params", "build s", "tune s", "peak RSS MB", "index MB (est.)", "recall@10",
             "q/s single", "q/s batched", "other load"],
            [
                [r["n"], key_cell(r), ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-",
                 f"{r['build_s']:.1f}",
                 f"{r['tune_s']:.1f}", f"{r['peak_rss_mb']:.0f}", size_cell(r),
                 f"{r['recall']:.4f}", f"{r['qps_single']:.0f}", f"{r['qps_batched']:.0f}", r["load"]]
                for r in rows
            ],
        )
    )  # fmt: skip
    print()
    print(
        table(
            ["n", "bare FAISS build s", "bare recall@10", "bare q/s single", "bare q/s batched",
             "xmodal/bare batched", "xmodal/bare single", "brute force q/s single", "brute force q/s batched"],
            [
                [r["n"], *(fmt(r, k, f) for k, f in (("bare_build_s", ".1f"), ("bare_recall", ".4f"),
                 ("bare_single", ".0f"), ("bare_batched", ".0f"))),
                 f"{r['qps_batched'] / r['bare_batched']:.2f}x" if "bare_batched" in r else "-",
                 f"{r['qps_single'] / r['bare_single']:.2f}x" if "bare_single" in r else "-",
                 f"{r['flat_single']:.0f}", f"{r['flat_batched']:.0f}"]
                for r in rows if not r.get("extra")
            ],
        )
    )  # fmt: skip
    print()
    for r in rows:
        print(
            f"- {r['n']}: RSS {r['rss_before_mb']:.0f} MB before the build (vectors and queries), tuned recall@10 on "
            f"sample index vectors {r['tuned_recall']:.4f}, whole run {r['seconds']:.0f} s, load average "
            f"{r['loadavg']:.2f} at its end"
        )


if __name__ == "__main__":
    main()
