"""Foundation benchmark: index build throughput, /v1/search latency (cache miss vs hit), ONNX Runtime vs torch.

Usage:
    python bench/foundation.py [--data-dir DIR] [--queries N]

Without --data-dir everything (model bundle, corpus, index) lives in a temporary directory that is removed at
the end, so a run always starts cold: the MiniLM bundle is exported to ONNX first (not timed as a result).

1. Index build: prepare the default model bundle, write the demo corpus, time ``indexer.build.build_index``.
2. /v1/search: the real app (``service.app.create_app``) served by uvicorn in a subprocess on a free 127.0.0.1
   port, queried one request at a time over a keep-alive httpx connection. Cache misses are queries never sent
   before (so both the result cache and the embedding cache miss); hits repeat exactly the same requests.
   Run with the in-process LRU cache and, when ``redis-server`` is on PATH, with a redis-server started here.
3. Text tower: torch eager (the exporter's own wrapper module) vs the ONNX Runtime session of ``Encoder``,
   on identical tokenised batches of demo sentences, same thread count (all usable cores), warm-up, then the
   runtimes take turns in blocks of back-to-back calls; per-batch median (and best) times.

Every section also reports how much CPU other processes took meanwhile: on a small machine a concurrent test run
skews everything, torch's OpenMP threads most of all. Run it on a quiet machine.
Prints markdown tables (progress goes to stderr); paste them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without the editable install
    sys.path.insert(0, str(REPO))

from common import OtherLoad, cpu_model, table  # noqa: E402  (bench/common.py: this script's folder is on sys.path)

from indexer.build import build_index  # noqa: E402
from indexer.corpus import read_jsonl  # noqa: E402
from indexer.demo import TOPICS, write_demo_corpus  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.registry import DEFAULT_MODEL, prepare  # noqa: E402

INDEX = "demo"
K = 10
FLOOR = "GET /healthz (HTTP floor)"
MISS_TARGET = 5.0  # miss p50 / hit p50
ORT_TARGET = 1.5  # ONNX Runtime items/s / torch eager items/s
SWITCH_PAUSE_S = 0.3  # between blocks of calls of different runtimes (see _alternating)

# The server runs in its own process, so client and server do not share a GIL; it is the same app object
# `xmodal serve` runs (create_app + uvicorn with its default loop and HTTP implementation).
SERVER_CODE = """
import logging, sys
import uvicorn
from service.app import create_app
from service.settings import Settings
data_dir, port, redis_url = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
logging.basicConfig(level=logging.WARNING)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
settings = Settings(data_dir=data_dir, reload_interval_s=0, redis_url=redis_url)
uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""

QUERY_TEMPLATES = [
    "which stories mention {s} and {o}",
    "looking for {s} that {v} {o}",
    "something about {o} and {s}",
    "find reports where {s} {v} {o}",
    "{o} with {s}, any news",
]


# --- output ------------------------------------------------------------------------------------------------
def say(text: str = "") -> None:
    print(text, flush=True)


def log(text: str) -> None:  # progress goes to stderr so stdout holds only the report
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "MISSED"


# --- header ------------------------------------------------------------------------------------------------
def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return str(getattr(mod, "__version__", "?"))


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (with uncommitted changes)" if dirty else "")


def _redis_version(exe: str | None) -> str:
    if not exe:
        return "not found"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return next((p[2:] for p in out.split() if p.startswith("v=")), out.strip())


