"""Late-interaction benchmark (issue 5): xmodal's token store and PLAID-like search against brute-force MaxSim
and PyLate (its PLAID and Voyager indexes), on the same token vectors.

Usage:
    python bench/late.py [--items 100000] [--tokens 32] [--queries 200] [--quick] [--skip-pylate]
                         [--skip-synthetic] [--skip-real] [--cache-dir DIR] [--threads 2]

Two data sets, each ``--items`` items of exactly ``--tokens`` token vectors (dim 384, the default model's),
``--queries`` queries of ``--query-tokens`` (16) tokens, L2-normalised, stored as float16:

(a) synthetic, clustered: ``items // 100`` topics (Zipf-popular), 24 terms around each topic (cosine ~0.7 to it)
    plus 40 stop-word terms shared by all, and one common direction all of them lean towards (real token
    vectors are anisotropic). An item mixes one to three topics; each token is a term of one of them (Zipf
    within the topic, 15% stop words) plus noise (cosine ~0.9 to its term). Every random direction comes from a
    Gaussian with the eigenvalue spectrum of real token vectors (i^-0.9, fitted to MiniLM-L6 tokens of the
    Cranfield abstracts; ``--isotropic``: isotropic instead). A query is a held-out item made the same way with
    16 tokens. At 100k items the median query's best MaxSim is 0.68, its 10th best 0.62, the median item 0.33,
    and its 10th and 11th best differ by 0.0011.
(b) real, from the demo model xmodal-mini (``models.registry.prepare``, then ``models.encoder.Encoder``): items
    are two-picture posts, the 16 + 16 image tokens of two ``models.mini.data.make_scenes`` pictures (split
    "all", seed 21; rendered with ``Scene.render`` and handed to ``encode_media_tokens`` as PIL images, no PNG
    round trip). Half of the queries are text: the captions of a held-out scene (split "heldout", seed 22)
    encoded by the text tower, their token sets ([CLS] ... [SEP] each) concatenated and cut at 16 tokens (all
    have 16 or more); half are pictures: the 16 image tokens of another held-out scene. Why pictures: the image
    tower encodes ~1000 pictures/s on one core (the text tower ~300 captions/s, audio ~340 clips/s), so 200k
    pictures take a few minutes on 2 cores, once: the vectors are cached under ``--cache-dir``. Captions as item
    tokens would have made items with the same template caption tie exactly.

Truth: exhaustive MaxSim (mean over query tokens of the max over an item's tokens) of every query against every
item, numpy float32 over the float16 vectors, all queries in one product per chunk. recall@10 counts the returned
items whose exact score reaches the 10th best exact score (within 1e-5), so exact ties cannot cost recall.

Systems, all given the same float16 token vectors and query tokens, one query at a time after ``--warmup``
queries (latency = wall time of the search call, in the system's own process):

- brute-force MaxSim: numpy over a float32 copy in RAM (1536 B/token), in chunks of 2^17 tokens, exact; timed on
  the first ``--brute-queries`` queries only.
- xmodal: ``indexer.late.store.write_token_store`` (build = that call: k-means, assignment, IVF, codes, files), then
  ``indexer.late.pipeline.late_search`` over the memory-mapped ``TokenStore``: fp16 storage at the default LateParams;
  2-bit and 4-bit residual storage; token pooling (``pool_factor=2``); a sweep of nprobe / candidates / depth.
  bytes/token = the store's files / stored tokens (``meta["bytes_per_token"]``).
- PyLate (bench/pylate_runner.py in ``bench/.pylate-venv``, made by bench/pylate-env.sh): PLAID (fast-plaid
  backend) at nbits 2 and 4, PyLate's default k-means settings (kmeans_niters=4, its sample size and centroid
  count), a grid of n_ivf_probe / n_full_scores timed through the fast-plaid search call (PyLate's
  ``retrieve.ColBERT`` wrapper reloads its id pickles on every call, ~40 ms here; it is timed too, at PyLate's
  default setting n_ivf_probe=8, n_full_scores=8192); Voyager (HNSW over every token, M=16, ef_construction=100:
  PyLate's defaults 64 / 200 would take hours to build here; then exact reranking), a grid of ef_search /
  k_token. bytes/token: the files fast-plaid searches (its per-chunk copies of the codes left out), or
  ``index.voyager``. PyLate's indexes take 15+ minutes each to build at 100k items on 2 cores, so they are kept
  under ``--cache-dir`` (keyed by the data and the build settings) with their measured build time and the CPU
  share other processes took meanwhile; ``--rebuild-pylate`` builds them again. Latency and recall are measured
  afresh every run.

Threads: every system runs with OMP/OPENBLAS/MKL_NUM_THREADS = ``--threads`` (default 2, the machine's cores);
PyLate also with torch.set_num_threads(--threads). xmodal's products run in blocks of 4096 tokens on a pool of
--threads threads, each block one one-thread ONNX Runtime call (``indexer.late.kernels.blockwise``): measured here, a
2-thread OpenBLAS product of this shape runs 3x slower than a 1-thread one while the other core is busy (the two
vCPUs behave like one core's hyperthreads), while one-thread blocks on two threads gain ~1.3x on a quiet machine.

Prints markdown tables (progress on stderr), and how much CPU other processes took during each system's queries.
Full run: about 30 minutes with the PyLate indexes cached. The first time, PyLate's builds dominate: on
2026-12-03, PLAID at nbits 4 took 2,434 s and Voyager 798 s on the synthetic set, so every PyLate index on both
sets takes about 3 hours (``--plaid-nbits 4`` halves PLAID's share); ``--quick`` (10k items, 100 queries): a few
minutes.
"""

