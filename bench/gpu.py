"""Every GPU path of xmodal in one run, with its benchmark (issue 15): for a machine with a GPU and the `gpu` extra
(onnxruntime-gpu, faiss-gpu). How to run it on a lent device machine: docs/gpu.md. It has not run on a GPU yet.

Usage:
    python bench/gpu.py [--n 1000000] [--dim 384] [--queries 1000] [--models DIR] [--parts faiss,onnx,index,service]

Parts (each prints markdown tables; progress goes to stderr):
  environment  versions, the GPUs FAISS sees, ONNX Runtime's providers, nvidia-smi, which CUDA libraries load
  faiss        1. indexer.gpu's decision (GPU twin or not) against FAISS's real GPU cloner, for every kind of index;
               2. Flat / IVF-Flat / IVF-SQ8 / IVF-PQ over ``n`` synthetic clustered vectors (indexer.synthetic):
                  xmodal's build on the CPU and on the GPU, recall@10 against exact search (ties tolerated),
                  queries/s batched and single-query, the CPU index against its GPU clone
  onnx         every tower of the model bundle (or, without one, the committed xmodal-mini image and audio graphs):
               items/s on the CPU and on CUDA (batch 32 and 1), parity of the embeddings (max abs diff, min cosine)
  index        the real index path on synthetic vectors: segments written with the GPU on (the manifest's built_on
               and placement, a fast-scan IVF-PQ staying on the CPU with its reason), loaded with and without the GPU
               (device per segment), the same results from both, deleted rows never returned, searches past the
               GPU's top-k (2048) served by the CPU form
  service      with the xmodal-mini bundle: `xmodal index build` (the manifest's built_on, build.providers), then the
               real app's /readyz (index and model devices) and a search

Exit status: 0 every part ran and every check passed; 1 a check failed or a part broke; 3 no GPU path can run here
(no GPU FAISS and no CUDA ONNX Runtime): nothing was run; 4 some parts were skipped (each says why), the rest passed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import cpu_model, table  # noqa: E402

NO_GPU, SKIPPED = 3, 4
SINGLE = 200  # single-query speed: this many queries one at a time
TOWER_BATCH = 32
KEYS_DECIDED = (  # factory keys whose GPU decision is compared with FAISS's real cloner
    "Flat", "SQfp16", "SQ8", "IVF64,Flat", "IVF64,SQ8", "IVF64,SQ4", "IVF64,PQ48", "IVF64,PQ64", "IVF64,PQ192",
    "IVF64,PQ48x4", "IVF64,PQ192x4fs", "HNSW32,Flat", "IVF64_HNSW32,Flat", "PCA64,IVF64,Flat", "IDMap,Flat",
    "IVF64,PQ16,RFlat", "PQ48",
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Report:
    """Checks and skips, for the closing summary and the exit status."""

    def __init__(self) -> None:
        self.checks: list[tuple[str, bool, str]] = []
        self.skips: list[tuple[str, str]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, bool(ok), detail))
        log(f"{'ok' if ok else 'FAILED'}: {name} {detail}")
        return bool(ok)

    def skip(self, part: str, why: str) -> None:
        self.skips.append((part, why))
        log(f"skipped {part}: {why}")

    def status(self) -> int:
        if any(not ok for _, ok, _ in self.checks):
            return 1
        return SKIPPED if self.skips else 0


# --- environment ------------------------------------------------------------------------------------------------
def environment() -> dict:
    env: dict[str, Any] = {"python": platform.python_version(), "cpu": f"{cpu_model()} x {os.cpu_count()}"}
    try:
        from indexer import faiss_backend

        faiss = faiss_backend.import_faiss()
        env["faiss"], env["faiss_gpus"] = faiss.__version__, faiss_backend.gpu_count(faiss)
    except Exception as exc:  # MissingDependency, or a faiss-gpu whose CUDA libraries do not load
        env["faiss"], env["faiss_gpus"] = f"unavailable ({exc})", 0
    try:
        from models.runtime import import_onnxruntime

        ort = import_onnxruntime()
        env["onnxruntime"], env["ort_providers"] = ort.__version__, ort.get_available_providers()
    except Exception as exc:
        env["onnxruntime"], env["ort_providers"] = f"unavailable ({exc})", []
    env["nvidia_smi"] = nvidia_smi()
    env["cuda_libraries"] = loadable(
        "libcudart.so.12", "libcublas.so.12", "libcudnn.so.9", "libcudart.so.13", "libcublas.so.13"
    )
    return env


def nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return "not found"
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or "no GPU listed"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed ({exc})"


def loadable(*names: str) -> str:
    found = []
    for name in names:
        with contextlib.suppress(OSError):
            ctypes.CDLL(name)
            found.append(name)
    return ", ".join(found) or "none on the loader's path"


# --- FAISS ------------------------------------------------------------------------------------------------------
def faiss_decisions(report: Report, dim: int) -> list[list]:
    """indexer.gpu's decision for each key against what FAISS's GPU cloner really does with the (untrained) index."""
    from indexer import faiss_backend, gpu

    faiss = faiss_backend.import_faiss()
    res = faiss.StandardGpuResources()
    cases = [(key, None) for key in KEYS_DECIDED] + [("IVF64,PQ64", "float32 tables"), ("IVF64,Flat", "nprobe 2049")]
    rows = []
    for key, variant in cases:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
        if variant == "nprobe 2049":
            faiss.extract_index_ivf(index).nprobe = gpu.GPU_MAX_K + 1
        decided = gpu.place(index, True, 1)
        options = gpu.Placement("gpu", "", 1, decided.float16_lookup and variant != "float32 tables")
        try:
            faiss.index_cpu_to_gpu_multiple_py([res], index, faiss_backend.cloner_options(faiss, options), [0])
            cloned, error = True, ""
        except RuntimeError as exc:
            cloned, error = False, str(exc).strip().splitlines()[0][:90]
        expected = decided.device == "gpu" and variant != "float32 tables"
        name = f"{key} ({variant})" if variant else key
        report.check(f"GPU decision agrees with FAISS's cloner: {name}", expected == cloned, error)
        rows.append([name, decided.device, decided.reason[:70], "yes" if cloned else f"no: {error}"])
    return rows


def recall_at_10(found: np.ndarray, queries: np.ndarray, vectors: np.ndarray, truth_scores: np.ndarray) -> float:
    """Share of each query's top 10 that score at least the 10th exact score (ties tolerated)."""
    hits = 0
    for i, ids in enumerate(found):
        ids = np.unique(ids[ids >= 0])
        scores = vectors[ids] @ queries[i]
        hits += min(10, int((scores >= truth_scores[i, 9] - 1e-5).sum()))
    return hits / (10 * len(found))