def header(argv: list[str]) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    say("# xmodal foundation benchmark")
    say()
    say(f"- command: `python {shlex.join(argv)}` (interpreter {sys.executable})")
    say(f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
    say(f"- machine: {platform.platform()}, {cpu_model()}, os.cpu_count()={os.cpu_count()}, usable CPUs={affinity}")
    say(
        f"- python {platform.python_version()}; onnxruntime {_version('onnxruntime')}, torch {_version('torch')}, "
        f"faiss {_version('faiss')}, transformers {_version('transformers')}, fastapi {_version('fastapi')}, "
        f"uvicorn {_version('uvicorn')}, redis-server {_redis_version(shutil.which('redis-server'))}"
    )
    say(f"- xmodal commit: {_git_rev()}")
    say()


# --- 1. index build ----------------------------------------------------------------------------------------
def bench_build(data_dir: Path) -> tuple[Encoder, list[str]]:
    models_dir = data_dir / "models"
    t0 = time.perf_counter()
    _, built = prepare(models_dir)
    t_prepare = time.perf_counter() - t0
    log(f"model bundle {'exported' if built else 'already there'} in {t_prepare:.1f}s")
    bundle = models_dir / DEFAULT_MODEL
    corpus_path = write_demo_corpus(data_dir / "corpora" / "demo.jsonl")
    items = read_jsonl(corpus_path)
    encoder = Encoder(bundle)
    encoder.encode_text(["warm up"])  # first run allocates; the service does the same at start-up

    with OtherLoad() as load:
        t0 = time.perf_counter()
        result = build_index(
            indexes_dir=data_dir / "indexes",
            name=INDEX,
            items=items,
            encoder=encoder,
            corpus_path=corpus_path,
            publish=True,
        )
        wall = time.perf_counter() - t0
    m = result.manifest
    b = m.build
    n = len(items)
    say("## 1. Index build (demo corpus)")
    say()
    say(
        f"Model bundle `{DEFAULT_MODEL}`: {'exported to ONNX now' if built else 'reused'} in {t_prepare:.1f} s "
        "(not part of the figures). Encoder warmed with one call; batch size "
        f"{b['batch_size']}, providers {encoder.providers['text']}; {load}."
    )
    say()
    say(
        table(
            [
                "items",
                "encode s",
                "encode docs/s",
                "total s",
                "total docs/s",
                "FAISS key",
                "built on",
                "recall@10",
                "published",
            ],
            [
                [
                    n,
                    f"{b['encode_seconds']:.2f}",
                    f"{n / b['encode_seconds']:.0f}",
                    f"{wall:.2f}",
                    f"{n / wall:.0f}",
                    m.faiss["key"],
                    m.faiss["built_on"],
                    f"{m.recall_at_10['value']:.3f}",
                    result.published,
                ]
            ],
        )
    )
    say()
    say(
        "total = the whole `build_index` call: encode, FAISS build, recall and calibration sampling, writing "
        "the version (FAISS file, SQLite items, manifest) and publishing it."
    )
    say()
    return encoder, [it.text for it in items]


# --- 2. /v1/search ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def redis_server(exe: str, workdir: Path) -> Iterator[str]:
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def api_server(data_dir: Path, redis_url: str | None) -> Iterator[httpx.Client]:
    port = free_port()
    logfile = data_dir / f"server-{port}.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_CODE, str(data_dir), str(port), redis_url or ""],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{logfile.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                r = client.get("/readyz")
                if r.status_code == 200 and INDEX in r.json()["indexes"]:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in time:\n{logfile.read_text()[-3000:]}")
            time.sleep(0.1)
        yield client
    finally:
        client.close()
        _stop(proc)


class QueryTexts:
    """Distinct, natural-looking query texts: template x topic words, plus a serial number."""

    def __init__(self) -> None:
        self.serial = 0
        self.rng = np.random.default_rng(11)
        self.words = [TOPICS[t] for t in sorted(TOPICS)]

    def next(self) -> str:
        self.serial += 1
        w = self.words[self.serial % len(self.words)]
        pick = lambda xs: xs[int(self.rng.integers(len(xs)))]  # noqa: E731
        text = pick(QUERY_TEMPLATES).format(s=pick(w["subject"]), v=pick(w["verb"]), o=pick(w["object"]))
        return f"{text} (#{self.serial})"

    def take(self, n: int) -> list[str]:
        return [self.next() for _ in range(n)]


def _search(client: httpx.Client, body: dict) -> tuple[float, float, bool]:
    t0 = time.perf_counter()
    r = client.post("/v1/search", json=body)
    wall = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    data = r.json()
    if len(data["results"]) != body["k"]:
        raise RuntimeError(f"expected {body['k']} results, got {len(data['results'])}")
    return float(data["took_ms"]), wall, bool(data["cached"])


def run_cases(client: httpx.Client, texts: QueryTexts, n: int) -> dict[str, dict]:
    """Per query: a never-seen text (miss), the very same request again (hit), the same text with another k,
    and a GET /healthz (the HTTP round trip with no work: the floor under every client-side figure).

    The cases are interleaved query by query, so load from elsewhere on the machine hits them alike."""
    for text in texts.take(10):  # warm the connection and the code paths; never reused
        _search(client, {"index": INDEX, "query": {"text": text}, "k": K})
    cases = {
        # never-seen text: result cache miss and embedding cache miss (the query is encoded)
        "miss": (lambda body: body, False),
        # the very same request again: result cache hit
        "hit": (lambda body: body, True),
        # same text, another k: result cache miss, embedding cache hit (FAISS search, no encoder)
        "miss, embedding cached": (lambda body: {**body, "k": K - 1}, False),
    }
    out = {case: {"took": [], "wall": [], "wrong": 0} for case in cases}
    floor: dict = {"took": [], "wall": [], "wrong": ""}
    for text in texts.take(n):
        body = {"index": INDEX, "query": {"text": text}, "k": K}
        for case, (make, expect_cached) in cases.items():
            took, wall, cached = _search(client, make(body))
            out[case]["took"].append(took)
            out[case]["wall"].append(wall)
            out[case]["wrong"] += cached != expect_cached
        t0 = time.perf_counter()
        client.get("/healthz").raise_for_status()
        floor["wall"].append((time.perf_counter() - t0) * 1000)
    out[FLOOR] = floor
    return out


def bench_search(data_dir: Path, n: int, use_redis: bool) -> None:
    texts = QueryTexts()
    backends: list[tuple[str, dict, dict, OtherLoad]] = []
    log(f"/v1/search with the in-process LRU cache, {n} queries per case")
    # OtherLoad around the servers' whole lives: their CPU time counts as ours once they are waited for.
    with OtherLoad() as load, api_server(data_dir, None) as client:
        res = run_cases(client, texts, n)
        status = client.get("/readyz").json()["cache"]
    backends.append(("memory (LRU)", res, status, load))
    exe = shutil.which("redis-server")
    if use_redis and exe:
        log(f"/v1/search with redis-server ({exe}), {n} queries per case")
        with OtherLoad() as load, redis_server(exe, data_dir) as url, api_server(data_dir, url) as client:
            res = run_cases(client, texts, n)
            status = client.get("/readyz").json()["cache"]
        backends.append(("redis", res, status, load))

    say("## 2. `/v1/search` latency (sequential, one client, keep-alive)")
    say()
    say(
        f"Index `{INDEX}` as built above, k={K}, text queries; {n} requests per case after 10 warm-up requests. "
        "server = `took_ms` of the response; client = wall time of the HTTP call (httpx, same machine). "
        "The server is `create_app(Settings(data_dir=..., reload_interval_s=0[, redis_url=...]))` under uvicorn "
        "in a subprocess on 127.0.0.1. The cases are interleaved query by query. miss = a text never sent before "
        "(result and embedding caches both miss); hit = the very same request again; miss, embedding cached = the "
        f"same text with k={K - 1}; {FLOOR} = an empty round trip."
    )
    say()
    rows, ratios = [], []
    for name, res, status, load in backends:
        for case, r in res.items():
            rows.append(
                [
                    name,
                    case,
                    len(r["wall"]),
                    *(
                        [f"{pct(r['took'], 50):.2f}", f"{pct(r['took'], 99):.2f}", f"{statistics.fmean(r['took']):.2f}"]
                        if r["took"]
                        else ["", "", ""]
                    ),
                    f"{pct(r['wall'], 50):.2f}",
                    f"{pct(r['wall'], 99):.2f}",
                    r["wrong"],
                ]
            )
        miss, hit = res["miss"], res["hit"]
        server = pct(miss["took"], 50) / pct(hit["took"], 50)
        client = pct(miss["wall"], 50) / pct(hit["wall"], 50)
        ratios.append(
            [
                name,
                f"{server:.1f}x",
                f"{client:.1f}x",
                f">= {MISS_TARGET:g}x",
                verdict(server, MISS_TARGET),
                verdict(client, MISS_TARGET),
                ", ".join(f"{k}={v}" for k, v in status.items()),
                f"{load.share:.0f}%",
            ]
        )
    say(
        table(
            [
                "cache",
                "case",
                "n",
                "server p50 ms",
                "server p99 ms",
                "server mean ms",
                "client p50 ms",
                "client p99 ms",
                "unexpected `cached`",
            ],
            rows,
        )
    )
    say()
    say(
        table(
            [
                "cache",
                "miss p50 / hit p50 (server)",
                "(client)",
                "target",
                "server-side",
                "client-side",
                "cache status after",
                "other processes' CPU",
            ],
            ratios,
        )
    )
    if use_redis and not exe:
        say()
        say("redis-server is not on PATH: the Redis rows were skipped.")
    say()


# --- 3. ONNX Runtime vs torch eager ------------------------------------------------------------------------
def _alternating(runners: dict, batches: list[dict], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, best) seconds per pass over ``batches`` for each runner: sums over batches of each batch's
    median (and minimum) time over ``repeats``.

    Runtimes take turns in blocks, one block = every batch once, back to back (as an index build calls the
    encoder); the order of the blocks rotates each repeat, so drift and load from elsewhere hit all alike.
    Blocks are SWITCH_PAUSE_S apart: ONNX Runtime's worker threads keep spinning for a while after a run, and
    a torch call started 10 ms after an ORT call ran 1.4x (batch 32) to 3x (batch 1) slower here."""
    names = list(runners)
    times: dict[str, list[list[float]]] = {name: [[] for _ in batches] for name in names}
    for fn in runners.values():  # warm-up: every shape once per runner (both runtimes cache per-shape work)
        time.sleep(SWITCH_PAUSE_S)
        for feed in batches:
            fn(feed)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(SWITCH_PAUSE_S)
            for i, feed in enumerate(batches):
                t0 = time.perf_counter()
                runners[name](feed)
                times[name][i].append(time.perf_counter() - t0)
    return {
        name: (sum(statistics.median(ts) for ts in per_batch), sum(min(ts) for ts in per_batch))
        for name, per_batch in times.items()
    }


def _flops(cfg, feed: dict) -> float:  # noqa: ANN001
    """Multiply-adds x 2 of a BERT encoder on one padded batch: Q, K, V, output and the two MLP matrices, plus
    the two attention products (QK^T and attention x V)."""
    b, s = feed["input_ids"].shape
    h, inner, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return 2.0 * b * s * layers * (4 * h * h + 2 * h * inner) + 4.0 * b * layers * s * s * h


def bench_towers(data_dir: Path, sentences: list[str], threads: int, repeats: int) -> None:
    import torch
    import transformers

    from models.export.base import OUTPUTS
    from models.export.sentence_transformers import TEXT_INPUTS, _read_st_config, _text_wrapper
    from models.registry import _minilm_source
    from models.text import TextPreprocessor

    bundle = data_dir / "models" / DEFAULT_MODEL
    torch.set_num_threads(threads)
    source = _minilm_source()
    pooling, _normalize, _max_len = _read_st_config(source)
    hf_model = transformers.AutoModel.from_pretrained(str(source)).eval()
    module = _text_wrapper(torch, hf_model, pooling)
    ort_enc = Encoder(bundle, device="cpu", threads=threads)
    default_enc = Encoder(bundle, device="cpu")  # threads=0 as the service runs it: ORT picks its own count
    sessions = {"ort": ort_enc._sessions["text"], "ort-default": default_enc._sessions["text"]}
    manifest_text = ort_enc.manifest.towers["text"]
    pre = TextPreprocessor(bundle / manifest_text.preprocessing.tokenizer, manifest_text.preprocessing.max_length)

    def run_torch(feed: dict) -> list:
        with torch.inference_mode():
            return module(*(torch.from_numpy(feed[name]) for name in TEXT_INPUTS))

    def ort_runner(session):  # noqa: ANN001, ANN202
        return lambda feed: session.run(OUTPUTS, feed)  # all outputs: the same work as the torch module

    runners = {
        "torch eager": run_torch,
        "onnxruntime": ort_runner(sessions["ort"]),
        "onnxruntime (threads=0)": ort_runner(sessions["ort-default"]),
    }

    # Real demo sentences, a fixed random sample (mixed lengths, each batch padded to its longest).
    rng = np.random.default_rng(3)
    picked = [sentences[i] for i in rng.choice(len(sentences), size=256, replace=False)]
    setups = {32: [pre(picked[i : i + 32]) for i in range(0, 256, 32)], 1: [pre([s]) for s in picked[:32]]}

    # Same answers on the same inputs, else the speed comparison means nothing.
    ref = run_torch(setups[32][0])
    got = sessions["ort"].run(OUTPUTS, setups[32][0])
    max_diff = float(np.abs(ref[0].numpy() - got[0]).max())

    flops = {bs: sum(_flops(hf_model.config, feed) for feed in batches) for bs, batches in setups.items()}
    real = sum(int(f["attention_mask"].sum()) for f in setups[32])
    padded = sum(f["attention_mask"].size for f in setups[32])
    with OtherLoad() as load:
        results = {bs: _alternating(runners, batches, repeats) for bs, batches in setups.items()}

    ort_opts = sessions["ort"].get_session_options()
    say(f"## 3. Text tower: ONNX Runtime vs torch eager (`{DEFAULT_MODEL}`)")
    say()
    say(
        f"Same tokenised inputs for both: 256 random demo sentences ({len(setups[32])} batches of 32, each padded "
        f"to its longest sentence, {np.mean([b['input_ids'].shape[1] for b in setups[32]]):.1f} tokens wide on "
        f"average; real tokens fill {100 * real / padded:.0f}% of the padded positions) and 32 of them one at a "
        "time (batch 1). torch eager = the exporter's wrapper module "
        "(`models.export.sentence_transformers._text_wrapper` over transformers `AutoModel`) under "
        "`torch.inference_mode()`; "
        f"ONNX Runtime = the `Encoder`'s session (graph optimisation level {ort_opts.graph_optimization_level.name}), "
        f"asked for the same three outputs. Threads: torch.get_num_threads()={torch.get_num_threads()}, "
        f"ORT intra_op_num_threads={ort_opts.intra_op_num_threads}; the `threads=0` row is the service default "
        f"(ORT chooses). Every call warmed up once, then {repeats} timed repeats, the runtimes taking turns in "
        f"blocks of back-to-back calls {SWITCH_PAUSE_S:g} s apart; items/s and ms per call from each batch's "
        f"median time, best = from each batch's fastest time. Max |embedding difference| torch vs ORT: "
        f"{max_diff:.1e}; {load}. GFLOP/s: the model's matrix products (dense layers and attention) on the "
        "padded shapes, per second, from the median time."
    )
    say()
    rows = []
    for bs, pass_s in results.items():
        items = len(setups[bs]) * bs
        base, best_base = (items / t for t in pass_s["torch eager"])
        for name, (median_s, best_s) in pass_s.items():
            speed, best = items / median_s, items / best_s
            target = name == "onnxruntime"
            rows.append(
                [
                    bs,
                    name,
                    f"{speed:.0f}",
                    f"{median_s / len(setups[bs]) * 1000:.2f}",
                    f"{speed / base:.2f}x",
                    f"{flops[bs] / median_s / 1e9:.0f}",
                    f"{best:.0f}",
                    f"{best / best_base:.2f}x",
                    f">= {ORT_TARGET:g}x" if target else "",
                    verdict(speed / base, ORT_TARGET) if target else "",
                ]
            )
    headers = [
        "batch",
        "runtime",
        "items/s",
        "ms per call",
        "vs torch eager",
        "GFLOP/s",
        "best items/s",
        "best vs torch",
    ]
    say(table([*headers, "target", "result"], rows))
    say()


# --- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="keep models/indexes here (default: a temporary directory)")
    parser.add_argument("--queries", type=int, default=300, help="distinct queries per latency case (default 300)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per runtime in the tower benchmark")
    parser.add_argument("--no-redis", action="store_true", help="skip the redis-server run")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.repeats < 1:
        parser.error("--queries and --repeats must be at least 1")

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    header([sys.argv[0] if sys.argv[0].endswith(".py") else "bench/foundation.py", *argv])
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.data_dir:
            data_dir = args.data_dir.resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
        else:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xmodal-bench-")))
        log(f"data dir {data_dir}")
        _encoder, sentences = bench_build(data_dir)
        bench_search(data_dir, args.queries, use_redis=not args.no_redis)
        log("text tower: torch eager vs ONNX Runtime")
        bench_towers(data_dir, sentences, threads, args.repeats)
    say(f"Benchmark wall time: {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