from __future__ import annotations

import os
import sys

# Threads are pinned before numpy (or anything using BLAS / OpenMP) is imported, for this process and PyLate's.
_THREADS = "2"
for _i, _arg in enumerate(sys.argv):
    if _arg == "--threads" and _i + 1 < len(sys.argv):
        _THREADS = sys.argv[_i + 1]
    elif _arg.startswith("--threads="):
        _THREADS = _arg.split("=", 1)[1]
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = _THREADS

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without the editable install
    sys.path.insert(0, str(REPO))

from common import OtherLoad, cpu_model, table  # noqa: E402  (bench/common.py: this script's folder is on sys.path)

from indexer.late.pipeline import LateParams, late_search  # noqa: E402
from indexer.late.store import TokenStore, write_token_store  # noqa: E402

K = 10
TIE = 1e-5  # an item scoring within this of the 10th best exact score counts as a right answer
DIM = 384
PYLATE_VENV = REPO / "bench" / ".pylate-venv"
RUNNER = REPO / "bench" / "pylate_runner.py"
TRUTH_CHUNK = 1 << 17
SYNTHETIC_CHUNK = 4096  # items generated per draw (the draws' order fixes the data)
PLAID_GRID = "8:256,8:1024,16:1024,32:4096,8:8192"
VOYAGER_GRID = "32:16,64:32,200:100"


# --- output ------------------------------------------------------------------------------------------------
def say(text: str = "") -> None:
    print(text, flush=True)