def speed(search, queries: np.ndarray) -> tuple[float, float]:  # noqa: ANN001 - search(q [m, D]) -> any
    """(q/s batched over all ``queries``, q/s one query at a time over the first SINGLE)."""
    t0 = time.perf_counter()
    search(queries)
    batched = len(queries) / (time.perf_counter() - t0)
    single = queries[:SINGLE]
    t0 = time.perf_counter()
    for q in single:
        search(q[None])
    return batched, len(single) / (time.perf_counter() - t0)


def faiss_bench(report: Report, n: int, dim: int, nq: int) -> list[list]:
    from indexer import faiss_backend, index_choice
    from indexer.synthetic import clustered

    faiss = faiss_backend.import_faiss()
    log(f"FAISS: {n} x {dim} synthetic clustered vectors, {nq} queries")
    vectors, queries = clustered(n, dim), clustered(nq, dim, stream=1)
    res = faiss.StandardGpuResources()
    truth_scores, truth = faiss.knn_gpu(res, queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    sample = min(50, nq)
    scores = queries[:sample] @ vectors.T
    exact = -np.sort(-np.partition(scores, scores.shape[1] - 10, axis=1)[:, -10:], axis=1)
    report.check("GPU brute force equals exact search (scores)", np.allclose(truth_scores[:sample], exact, atol=1e-4))
    nlist = index_choice.nlist_for(n)
    keys = ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},SQ8", f"IVF{nlist},PQ{48 if dim % 48 == 0 else 32}"]
    rows = []
    for key in keys:
        log(f"FAISS {key}: CPU build")
        t0 = time.perf_counter()
        cpu_built, _ = faiss_backend.build(vectors, key, use_gpu=False)
        t_cpu = time.perf_counter() - t0
        log(f"FAISS {key}: GPU build")
        t0 = time.perf_counter()
        gpu_built, built_on = faiss_backend.build(vectors, key, use_gpu=True)
        t_gpu = time.perf_counter() - t0
        report.check(f"{key} is built on the GPU", built_on.device == "gpu", built_on.reason)
        params = faiss_backend.default_params(key)
        faiss_backend.apply_params(cpu_built, params)
        faiss_backend.apply_params(gpu_built, params)
        clone, placed = faiss_backend.to_device(gpu_built, use_gpu=True)
        report.check(f"{key} is searched on the GPU", placed.device == "gpu", placed.reason)

        def on_gpu(q: np.ndarray, clone=clone) -> Any:  # noqa: ANN001
            with faiss_backend.gpu_lock():
                return clone.search(q, 10)

        r_cpu = recall_at_10(cpu_built.search(queries, 10)[1], queries, vectors, truth_scores)
        r_gpu_built = recall_at_10(gpu_built.search(queries, 10)[1], queries, vectors, truth_scores)
        r_gpu = recall_at_10(on_gpu(queries)[1], queries, vectors, truth_scores)
        report.check(f"{key}: GPU-built recall within 0.02 of CPU-built", abs(r_gpu_built - r_cpu) <= 0.02)
        report.check(f"{key}: GPU search recall within 0.01 of CPU search", abs(r_gpu - r_gpu_built) <= 0.01)
        qps_cpu = speed(lambda q, i=cpu_built: i.search(q, 10), queries)
        qps_gpu = speed(on_gpu, queries)
        rows.append(
            [key, str(params or "-"), f"{t_cpu:.1f}", f"{t_gpu:.1f}", f"{r_cpu:.3f}", f"{r_gpu:.3f}"]
            + [f"{qps_cpu[0]:.0f}", f"{qps_gpu[0]:.0f}", f"{qps_cpu[1]:.0f}", f"{qps_gpu[1]:.0f}"]
        )
        del cpu_built, gpu_built, clone
    return rows


