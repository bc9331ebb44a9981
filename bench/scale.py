"""Indexes at scale (issue 15): the automatic FAISS index choice on synthetic clustered vectors (and real xmodal-mini
vectors), built and served the way a segment is, against bare FAISS and brute force.

Usage:
    python bench/scale.py [--sizes 100000,1000000,10000000] [--dim 384] [--queries 1000] [--memory-budget GIB]
                          [--workdir DIR] [--reuse] [--real cranfield --model-dir BUNDLE]

For each size, three child processes, one after the other, so that each one's peak RSS is its own:

- build: the key indexer.index_choice chooses for (n, dim, budget), built by indexer.dense_build (what the segment
  writer calls: in RAM, or IVF-PQ on disk through indexer.ondisk) with its search parameters tuned to recall@10 0.95
  and its held-out sample measured (indexer.dense_build.tune_and_write). ``n`` synthetic clustered unit vectors
  (indexer.synthetic, fixed seed) are generated chunk by chunk: held whole for an index in RAM (so they count in its
  peak RSS, as encoded vectors do in a segment build), streamed twice (training sample, then the add) and never held
  for one on disk. In the same pass, ``--queries`` held-out queries (fresh draws from the same clusters) are answered
  exactly by brute force over every vector: FAISS's exact search (faiss.knn) of all of them at once over each chunk,
  merged (indexer.tuning.TopK), timed as brute force batched; 20 of them one at a time over each chunk, timed as
  brute force single. Build seconds exclude the generation and that work (both timed apart).
- serve: a fresh process opens the index as the segment reader does (indexer.ondisk.read_dense: memory-mapped lists
  and codes for an index on disk; read into RAM otherwise) with the manifest's parameters, then measures recall@10
  of the held-out queries against their exact answers (ties tolerated) and queries/s one at a time (200 queries) and
  in one batch (all of them). Serving RSS: its peak (VmHWM, the mapped pages it touched included) and at the end.
- bare: plain FAISS on the same trained index: ``faiss.read_index`` into RAM (an on-disk index's lists copied into
  in-memory lists, its SQ8 codes read whole), the same parameters, searched directly: the same answers (the same
  recall) by construction, so the ratio is the speed of what xmodal serves against FAISS's in RAM.

``--reuse`` keeps a size's built index in ``--workdir`` (default: a temporary folder, removed) and skips its build
when its result is there, so a size can be built in one run and served in another. ``--real cranfield`` encodes the
Cranfield collection's 1,400 abstracts with the bundle at ``--model-dir`` (its 225 queries held out) instead of
synthetic vectors. Prints markdown tables (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import OtherLoad, cpu_model, table  # noqa: E402
from indexer import dense_build, faiss_backend, index_choice, ondisk, tuning  # noqa: E402
from indexer.synthetic import clustered, clustered_chunks  # noqa: E402
from indexer.vector_source import VectorSource  # noqa: E402

SINGLE_QUERIES = 200  # single-query speed: this many queries one at a time
BRUTE_SINGLE = 20  # brute force one query at a time: this many, over every chunk
IN_RAM_LIMIT = 8 << 30  # float32 vectors the build may hold for an index in RAM
MODALITY = "text"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_mb(field: str) -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


class PeakSampler:
    """The largest anonymous and file-backed resident sizes (RssAnon, RssFile) seen, sampled every 0.2 s: VmHWM is
    their peak sum, which counts the pages of memory-mapped files a process touched (page cache the OS may drop)."""

    def __init__(self) -> None:
        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def sample(self) -> None:
        self.anon = max(self.anon, status_mb("RssAnon"))
        self.file = max(self.file, status_mb("RssFile"))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


# --- the vectors ----------------------------------------------------------------------------------------------------
class Timed:
    """Seconds spent inside an iterator's next() (the generation of chunks) and inside callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def iterate(self, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        while True:
            t0 = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.seconds += time.perf_counter() - t0
            yield chunk

    def wrap(self, fn: Callable[[int, np.ndarray], None]) -> Callable[[int, np.ndarray], None]:
        def call(start: int, block: np.ndarray) -> None:
            t0 = time.perf_counter()
            fn(start, block)
            self.seconds += time.perf_counter() - t0

        return call