def log(text: str) -> None:  # progress goes to stderr so stdout holds only the report
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _git_rev() -> str:
    """The checked-out commit, read from .git's files (no git command)."""
    try:
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = REPO / ".git" / ref
            if path.is_file():
                return path.read_text().strip()[:12]
            for line in (REPO / ".git" / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
            return "unknown"
        return head[:12]
    except OSError:
        return "unknown"


# --- data sets ---------------------------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Topics:
    """The synthetic world: topics, their terms, stop words (see the module docstring). Every random direction
    is drawn from a Gaussian whose covariance has the spectrum of real token vectors: eigenvalue i proportional
    to i^-SPECTRUM (``SPECTRUM`` fitted to MiniLM-L6 token vectors of the Cranfield abstracts, 247k tokens: the
    fit gave 0.82-1.01 depending on the range; half their variance lies in 37 of 384 directions, 95% in 255),
    in a random basis; ``--isotropic`` draws them from an isotropic Gaussian instead (a harder case for any
    compression: no direction matters less than another)."""

    PER_TOPIC = 24
    STOP_WORDS = 40
    SPECTRUM = 0.9

    def __init__(self, n_items: int, dim: int, seed: int, isotropic: bool = False) -> None:
        rng = np.random.default_rng([seed, 7])
        self.dim = dim
        self.n_topics = max(32, n_items // 100)
        if isotropic:
            self.colour = np.eye(dim, dtype=np.float32)
        else:
            basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
            scale = np.arange(1, dim + 1, dtype=np.float64) ** (-self.SPECTRUM / 2)
            scale *= np.sqrt(dim / np.sum(scale**2))  # E|g|^2 = dim, as for an isotropic draw
            self.colour = (scale[:, None] * basis.T).astype(np.float32)  # g @ colour: covariance B diag(s^2) B.T
        common = unit(self.gauss(rng, dim))
        self.topics = unit(0.45 * common + unit(self.gauss(rng, (self.n_topics, dim))))
        around = unit(self.gauss(rng, (self.n_topics, self.PER_TOPIC, dim)))
        self.terms = unit(self.topics[:, None, :] + around)  # cosine ~0.7 to its topic
        self.stop = unit(0.6 * common + unit(self.gauss(rng, (self.STOP_WORDS, dim))))
        w = 1.0 / np.arange(1, self.PER_TOPIC + 1) ** 0.8
        self.term_p = w / w.sum()
        w = 1.0 / np.arange(1, self.n_topics + 1) ** 0.6
        self.topic_p = w / w.sum()

    NOISE = 0.45  # a token is unit(term + NOISE * jitter), E|jitter|^2 = 1
    STOP = 0.15  # the share of stop-word tokens

    def items(self, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
        base, jitter = self.parts(n, length, rng)
        return unit(base + self.NOISE * jitter)

    def parts(self, n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(terms [n, length, D], jitter [n, length, D]) of ``n`` items, before they are mixed and normalised."""
        k = rng.integers(1, 4, size=n)
        picked = rng.choice(self.n_topics, size=(n, 3), p=self.topic_p)
        which = (rng.random((n, length)) * k[:, None]).astype(np.int64)
        topic = picked[np.arange(n)[:, None], which]
        term = rng.choice(self.PER_TOPIC, size=(n, length), p=self.term_p)
        base = self.terms[topic, term]
        is_stop = rng.random((n, length)) < self.STOP
        base[is_stop] = self.stop[rng.integers(0, self.STOP_WORDS, int(is_stop.sum()))]
        return base, self.gauss(rng, (n, length, self.dim)) / np.sqrt(self.dim)

    def jitter_covariance(self) -> np.ndarray:
        """float64 [D, D]: the covariance of one jitter vector."""
        return self.colour.T.astype(np.float64) @ self.colour / self.dim

    def gauss(self, rng: np.random.Generator, shape: int | tuple) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) @ self.colour


@dataclass
class DataSet:
    name: str
    title: str
    vectors: np.ndarray  # float16 [N * T, D] (memory-mapped)
    offsets: np.ndarray  # int64 [N + 1]
    queries: np.ndarray  # float32 [Q, Lq, D]
    folder: Path
    notes: list[str] = field(default_factory=list)

    @property
    def items(self) -> int:
        return len(self.offsets) - 1

    @property
    def key(self) -> str:
        return self.folder.name


def _save(folder: Path, vectors: np.ndarray, queries: np.ndarray, info: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "vectors.npy", vectors)
    np.save(tmp / "queries.npy", queries.astype(np.float32))
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _load(folder: Path, name: str, title: str, tokens: int) -> DataSet:
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    n = len(vectors) // tokens
    info = json.loads((folder / "info.json").read_text())
    return DataSet(
        name,
        title,
        vectors,
        np.arange(n + 1, dtype=np.int64) * tokens,
        np.load(folder / "queries.npy"),
        folder,
        info.get("notes", []),
    )


def synthetic(
    cache: Path, n: int, tokens: int, n_queries: int, q_tokens: int, seed: int, isotropic: bool = False
) -> DataSet:
    kind = "isotropic" if isotropic else f"spectrum{Topics.SPECTRUM}"
    folder = cache / f"synthetic-{kind}-n{n}-t{tokens}-q{n_queries}x{q_tokens}-d{DIM}-s{seed}"
    title = (
        f"(a) synthetic clustered ({'isotropic' if isotropic else 'real-token spectrum'}), {n} items x {tokens} "
        f"tokens, dim {DIM}, {n_queries} queries x {q_tokens} tokens"
    )
    if not (folder / "info.json").is_file():
        log(f"synthetic data: generating {n} x {tokens} tokens")
        t0 = time.perf_counter()
        world = Topics(n, DIM, seed, isotropic)
        rng = np.random.default_rng([seed, 1])
        vectors = np.empty((n * tokens, DIM), dtype=np.float16)
        for start in range(0, n, SYNTHETIC_CHUNK):
            m = min(SYNTHETIC_CHUNK, n - start)
            vectors[start * tokens : (start + m) * tokens] = world.items(m, tokens, rng).reshape(-1, DIM)
        queries = world.items(n_queries, q_tokens, np.random.default_rng([seed, 2]))
        notes = [
            f"{world.n_topics} topics x {world.PER_TOPIC} terms + {world.STOP_WORDS} stop words; random directions "
            + ("isotropic" if isotropic else f"with eigenvalue i ~ i^-{Topics.SPECTRUM}")
        ]
        _save(folder, vectors, queries, {"notes": notes, "seconds": time.perf_counter() - t0})
        log(f"synthetic data: {time.perf_counter() - t0:.0f} s")
    return _load(folder, "synthetic", title, tokens)


REAL_CORPUS_SEED = 21
REAL_QUERY_SEED = 22


def _encode_pictures(args: tuple[str, int, int, int]) -> np.ndarray:
    """Worker: image tokens float16 [count, 16, D] of make_scenes(...)[start:start + count]."""
    bundle, start, count, total = args
    from models.encoder import Encoder
    from models.mini.data import make_scenes

    scenes = make_scenes(total, REAL_CORPUS_SEED, "all")[start : start + count]
    enc = Encoder(Path(bundle), device="cpu", threads=1)
    out = enc.encode_media_tokens("image", [s.render() for s in scenes], batch_size=64)
    return np.stack(out.tokens).astype(np.float16)


def real(cache: Path, n: int, tokens: int, n_queries: int, q_tokens: int, threads: int) -> DataSet:
    per_picture = 16
    if tokens % per_picture or q_tokens != per_picture:
        raise SystemExit(f"the real set makes items of {per_picture}-token pictures and 16-token queries")
    pictures = tokens // per_picture
    folder = cache / f"real-xmodal-mini-n{n}-t{tokens}-q{n_queries}x{q_tokens}"
    title = (
        f"(b) real xmodal-mini tokens, {n} items x {tokens} tokens ({pictures} pictures x 16 image tokens), "
        f"dim {DIM}, {n_queries} queries x {q_tokens} tokens (half caption text, half pictures)"
    )
    if not (folder / "info.json").is_file():
        from concurrent.futures import ProcessPoolExecutor

        from models.encoder import Encoder
        from models.mini.data import make_scenes
        from models.registry import DEFAULT_MODEL, prepare

        models_dir = cache / "models"
        t0 = time.perf_counter()
        prepare(models_dir, DEFAULT_MODEL)
        bundle = models_dir / DEFAULT_MODEL
        log(f"real data: model bundle ready in {time.perf_counter() - t0:.0f} s")
        total = n * pictures
        chunk = 4096
        jobs = [(str(bundle), s, min(chunk, total - s), total) for s in range(0, total, chunk)]
        t0 = time.perf_counter()
        parts = []
        with ProcessPoolExecutor(max_workers=threads) as pool:
            for i, part in enumerate(pool.map(_encode_pictures, jobs)):
                parts.append(part)
                if i % 10 == 0:
                    log(f"real data: {sum(len(p) for p in parts)} / {total} pictures encoded")
        encode_s = time.perf_counter() - t0
        vectors = np.concatenate(parts).reshape(n * tokens, DIM)
        del parts
        enc = Encoder(bundle, device="cpu", threads=1)
        held = make_scenes(n_queries, REAL_QUERY_SEED, "heldout")
        n_text = n_queries // 2
        caption_tokens = []
        for s in held[:n_text]:
            toks = np.concatenate(enc.encode_text_tokens(list(s.captions)).tokens)
            if len(toks) < q_tokens:
                raise SystemExit(f"captions of {s.id} give {len(toks)} tokens, fewer than {q_tokens}")
            caption_tokens.append(toks[:q_tokens])
        image_tokens = enc.encode_media_tokens("image", [s.render() for s in held[n_text:]]).tokens
        queries = np.stack(caption_tokens + list(image_tokens)).astype(np.float32)
        notes = [
            f"{total} pictures rendered and encoded in {encode_s:.0f} s with {threads} processes of one thread "
            f"({total / encode_s:.0f} pictures/s, rendering included)"
        ]
        _save(folder, vectors, queries, {"notes": notes, "encode_s": encode_s})
        log(notes[0])
    return _load(folder, "real", title, tokens)


# --- truth and recall ---------------------------------------------------------------------------------------
def truth_scores(data: DataSet, tokens: int) -> np.ndarray:
    """float32 [Q, N]: exhaustive MaxSim of every query against every item (numpy, float32), cached."""
    path = data.folder / "truth.npy"
    if path.is_file():
        return np.load(path)
    log(f"{data.name}: exhaustive MaxSim of {len(data.queries)} queries over {data.items} items")
    t0 = time.perf_counter()
    out = maxsim_all(data.vectors, data.queries, tokens)
    np.save(path, out)
    log(f"{data.name}: truth in {time.perf_counter() - t0:.0f} s")
    return out


def maxsim_all(vectors: np.ndarray, queries: np.ndarray, tokens: int) -> np.ndarray:
    """float32 [Q, N]: MaxSim of queries [Q, Lq, D] against every item of ``tokens`` consecutive vectors."""
    q = queries.reshape(-1, queries.shape[2]).astype(np.float32)
    nq, lq = queries.shape[:2]
    out = np.empty((nq, len(vectors) // tokens), dtype=np.float32)
    for start in range(0, len(vectors), TRUTH_CHUNK):
        x = np.asarray(vectors[start : start + TRUTH_CHUNK], dtype=np.float32)
        sim = (q @ x.T).reshape(nq, lq, -1, tokens)
        out[:, start // tokens : (start + len(x)) // tokens] = sim.max(axis=3).mean(axis=1)
    return out


def recall_at_k(found: list, truth: np.ndarray) -> float:
    """Share of the returned top K whose exact score reaches the Kth best exact score (ties count as right)."""
    kth = -np.partition(-truth, K - 1, axis=1)[:, K - 1]
    hits = 0
    for i, items in enumerate(found):
        items = np.unique(np.asarray(items, dtype=np.int64)[:K])
        hits += int(np.sum(truth[i, items] >= kth[i] - TIE))
    return hits / (K * len(found))


# --- results ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    system: str
    config: str
    latency_ms: list[float]
    recall: float
    bytes_per_token: float | None
    build_s: float | None
    other_load: float | None = None
    note: str = ""
    group: str = "main"  # main | sweep | pylate-grid

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latency_ms, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latency_ms, 99))

    def row(self) -> list[object]:
        return [
            self.system,
            self.config,
            f"{self.p50:.1f}",
            f"{self.p99:.1f}",
            f"{self.recall:.3f}",
            "-" if self.bytes_per_token is None else f"{self.bytes_per_token:.0f}",
            "-" if self.build_s is None else f"{self.build_s:.0f}",
            "-" if self.other_load is None else f"{self.other_load:.0f}%",
        ]


HEADERS = ["system", "settings", "p50 ms", "p99 ms", "recall@10", "bytes/token", "build s", "other CPU"]


def brute_force(data: DataSet, truth: np.ndarray, tokens: int, n: int, warmup: int) -> Result:
    log(f"{data.name}: brute-force MaxSim, float32 copy, {n} queries")
    x32 = np.asarray(data.vectors, dtype=np.float32)
    nq = min(n, len(data.queries))

    def search(q: np.ndarray) -> np.ndarray:
        scores = np.empty(data.items, dtype=np.float32)
        for start in range(0, len(x32), TRUTH_CHUNK):
            sim = q @ x32[start : start + TRUTH_CHUNK].T
            scores[start // tokens : (start + sim.shape[1]) // tokens] = sim.reshape(len(q), -1, tokens).max(2).mean(0)
        top = np.argpartition(-scores, K - 1)[:K]
        return top[np.argsort(-scores[top], kind="stable")]

    for q in data.queries[: min(warmup, 1)]:
        search(q)
    lat, found = [], []
    with OtherLoad() as load:
        for q in data.queries[:nq]:
            t0 = time.perf_counter()
            found.append(search(q))
            lat.append((time.perf_counter() - t0) * 1000)
    return Result(
        "brute-force MaxSim (numpy)",
        f"exact, float32 in RAM, chunks of {TRUTH_CHUNK} tokens, {nq} queries",
        lat,
        recall_at_k(found, truth[:nq]),
        4.0 * DIM,
        None,
        load.share,
    )


def build_store(data: DataSet, path: Path, **kwargs: object) -> tuple[TokenStore, dict, float]:
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    row_item = np.arange(data.items, dtype=np.int32)
    meta = write_token_store(path, data.vectors, data.offsets, row_item, **kwargs)
    return TokenStore(path), meta, time.perf_counter() - t0


def time_xmodal(  # noqa: ANN201
    store: TokenStore, data: DataSet, truth: np.ndarray, params: LateParams, warmup: int, n: int | None = None
):
    allowed = np.ones(len(store.offsets) - 1, dtype=bool)
    for q in data.queries[: min(warmup, n or warmup)]:
        late_search(store, q, K, allowed, params)
    lat, found = [], []
    with OtherLoad() as load:
        for q in data.queries[:n]:
            t0 = time.perf_counter()
            hits = late_search(store, q, K, allowed, params)
            lat.append((time.perf_counter() - t0) * 1000)
            found.append(hits.items)
    return lat, recall_at_k(found, truth[: len(found)]), load.share


def describe(params: LateParams) -> str:
    default = LateParams()
    text = f"nprobe={params.nprobe} candidates={params.candidates} depth={params.depth}"
    return text + (" (defaults)" if params == default else "")


def run_xmodal(
    data: DataSet, truth: np.ndarray, work: Path, warmup: int, sweep: bool, exhaustive_queries: int
) -> list[Result]:
    results = []
    variants = [
        ("xmodal fp16", {"storage": "fp16"}),
        ("xmodal residual 2-bit", {"storage": "residual", "nbits": 2}),
        ("xmodal residual 4-bit", {"storage": "residual", "nbits": 4}),
        ("xmodal fp16, pool_factor=2", {"storage": "fp16", "pool_factor": 2}),
    ]
    default = LateParams()
    for name, kwargs in variants:
        log(f"{data.name}: building {name}")
        store, meta, build_s = build_store(data, work / name.replace(" ", "_").replace(",", ""), **kwargs)
        log(f"{data.name}: {name} built in {build_s:.0f} s, {meta['bytes_per_token']} B/token, {meta['centroids']} c.")
        grid = [default]
        if name == "xmodal fp16":
            grid.append(LateParams(exhaustive=True))
            if sweep:
                grid += [
                    LateParams(nprobe=4),
                    LateParams(nprobe=16),
                    LateParams(candidates=512, depth=512),
                    LateParams(candidates=768, depth=768),
                    LateParams(candidates=2048, depth=2048),
                    LateParams(depth=64),
                    LateParams(depth=256),
                    LateParams(depth=512),
                    LateParams(nprobe=4, candidates=512, depth=512),
                ]
        elif name.startswith("xmodal residual") and sweep:
            grid.append(LateParams(candidates=2048, depth=2048))
        seen = []
        for params in grid:
            if params in seen:
                continue
            seen.append(params)
            n = exhaustive_queries if params.exhaustive else None
            lat, rec, load = time_xmodal(store, data, truth, params, warmup, n)
            config = f"exhaustive (every item scored exactly), {n} queries" if params.exhaustive else describe(params)
            group = "main" if params in (default,) or params.exhaustive else "sweep"
            note = f"{meta['tokens']} tokens stored" if kwargs.get("pool_factor", 1) > 1 else ""
            results.append(Result(name, config, lat, rec, meta["bytes_per_token"], build_s, load, note, group))
            log(f"{data.name}: {name} {config}: p50 {results[-1].p50:.1f} ms, recall {rec:.3f}")
        del store
        shutil.rmtree(work / name.replace(" ", "_").replace(",", ""), ignore_errors=True)
    return results


# --- PyLate ---------------------------------------------------------------------------------------------------
def _fingerprint(data: DataSet) -> str:
    h = hashlib.sha256()
    h.update(str(data.vectors.shape).encode())
    v = np.asarray(data.vectors)
    for start in range(0, len(v), max(1, len(v) // 64)):
        h.update(v[start : start + 16].tobytes())
    return h.hexdigest()[:12]


def run_pylate(data: DataSet, truth: np.ndarray, cache: Path, args: argparse.Namespace) -> list[Result]:
    python = Path(args.pylate_venv) / "bin" / "python"
    if not python.is_file():
        log(f"PyLate venv missing ({python}): skipped")
        return []
    offsets_path = data.folder / "offsets.npy"
    if not offsets_path.is_file():
        np.save(offsets_path, data.offsets)
    out_json = Path(tempfile.mkdtemp(prefix="xmodal-pylate-")) / "pylate.json"
    work = cache / "pylate" / f"{data.key}-{_fingerprint(data)}"
    cmd = [
        str(python),
        str(RUNNER),
        "--vectors",
        str(data.folder / "vectors.npy"),
        "--offsets",
        str(offsets_path),
        "--queries",
        str(data.folder / "queries.npy"),
        "--work",
        str(work),
        "--out",
        str(out_json),
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup),
        "--plaid-nbits",
        args.plaid_nbits,
        "--plaid-grid",
        args.plaid_grid,
        "--voyager-grid",
        args.voyager_grid,
        "--plaid-engine",
    ]
    if args.rebuild_pylate:
        cmd.append("--rebuild")
    env = dict(os.environ)
    log(f"{data.name}: PyLate: {shlex.join(cmd)}")
    with OtherLoad():
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not out_json.is_file():
        log(f"{data.name}: PyLate runner failed with exit status {proc.returncode}")
        return [Result("PyLate", f"runner failed (exit {proc.returncode}), see stderr", [np.nan], np.nan, None, None)]
    report = json.loads(out_json.read_text())
    shutil.rmtree(out_json.parent, ignore_errors=True)
    results = []
    for run in report["runs"]:
        c = run["config"]
        if run["system"] == "PyLate PLAID":
            config = f"nbits={c['nbits']} n_ivf_probe={c['n_ivf_probe']} n_full_scores={c['n_full_scores']}"
            system = "PyLate PLAID" + (" (fast-plaid search call)" if run["call"].startswith("fast_plaid") else "")
        else:
            config = (
                f"M={c['M']} ef_construction={c['ef_construction']} ef_search={c['ef_search']} k_token={c['k_token']}"
            )
            system = "PyLate Voyager"
        note = "index from the cache, build time as measured then" if run.get("cached") else ""
        if run.get("build_other_load") is not None:
            note += ("; " if note else "") + f"other CPU during its build {run['build_other_load']:.0f}%"
        results.append(
            Result(
                system,
                config,
                run["latency_ms"],
                recall_at_k(run["top10"], truth),
                run["index_bytes"] / report["tokens"],
                run["build_s"],
                run.get("other_load"),
                note,
                "pylate",
            )
        )
    return results


# --- report ---------------------------------------------------------------------------------------------------
def report(data: DataSet, results: list[Result], pylate_note: str | None) -> None:
    say(f"## {data.title}")
    say()
    for note in data.notes:
        say(f"- {note}")
    say()
    main = [r for r in results if r.group == "main"]
    pylate = [r for r in results if r.group == "pylate"]
    best_py = _best_pylate(pylate)
    rows = [r.row() for r in main]
    if pylate_note:
        rows.append(["PyLate PLAID / Voyager", pylate_note, "-", "-", "-", "-", "-", "-"])
    if best_py:
        shown = {id(r) for r in _pylate_summary(pylate)}
        rows += [r.row() for r in pylate if id(r) in shown]
    say(table(HEADERS, rows))
    say()
    notes = {}
    for r in results:
        if r.note:
            notes.setdefault(f"{r.system}, {r.config.split(' n_ivf')[0].split(' ef_search')[0]}", r.note)
    for what, note in notes.items():
        say(f"- {what}: {note}")
    if notes:
        say()
    sweep = [r for r in results if r.group == "sweep" or (r.group == "main" and r.config.endswith("(defaults)"))]
    if len(sweep) > 2:
        say("Recall / latency trade-off (xmodal):")
        say()
        say(table(HEADERS, [r.row() for r in sorted(sweep, key=lambda r: (r.system, r.p50))]))
        say()
    if pylate:
        say("PyLate, every setting tried:")
        say()
        say(table(HEADERS, [r.row() for r in sorted(pylate, key=lambda r: (r.system, r.p50))]))
        say()
    targets(data, results, best_py)


def _pylate_summary(pylate: list[Result]) -> list[Result]:
    """Per PyLate system, its best-recall setting and its fastest one."""
    out = []
    for system in sorted({r.system for r in pylate}):
        rs = [r for r in pylate if r.system == system and not np.isnan(r.recall)]
        if rs:
            out.append(max(rs, key=lambda r: (round(r.recall, 3), -r.p50)))
            fastest = min(rs, key=lambda r: r.p50)
            if fastest is not out[-1]:
                out.append(fastest)
    return out


def _best_pylate(pylate: list[Result]) -> Result | None:
    rs = [r for r in pylate if not np.isnan(r.recall)]
    return max(rs, key=lambda r: (round(r.recall, 3), -r.p50)) if rs else None


def targets(data: DataSet, results: list[Result], best_py: Result | None) -> None:
    fp16 = next(r for r in results if r.system == "xmodal fp16" and r.config.endswith("(defaults)"))
    res2 = next((r for r in results if r.system == "xmodal residual 2-bit" and r.config.endswith("(defaults)")), None)
    rows = [
        [
            "fast path recall@10 vs exhaustive MaxSim, defaults",
            ">= 0.95",
            f"{fp16.recall:.3f}",
            _v(fp16.recall >= 0.95),
        ],
        ["p50 latency, fp16, defaults", "< 50 ms", f"{fp16.p50:.1f} ms", _v(fp16.p50 < 50)],
    ]
    if res2:
        ratio = fp16.bytes_per_token / res2.bytes_per_token
        cost = (fp16.recall - res2.recall) * 100
        rows.append(["fp16 bytes/token / 2-bit residual bytes/token", ">= 7", f"{ratio:.2f}", _v(ratio >= 7)])
        rows.append(["recall cost of 2-bit residuals (points)", "< 1", f"{cost:.1f}", _v(cost < 1)])
        rows.append(["p50 latency, 2-bit residual, defaults", "< 50 ms", f"{res2.p50:.1f} ms", _v(res2.p50 < 50)])
    pylate = [r for r in results if r.group == "pylate" and not np.isnan(r.recall)]
    if best_py is not None:
        ours = [r for r in results if r.system.startswith("xmodal") and "exhaustive" not in r.config]
        # against every PyLate setting: the fastest xmodal setting with at least its recall
        beaten = 0
        for p in pylate:
            match = [r for r in ours if r.recall >= p.recall]
            if match and min(m.p50 for m in match) < p.p50:
                beaten += 1
        target = f"recall >= {best_py.recall:.3f} and p50 < {best_py.p50:.1f} ms"
        rows.append(
            [
                f"xmodal fp16 defaults vs PyLate's best ({best_py.system}, {best_py.config})",
                target,
                f"recall {fp16.recall:.3f}, p50 {fp16.p50:.1f} ms",
                _v(fp16.recall >= best_py.recall and fp16.p50 < best_py.p50),
            ]
        )
        rows.append(
            [
                "PyLate settings beaten by an xmodal setting (faster at equal or better recall)",
                f"{len(pylate)} of {len(pylate)}",
                f"{beaten} of {len(pylate)}",
                _v(beaten == len(pylate)),
            ]
        )
    say(f"Targets ({data.name}):")
    say()
    say(table(["target", "wanted", "measured", "result"], rows))
    say()


def _v(ok: bool) -> str:
    return "met" if ok else "MISSED"


# --- main -----------------------------------------------------------------------------------------------------
def header(argv: list[str], args: argparse.Namespace) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    say("# xmodal late-interaction benchmark")
    say()
    say(f"- command: `python {shlex.join(argv)}` (interpreter {sys.executable})")
    say(f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
    say(f"- machine: {platform.platform()}, {cpu_model()}, os.cpu_count()={os.cpu_count()}, usable CPUs={affinity}")
    say(
        f"- python {platform.python_version()}; numpy {_version('numpy')}, onnxruntime {_version('onnxruntime')}, "
        f"faiss {_version('faiss-cpu')}, scipy {_version('scipy')}; xmodal commit {_git_rev()}"
    )
    say(
        f"- threads: OMP/OPENBLAS/MKL_NUM_THREADS={args.threads} for every system (PyLate: torch.set_num_threads"
        f"({args.threads}) too); load average at start {os.getloadavg()[0]:.2f}"
    )
    d = LateParams()
    say(f"- xmodal LateParams defaults: nprobe={d.nprobe} candidates={d.candidates} depth={d.depth}")
    say("- recall@10: against exhaustive MaxSim over the float16 vectors, ties counted as right (see the docstring)")
    say("- other CPU: share of the machine's CPU time other processes used while that row's queries ran")
    say()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=32, help="token vectors per item (default 32)")
    parser.add_argument("--query-tokens", type=int, default=16)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="10k items, 100 queries, no sweep (a few minutes)")
    parser.add_argument("--skip-pylate", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--isotropic", action="store_true", help="synthetic directions isotropic (harder to compress)")
    parser.add_argument("--no-sweep", action="store_true", help="only the default settings of each xmodal store")
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP/torch threads for every system")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--brute-queries", type=int, default=20, help="queries timed for brute force (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "xmodal-late-bench")
    parser.add_argument("--pylate-venv", type=Path, default=PYLATE_VENV)
    parser.add_argument("--plaid-nbits", default="2,4")
    parser.add_argument("--plaid-grid", default=PLAID_GRID, help="n_ivf_probe:n_full_scores pairs")
    parser.add_argument("--voyager-grid", default=VOYAGER_GRID, help="ef_search:k_token pairs")
    parser.add_argument("--rebuild-pylate", action="store_true", help="build PyLate's indexes even when cached")
    args = parser.parse_args(argv)
    if args.quick:
        if "--items" not in " ".join(argv):
            args.items = 10_000
        if "--queries" not in " ".join(argv):
            args.queries = 100
        args.no_sweep = True
        args.brute_queries = min(args.brute_queries, 10)
    cache = args.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    header([sys.argv[0] if sys.argv[0].endswith(".py") else "bench/late.py", *argv], args)
    started = time.perf_counter()
    sets = []
    if not args.skip_synthetic:
        sets.append(
            lambda: synthetic(
                cache, args.items, args.tokens, args.queries, args.query_tokens, args.seed, args.isotropic
            )
        )
    if not args.skip_real:
        sets.append(lambda: real(cache, args.items, args.tokens, args.queries, args.query_tokens, args.threads))
    pylate_note = None
    if args.skip_pylate:
        pylate_note = "skipped (--skip-pylate)"
    elif not (args.pylate_venv / "bin" / "python").is_file():
        pylate_note = "skipped: PyLate venv missing, run bench/pylate-env.sh"
    for make in sets:
        data = make()
        truth = truth_scores(data, args.tokens)
        results = [brute_force(data, truth, args.tokens, args.brute_queries, args.warmup)]
        with tempfile.TemporaryDirectory(prefix="xmodal-late-", dir=cache) as work:
            results += run_xmodal(data, truth, Path(work), args.warmup, not args.no_sweep, args.brute_queries)
        if pylate_note is None:
            results += run_pylate(data, truth, cache, args)
        report(data, results, pylate_note)
    say(f"Benchmark wall time: {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