# --- ONNX Runtime -----------------------------------------------------------------------------------------------
def tower_graphs(models: Path | None) -> tuple[dict[str, Path], str]:
    from models.bundle import DEFAULT_MODEL, load_manifest

    if models is not None and (models / DEFAULT_MODEL / "manifest.json").is_file():
        bundle = models / DEFAULT_MODEL
        manifest = load_manifest(bundle)
        return {m: bundle / t.onnx for m, t in sorted(manifest.towers.items())}, f"bundle {bundle}"
    from models.mini.prepare import WEIGHTS

    return {m: WEIGHTS / f"{m}.onnx" for m in ("image", "audio")}, "committed xmodal-mini graphs (no text tower)"


def feed_for(session: Any, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the right names, shapes and types: token ids inside any BERT vocabulary, masks of ones, float
    features; symbolic sizes past the batch get 64 (a text length)."""
    feed = {}
    for inp in session.get_inputs():
        shape = [batch if i == 0 else (d if isinstance(d, int) else 64) for i, d in enumerate(inp.shape)]
        if "int" in inp.type:
            dtype = np.int32 if "int32" in inp.type else np.int64
            if "mask" in inp.name:
                feed[inp.name] = np.ones(shape, dtype=dtype)
            elif "type" in inp.name:
                feed[inp.name] = np.zeros(shape, dtype=dtype)
            else:
                feed[inp.name] = rng.integers(1000, 20000, shape).astype(dtype)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def items_per_second(session: Any, feed: dict, batch: int, seconds: float = 2.0) -> float:
    for _ in range(3):
        session.run(None, feed)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, feed)
        done += batch
    return done / (time.perf_counter() - t0)


def onnx_bench(report: Report, models: Path | None) -> tuple[list[list], str]:
    from models.errors import MissingDependency
    from models.runtime import CUDA, create_session

    graphs, source = tower_graphs(models)
    rng = np.random.default_rng(0)
    rows = []
    for modality, path in graphs.items():
        log(f"ONNX Runtime: {modality} tower ({path.name})")
        cpu, _ = create_session(path, device="cpu")
        try:
            cuda, active = create_session(path, device="cuda")
        except MissingDependency as exc:
            report.check(f"{modality} tower runs on CUDA", False, exc.message)
            continue
        report.check(f"{modality} tower runs on CUDA", CUDA in active, str(active))
        feed = feed_for(cpu, TOWER_BATCH, rng)
        names = [o.name for o in cpu.get_outputs()]
        out = names.index("embedding") if "embedding" in names else 0
        a, b = cpu.run(None, feed)[out], cuda.run(None, feed)[out]
        diff = float(np.abs(a - b).max())
        cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
        report.check(f"{modality} tower: CUDA embeddings match the CPU's (min cosine >= 0.999)", cos >= 0.999)
        one = {k: v[:1] for k, v in feed.items()}
        speeds = [items_per_second(s, f, len(next(iter(f.values())))) for f in (feed, one) for s in (cpu, cuda)]
        rows.append([modality, *(f"{v:.0f}" for v in speeds), f"{diff:.2e}", f"{cos:.6f}"])
    return rows, source


# --- the index path ---------------------------------------------------------------------------------------------
def write_index(root: Path, name: str, vectors: np.ndarray, key: str | None) -> Any:
    from indexer.layout import IndexDir, ModelRef, SegmentRef, new_version_name
    from indexer.publish import commit
    from indexer.segment_writer import RowRecord, write_segment
    from models.files import staging_dir

    target = IndexDir(root, name)
    segment = new_version_name()
    records = [RowRecord(f"i{i}", "text", f"line {i}", f"item {i}", {"half": i % 2}) for i in range(len(vectors))]
    model = ModelRef(name="synthetic", fingerprint="0" * 64, dim=vectors.shape[1])
    with staging_dir(target.segments_dir, segment) as folder:
        written = write_segment(
            folder, index=name, segment=segment, records=records, vectors=vectors, tokens=None, model=model,
            faiss_key=key, use_gpu=True,
        )  # fmt: skip
        commit(target, "build", [(folder, written)], lambda base: [SegmentRef(id=segment, rows=written.size)], build={})
    return written


def same_hits(a: list, b: list) -> bool:
    """The same ranking, ties tolerated: equal scores position by position (ids may swap among equal scores)."""
    sa, sb = np.array([h.score for h in a]), np.array([h.score for h in b])
    return len(a) == len(b) and np.allclose(sa, sb, atol=1e-4)


def index_path(report: Report, dim: int, n: int = 20_000) -> list[list]:
    from indexer.lifecycle import delete_items
    from indexer.search import LoadedIndex
    from indexer.synthetic import clustered

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vectors, queries = clustered(n, dim), clustered(200, dim, stream=1)
        flat = write_index(root, "flat", vectors, None)
        report.check("a Flat segment is built on the GPU", flat.faiss.built_on == "gpu", str(flat.faiss.placement))
        fs = write_index(root, "fastscan", vectors, f"IVF128,PQ{dim // 2}x4fs")
        reason = fs.faiss.placement["text"]["reason"]
        report.check("a fast-scan IVF-PQ segment stays on the CPU, saying why", fs.faiss.built_on == "cpu", reason)
        rows += [["flat", flat.faiss.built_on, flat.faiss.placement["text"]["reason"]], ["fastscan", "cpu", reason]]
        delete_items(root, "flat", [f"i{i}" for i in range(0, 2000, 7)])  # tombstones: the GPU over-fetches
        on_gpu, on_cpu = LoadedIndex(root, "flat", use_gpu=True), LoadedIndex(root, "flat", use_gpu=False)
        report.check("the loaded index searches on the GPU", on_gpu.device == "gpu", str(on_gpu.placement()))
        report.check("use_gpu=False keeps it on the CPU", on_cpu.device == "cpu")
        dead = {f"i{i}" for i in range(0, 2000, 7)}
        agree = all(same_hits(on_gpu.search(q, 10), on_cpu.search(q, 10)) for q in queries)
        report.check("GPU-served results equal CPU-served ones (k=10, with deleted rows)", agree)
        wide = [on_gpu.search(q, 1000, filter={"half": 0}) for q in queries[:20]]  # fetch 4000: past the GPU's top-k
        agree = all(
            same_hits(w, on_cpu.search(q, 1000, filter={"half": 0})) for w, q in zip(wide, queries, strict=False)
        )
        report.check("searches past the GPU's top-k are served (by the CPU form) and agree", agree)
        report.check("no deleted row is returned", not any(h.id in dead for w in wide for h in w))
        for label, index in (("GPU", on_gpu), ("CPU", on_cpu)):
            t0 = time.perf_counter()
            for q in queries:
                index.search(q, 10)
            qps = len(queries) / (time.perf_counter() - t0)
            rows.append([f"LoadedIndex.search on the {label}", index.device, f"{qps:.0f} q/s single-query"])
        on_gpu.close()
        on_cpu.close()
    return rows


def find_models(given: Path | None) -> tuple[Path | None, str]:
    """A folder holding the default bundle (prepared): the one given, <repo>/.gpu/models, $XMODAL_DATA_DIR/models,
    or one prepared now where the export packages are installed."""
    from models.bundle import DEFAULT_MODEL

    candidates = [given, REPO / ".gpu" / "models", Path(os.environ.get("XMODAL_DATA_DIR", "data")) / "models"]
    for folder in candidates:
        if folder is not None and (folder / DEFAULT_MODEL / "manifest.json").is_file():
            return folder, f"found in {folder}"
    try:
        from models.registry import prepare

        folder = Path(tempfile.mkdtemp(prefix="xmodal-gpu-models-"))
        prepare(folder, DEFAULT_MODEL)
        return folder, f"prepared now in {folder}"
    except Exception as exc:  # the export packages (torch, the MiniLM checkpoint) are missing here
        return None, f"no {DEFAULT_MODEL} bundle and none can be prepared here ({type(exc).__name__}: {exc})"


def service_path(report: Report, models: Path, env: dict, items: int = 3000) -> list[list]:
    """`xmodal index build` with the GPU on, then the real app's /readyz and a search."""
    from fastapi.testclient import TestClient

    from indexer.demo import write_demo_corpus
    from service.app import create_app
    from service.settings import Settings

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        shutil.copytree(models, data / "models")
        corpus = write_demo_corpus(Path(tmp) / "demo.jsonl", n=items)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        run_env = {**os.environ, "XMODAL_DATA_DIR": str(data), "XMODAL_DEVICE": "auto", "PYTHONPATH": path}
        cmd = [sys.executable, "-m", "service", "index", "build", "--name", "demo", "--corpus", str(corpus)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=900)
        if not report.check("`xmodal index build` ran", done.returncode == 0, done.stderr[-500:]):
            return rows
        current = (data / "indexes" / "demo" / "CURRENT").read_text().strip()
        manifest = json.loads((data / "indexes" / "demo" / "versions" / f"{current}.json").read_text())
        faiss_info, build = manifest["faiss"], manifest["build"]
        if env["faiss_gpus"]:
            report.check("the manifest says FAISS built on the GPU", faiss_info["built_on"] == "gpu", str(faiss_info))
        if "CUDAExecutionProvider" in env["ort_providers"]:
            cuda = all("CUDAExecutionProvider" in p for p in build["providers"].values())
            report.check("the manifest says the encoder ran on CUDA", cuda, str(build["providers"]))
        rows.append(["xmodal index build", f"{time.perf_counter() - t0:.1f} s", f"built_on={faiss_info['built_on']}"])
        rows.append(["encode", f"{build.get('items_per_second')} items/s", json.dumps(build["providers"])])
        with TestClient(create_app(Settings(data_dir=data, reload_interval_s=0))) as client:
            ready = client.get("/readyz").json()
            index, model = ready["indexes"]["demo"], ready["model"]
            if env["faiss_gpus"]:
                report.check("/readyz: the index searches on the GPU", index["device"] == "gpu", json.dumps(index))
            if "CUDAExecutionProvider" in env["ort_providers"]:
                report.check("/readyz: the model runs on CUDA", model["device"] == "cuda", json.dumps(model))
            found = client.post("/v1/search", json={"index": "demo", "query": {"text": "a football match"}, "k": 5})
            report.check("a search through the app answers", found.status_code == 200, found.text[:200])
            rows.append(["/readyz index", index["device"], json.dumps(index["placement"])[:120]])
            rows.append(["/readyz model", model["device"], json.dumps(model["providers"])])
            rows.append(["/readyz devices", "", json.dumps(ready["devices"])])
    return rows


# --- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors of the FAISS benchmark")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--models", type=Path, default=None, help="a folder holding the prepared xmodal-mini bundle")
    parser.add_argument("--parts", default="faiss,onnx,index,service", help="which parts to run (comma-separated)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    report = Report()
    env = environment()
    print("## Environment\n")
    print(table(["what", "value"], [[k, str(v)] for k, v in env.items()]) + "\n")
    faiss_gpu = env["faiss_gpus"] > 0
    ort_cuda = "CUDAExecutionProvider" in env["ort_providers"]
    if not faiss_gpu and not ort_cuda:
        seen = "" if env["nvidia_smi"] in ("not found", "no GPU listed") else f" (nvidia-smi: {env['nvidia_smi']})"
        print(
            f"no GPU: FAISS sees no GPU and ONNX Runtime offers no CUDA provider{seen}; nothing was run. Install the "
            "`gpu` extra (onnxruntime-gpu, faiss-gpu) on a CUDA machine, see docs/gpu.md."
        )
        return NO_GPU
    models, models_note = (None, "not needed") if not parts & {"onnx", "service"} else find_models(args.models)
    steps = [
        ("faiss", faiss_gpu, "FAISS sees no GPU (faiss-cpu, or its CUDA libraries did not load)"),
        ("onnx", ort_cuda, "this ONNX Runtime offers no CUDAExecutionProvider (onnxruntime, not onnxruntime-gpu)"),
        ("index", faiss_gpu, "FAISS sees no GPU"),
        ("service", models is not None, models_note),
    ]
    for part, possible, why in steps:
        if part not in parts:
            continue
        if not possible:
            report.skip(part, why)
            continue
        try:
            if part == "faiss":
                print("## FAISS: GPU decision against FAISS's own cloner\n")
                decided = faiss_decisions(report, args.dim)
                print(table(["key", "decided", "why", "cloned by FAISS"], decided) + "\n")
                print(f"## FAISS: {args.n:,} x {args.dim} clustered vectors, {args.queries} queries, recall@10\n")
                heads = ["key", "params", "build s CPU", "build s GPU", "recall CPU", "recall GPU"]
                heads += ["q/s batched CPU", "q/s batched GPU", "q/s single CPU", "q/s single GPU"]
                print(table(heads, faiss_bench(report, args.n, args.dim, args.queries)) + "\n")
            elif part == "onnx":
                rows, source = onnx_bench(report, models)
                print(f"## ONNX Runtime: {source}\n")
                heads = ["tower", "items/s CPU b32", "items/s CUDA b32", "items/s CPU b1", "items/s CUDA b1"]
                print(table([*heads, "max abs diff", "min cosine"], rows) + "\n")
            elif part == "index":
                print("## The index path (synthetic vectors)\n")
                print(table(["what", "device", "detail"], index_path(report, args.dim)) + "\n")
            elif part == "service":
                print(f"## `xmodal index build` and /readyz (model {models_note})\n")
                print(table(["what", "value", "detail"], service_path(report, models, env)) + "\n")
        except Exception as exc:
            traceback.print_exc()
            report.check(f"part {part} ran", False, f"{type(exc).__name__}: {exc}")
    print("## Checks\n")
    print(table(["check", "result", "detail"], [[n, "ok" if ok else "FAILED", d[:100]] for n, ok, d in report.checks]))
    for part, why in report.skips:
        print(f"\nskipped {part}: {why}")
    return report.status()


if __name__ == "__main__":
    sys.exit(main())