def real_vectors(name: str, model_dir: Path, folder: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(corpus vectors, query vectors, what they are) of a real collection encoded with the bundle at ``model_dir``,
    kept in ``folder`` once encoded."""
    cached = folder / "real.npz"
    if not cached.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from align import CRANFIELD, read_cranfield  # bench/align.py's reader of the collection

        from models.encoder import Encoder

        if name != "cranfield":
            raise SystemExit(f"unknown real collection {name!r}")
        docs, queries, _ = read_cranfield(CRANFIELD)
        encoder = Encoder(model_dir, device="cpu")
        t0 = time.perf_counter()
        x, q = encoder.encode_text(docs), encoder.encode_text(queries)
        log(f"encoded {len(docs)} + {len(queries)} texts with {encoder.name} in {time.perf_counter() - t0:.1f} s")
        np.savez(cached, x=x, q=q, what=np.array(f"Cranfield (abstracts; {encoder.name} {encoder.fingerprint[:12]})"))
    data = np.load(cached, allow_pickle=False)
    return data["x"].astype(np.float32), data["q"].astype(np.float32), str(data["what"])


# --- the child processes --------------------------------------------------------------------------------------------
def child_build(folder: Path, n: int, dim: int, n_queries: int, budget: int | None, real: str, model_dir: str) -> None:
    faiss = faiss_backend.import_faiss()
    gen, pregenerated = Timed(), 0.0
    if real:
        vectors, queries, what = real_vectors(real, Path(model_dir), folder)
        n, dim = vectors.shape
    else:
        queries = clustered(n_queries, dim, stream=1)
        what = f"synthetic (clustered, indexer.synthetic, seed 0, d={dim})"
    choice = index_choice.choose_index(n, dim, budget)
    log(f"{n} vectors: {choice.key} ({choice.reason})")
    if real:
        source = VectorSource.of_array(vectors)
    elif choice.ondisk:
        source = VectorSource(n=n, dim=dim, make_chunks=lambda: gen.iterate(iter(clustered_chunks(n, dim))))
    else:
        if n * dim * 4 > IN_RAM_LIMIT:
            raise SystemExit(f"{choice.key} in RAM would hold {n * dim * 4 / 2**30:.1f} GiB of vectors: give a budget")
        t0 = time.perf_counter()
        vectors = np.empty((n, dim), dtype=np.float32)
        for start, part in zip(range(0, n, 65_536), clustered_chunks(n, dim), strict=True):
            vectors[start : start + len(part)] = part
        pregenerated = time.perf_counter() - t0  # before the build: not in its seconds to subtract
        source = VectorSource.of_array(vectors)

    start_mb = status_mb("VmRSS")  # the vectors held, for an index in RAM
    side = Timed()  # the bench's own work in the pass: the held-out queries' answers, brute force timed
    answers = tuning.TopK(queries)
    brute = {"batched": 0.0, "single": 0.0}

    def observe(start: int, block: np.ndarray) -> None:
        t0 = time.perf_counter()
        answers.add(start, block)  # FAISS's exact search of every held-out query in one call, merged
        t1 = time.perf_counter()
        for q in queries[:BRUTE_SINGLE]:
            faiss.knn(q[None, :], block, 10, faiss.METRIC_INNER_PRODUCT)
        brute["batched"] += t1 - t0
        brute["single"] += time.perf_counter() - t1

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on
    with PeakSampler() as peaks:
        t0 = time.perf_counter()
        built = dense_build.build(folder, MODALITY, source, choice.key, choice.ondisk, False, [side.wrap(observe)])
        build_s = time.perf_counter() - t0 - gen.seconds - side.seconds
        t0 = time.perf_counter()
        params, recall, files = dense_build.tune_and_write(
            folder, {MODALITY: built}, choice.key, tuning.RECALL_TARGET, "the original float vectors"
        )
        tune_s = time.perf_counter() - t0
    truth = answers.truth(10)
    np.save(folder / "bench.queries.npy", truth.queries)
    np.save(folder / "bench.ids.npy", truth.ids)
    np.save(folder / "bench.scores.npy", truth.scores)
    write_json(
        folder / "build.json",
        {
            "n": n,
            "dim": dim,
            "vectors": what,
            "choice": choice.record(),
            "params": params,
            "recall": recall,
            "build_s": build_s,
            "tune_s": tune_s,
            "generate_s": gen.seconds + pregenerated,
            "bench_side_s": side.seconds,
            "rss_before_mb": start_mb,
            "peak_rss_mb": status_mb("VmHWM"),
            "peak_anon_mb": peaks.anon,
            "peak_file_mb": peaks.file,
            "brute_batched": len(queries) / brute["batched"],
            "brute_single": BRUTE_SINGLE / brute["single"],
            "files_mb": {name: (folder / name).stat().st_size / 2**20 for name in files},
        },
    )


def measure_index(index: object, folder: Path) -> dict:
    queries = np.load(folder / "bench.queries.npy")
    truth = tuning.Truth(queries, np.load(folder / "bench.ids.npy"), np.load(folder / "bench.scores.npy"), 10, None)
    hits, asked, k = tuning.truth_hits(index, truth)
    return {
        "recall": hits / (asked * k),
        "qps_single": tuning.queries_per_second(index, queries[:SINGLE_QUERIES]),
        "qps_batched": tuning.queries_per_second(index, queries, batched=True),
    }


def child_serve(folder: Path) -> None:
    built = json.loads((folder / "build.json").read_text())
    start_mb = status_mb("VmRSS")
    t0 = time.perf_counter()
    index = ondisk.read_dense(folder, MODALITY, built["choice"]["ondisk"])
    faiss_backend.apply_params(index, built["params"])
    out = {"open_s": time.perf_counter() - t0, "rss_start_mb": start_mb, "rss_open_mb": status_mb("VmRSS")}
    with PeakSampler() as peaks:
        out.update(measure_index(index, folder))
    out.update(peak_rss_mb=status_mb("VmHWM"), rss_end_mb=status_mb("VmRSS"), rss_file_mb=status_mb("RssFile"))
    out.update(peak_anon_mb=peaks.anon, peak_file_mb=peaks.file)
    write_json(folder / "serve.json", out)


def child_bare(folder: Path) -> None:
    """The same trained index in RAM, searched by FAISS directly."""
    faiss = faiss_backend.import_faiss()
    built = json.loads((folder / "build.json").read_text())
    dense = str(folder / f"dense.{MODALITY}.faiss")
    if built["choice"]["ondisk"]:
        with ondisk.faiss_notices_to_stderr():
            base = faiss.read_index(dense, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.extract_index_ivf(base)
        mapped = ivf.invlists
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        for i in range(ivf.nlist):
            if mapped.list_size(i):
                lists.add_entries(i, mapped.list_size(i), mapped.get_ids(i), mapped.get_codes(i))
        ivf.replace_invlists(lists, True)
        lists.this.disown()
        codes = faiss.read_index(str(folder / ondisk.refine_file(MODALITY)))
        index = faiss.IndexRefine(base, codes)
    else:
        index = faiss.read_index(dense)
    ps = faiss.ParameterSpace()
    for name, value in built["params"].items():
        ps.set_index_parameter(index, name, value)
    out = measure_index(index, folder)
    out.update(peak_rss_mb=status_mb("VmHWM"))
    write_json(folder / "bare.json", out)


# --- the parent -----------------------------------------------------------------------------------------------------
def run_child(step: str, folder: Path, args: argparse.Namespace, n: int) -> None:
    cmd = [sys.executable, __file__, "--child", step, "--workdir", str(folder), "--sizes", str(n)]
    cmd += ["--dim", str(args.dim), "--queries", str(args.queries)]
    if args.memory_budget is not None:
        cmd += ["--memory-budget", str(args.memory_budget)]
    if args.real:
        cmd += ["--real", args.real, "--model-dir", args.model_dir]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    log(f"{step}: {time.perf_counter() - t0:.0f} s")


def run_size(n: int, folder: Path, args: argparse.Namespace) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    ran = []
    if not (args.reuse and (folder / "build.json").exists()):
        for stale in folder.iterdir():
            if stale.name != "real.npz":
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        run_child("build", folder, args, n)
        ran.append("build")
    for step in ("serve", "bare"):
        run_child(step, folder, args, n)
        ran.append(step)
    row = {"ran": ran}
    for step in ("build", "serve", "bare"):
        row[step] = json.loads((folder / f"{step}.json").read_text())
    return row


def gib(mb: float) -> str:
    return f"{mb / 1024:.2f}"


def report(rows: list[dict]) -> None:
    print()
    print(
        table(
            ["n", "vectors", "chosen key", "params", "build s", "tune s", "peak build RSS GiB",
             "serving RSS GiB (peak)", "index files GiB", "recall@10", "q/s single", "q/s batched"],
            [
                [r["build"]["n"], r["build"]["vectors"].split(" (")[0], r["build"]["choice"]["key"]
                 + (" (on disk)" if r["build"]["choice"]["ondisk"] else ""),
                 ", ".join(f"{k}={v}" for k, v in sorted(r["build"]["params"].items())) or "-",
                 f"{r['build']['build_s']:.0f}", f"{r['build']['tune_s']:.0f}",
                 gib(r["build"]["peak_rss_mb"]), gib(r["serve"]["peak_rss_mb"]),
                 gib(sum(r["build"]["files_mb"].values())), f"{r['serve']['recall']:.4f}",
                 f"{r['serve']['qps_single']:.0f}", f"{r['serve']['qps_batched']:.0f}"]
                for r in rows
            ],
        )
    )  # fmt: skip
    print()
    print(
        table(
            ["n", "bare FAISS (in RAM) recall@10", "bare q/s single", "bare q/s batched", "bare peak RSS GiB",
             "xmodal/bare single", "xmodal/bare batched", "brute force q/s single", "brute force q/s batched"],
            [
                [r["build"]["n"], f"{r['bare']['recall']:.4f}", f"{r['bare']['qps_single']:.0f}",
                 f"{r['bare']['qps_batched']:.0f}", gib(r["bare"]["peak_rss_mb"]),
                 f"{r['serve']['qps_single'] / r['bare']['qps_single']:.2f}x",
                 f"{r['serve']['qps_batched'] / r['bare']['qps_batched']:.2f}x",
                 f"{r['build']['brute_single']:.1f}", f"{r['build']['brute_batched']:.0f}"]
                for r in rows
            ],
        )
    )  # fmt: skip
    print()
    for r in rows:
        b, s = r["build"], r["serve"]
        held = b["recall"]["heldout"]
        print(
            f"- {b['n']} ({b['vectors']}; steps run now: {', '.join(r['ran'])}): {b['choice']['reason']}. Tuned "
            f"recall@10 {b['recall']['value']:.4f} on {b['recall']['sample']} sample rows (tried "
            f"{json.dumps(b['recall'].get('tuned', {}))}), held-out {held['value']:.4f}; generation "
            f"{b['generate_s']:.0f} s "
            f"and the bench's exact answers and brute-force timing {b['bench_side_s']:.0f} s, not in the build "
            f"seconds; build RSS {gib(b['rss_before_mb'])} GiB before the build, peaks sampled: anonymous "
            f"{gib(b['peak_anon_mb'])} GiB, file pages {gib(b['peak_file_mb'])} GiB; serving: opened in "
            f"{s['open_s']:.2f} s, RSS {gib(s['rss_start_mb'])} GiB before opening, {gib(s['rss_open_mb'])} GiB "
            "opened, "
            f"{gib(s['rss_end_mb'])} GiB at the end ({gib(s['rss_file_mb'])} GiB of it mapped file pages), peaks "
            f"sampled: anonymous {gib(s['peak_anon_mb'])} GiB, file pages {gib(s['peak_file_mb'])} GiB; files "
            + ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(b["files_mb"].items()))
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated vector counts")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (recall, batched q/s)")
    parser.add_argument("--memory-budget", type=float, default=None, help="GiB (default: no limit)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the indexes are built (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="serve a size's index built by an earlier run")
    parser.add_argument("--real", default="", help="cranfield: real vectors instead of synthetic ones")
    parser.add_argument("--model-dir", default="", help="with --real: the model bundle that encodes them")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = None if args.memory_budget is None else int(args.memory_budget * 2**30)
    if args.child:
        n = int(args.sizes)
        {
            "build": lambda: child_build(args.workdir, n, args.dim, args.queries, budget, args.real, args.model_dir),
            "serve": lambda: child_serve(args.workdir),
            "bare": lambda: child_bare(args.workdir),
        }[args.child]()
        return
    faiss = faiss_backend.import_faiss()
    print(f"- command: `python bench/scale.py {' '.join(sys.argv[1:])}`")
    print(f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; machine: {cpu_model()}, os.cpu_count()={os.cpu_count()}")
    print(f"- FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads; load average {os.getloadavg()}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xmodal-scale-"))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            with OtherLoad() as load:
                started = time.perf_counter()
                row = run_size(n, workdir / (f"{args.real}" if args.real else str(n)), args)
            log(f"{n}: {time.perf_counter() - started:.0f} s, other processes took {load.share:.0f}% of the CPUs")
            rows.append(row)
            print(f"- {n}: whole run {time.perf_counter() - started:.0f} s; other processes took {load.share:.0f}% "
                  f"of the CPUs meanwhile; load average {os.getloadavg()[0]:.2f} at its end")  # fmt: skip
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(rows)


if __name__ == "__main__":
    main()
