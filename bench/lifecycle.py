"""Living indexes (issue 13): adding to a large index against rebuilding it, search over 1 against N segments, a
load test while adds, deletes and a compaction are published, and a kill -9 of a build then its resume.

Usage:
    python bench/lifecycle.py [--items 100000] [--add 1000] [--segments 10] [--load-items 10000] [--load-seconds 60]
                              [--skip-resume]

1. Add: a text corpus of ``--items`` demo captions (numbered past the templates, as bench/resume.py) is built with
   xmodal-mini (``indexer.build.build_index``), then ``--add`` more items are added (``add_items``: encoded into a new
   segment, a new version published); the full rebuild of all of them is timed too. In-process, one loaded encoder.
2. Segments: the rebuilt index's rows written again as one segment and as ``--segments`` segments (the real
   segment writer, no encoding; each segment's efSearch tuned to recall@10 0.95 by indexer.tuning), with the same
   FAISS key, for Flat and HNSW32,Flat; single-query search p50 and p99 over 500 queries (stored vectors of random
   rows), and the recall@10 of each against exact search (the query's own item left out).
3. Load: a ``--load-items`` index served by ``xmodal serve`` (a subprocess, polling CURRENT every 0.5 s); a client
   process runs 8 threads of /v1/search for ``--load-seconds`` while this process publishes 5 adds, 2 deletes and a
   compaction. Reports requests, failures, any client that saw a version older than one it had seen, latency.
4. Resume: bench/resume.py (a kill -9 at half of a 20k build, then the same command).

Prints markdown tables (progress on stderr). About 15 minutes on 2 cores at the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table  # noqa: E402
from bench.resume import text_corpus  # noqa: E402
from indexer import faiss_backend  # noqa: E402
from indexer.build import add_items, build_index  # noqa: E402
from indexer.corpus import read_jsonl  # noqa: E402
from indexer.layout import IndexDir, SegmentRef, new_version_name  # noqa: E402
from indexer.lifecycle import compact, delete_items  # noqa: E402
from indexer.publish import commit  # noqa: E402
from indexer.search import LoadedIndex  # noqa: E402
from indexer.segment_writer import RowRecord, write_segment  # noqa: E402
from indexer.tuning import exact_topk  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.files import staging_dir  # noqa: E402
from models.registry import prepare  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# --- 1. add against rebuild -----------------------------------------------------------------------------------
def add_section(indexes: Path, encoder: Encoder, corpus: Path, n: int, add: int) -> list:
    items = read_jsonl(corpus)
    base, extra = items[:n], items[n : n + add]
    log(f"building {n} items ...")
    _, build_s = timed(build_index, indexes_dir=indexes, name="big", items=base, encoder=encoder, use_gpu=False)
    log(f"adding {add} items ...")
    added, add_s = timed(add_items, indexes_dir=indexes, name="big", items=extra, encoder=encoder, use_gpu=False)
    log(f"rebuilding all {n + add} items ...")
    _, rebuild_s = timed(
        build_index, indexes_dir=indexes, name="rebuilt", items=base + extra, encoder=encoder, use_gpu=False
    )
    index = LoadedIndex(indexes, "big", use_gpu=False)
    found = index.search(encoder.encode_text([extra[0].text])[0], 1)[0].id == extra[0].id
    return [
        n,
        add,
        f"{build_s:.1f}",
        f"{add_s:.2f}",
        f"{rebuild_s:.1f}",
        f"{rebuild_s / add_s:.0f}x",
        len(added.segments),
        "yes" if found else "NO",
    ]


# --- 2. one segment against many ------------------------------------------------------------------------------
def rewrite(indexes: Path, source: LoadedIndex, name: str, parts: int, key: str) -> LoadedIndex:
    """``source``'s rows as a new index of ``parts`` segments, FAISS ``key``, through the real segment writer."""
    rows = source.items.all_rows()
    view = source.segments[0]
    vectors = faiss_backend.all_vectors(view.data.cpu_indexes["text"])
    target = IndexDir(indexes, name)
    bounds = np.linspace(0, len(rows), parts + 1).astype(int)
    staged, refs = [], []
    with contextlib.ExitStack() as stack:
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            segment = new_version_name()
            folder = stack.enter_context(staging_dir(target.segments_dir, segment))
            written = write_segment(
                folder,
                index=name,
                segment=segment,
                records=[RowRecord(i, m, s, t, md) for _, i, m, s, t, md in rows[a:b]],
                vectors=vectors[a:b],
                tokens=None,
                model=source.manifest.model,
                faiss_key=key,
                use_gpu=False,
            )
            staged.append((folder, written))
            refs.append(SegmentRef(id=segment, rows=written.size))
        commit(target, "build", staged, lambda base: refs, build={"rewritten_from": source.version})
    return LoadedIndex(indexes, name, use_gpu=False)


def latency(index: LoadedIndex, queries: np.ndarray, own: list[str]) -> tuple[np.ndarray, list[set[str]]]:
    """Milliseconds per single-query search (k=11), and each query's top 10 with its own item left out."""
    times, found = [], []
    for q, me in zip(queries, own, strict=True):
        t0 = time.perf_counter()
        hits = index.search(q, 11)
        times.append(time.perf_counter() - t0)
        found.append(set([h.id for h in hits if h.id != me][:10]))
    return np.array(times) * 1000, found


def segments_section(indexes: Path, parts: int) -> list:
    source = LoadedIndex(indexes, "rebuilt", use_gpu=False)
    rng = np.random.default_rng(0)
    rows = rng.choice(source.size, size=500, replace=False)
    queries = source.vectors(rows.tolist())
    records = source.items.get(rows.tolist())
    own = [records[r]["id"] for r in rows.tolist()]
    every = source.vectors(list(range(source.size)))
    ids = [r[1] for r in source.items.all_rows()]
    top11 = exact_topk(queries, every, 11)
    truth = [set([ids[j] for j in top if ids[j] != me][:10]) for top, me in zip(top11, own, strict=True)]
    out = []
    for key in ("Flat", "HNSW32,Flat"):
        tag = key.split(",")[0].lower()
        log(f"writing 1 and {parts} segments with {key} ...")
        one = rewrite(indexes, source, f"one-{tag}", 1, key)
        many = rewrite(indexes, source, f"many-{tag}", parts, key)
        latency(one, queries[:50], own[:50])  # warm up
        latency(many, queries[:50], own[:50])
        t1, f1 = latency(one, queries, own)
        tn, fn = latency(many, queries, own)
        recall_1 = np.mean([len(a & b) / 10 for a, b in zip(f1, truth, strict=True)])
        recall_n = np.mean([len(a & b) / 10 for a, b in zip(fn, truth, strict=True)])
        p50_1, p50_n = np.percentile(t1, 50), np.percentile(tn, 50)
        params = lambda ix: sorted({str(v.data.manifest.faiss.params) for v in ix.segments})  # noqa: E731
        out.append(
            [
                key,
                source.size,
                f"{p50_1:.2f}",
                f"{np.percentile(t1, 99):.2f}",
                f"{p50_n:.2f}",
                f"{np.percentile(tn, 99):.2f}",
                f"{p50_n / p50_1:.2f}x",
                f"{recall_1:.3f}",
                f"{recall_n:.3f}",
                " ".join(params(one)) + " / " + " ".join(params(many)),
            ]
        )
    return out


# --- 3. load while the index changes ----------------------------------------------------------------------------
CLIENT = r"""
import http.client, json, sys, threading, time
port, seconds, threads = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
texts = ["a rocket leaves the launch pad", "the chef simmers a sauce", "the striker scores", "rain over the hills",
         "a violin concerto", "a patient sees the doctor", "the server crashed again", "a cat on the sofa"]
out = []
def client(n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    stats = {"requests": 0, "failed": 0, "backwards": 0, "versions": [], "ms": []}
    last, deadline, i = "", time.monotonic() + seconds, n
    while time.monotonic() < deadline:
        body = json.dumps({"index": "live", "query": {"text": texts[i % len(texts)] + f" {i}"}, "k": 10})
        i += threads
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/search", body, {"content-type": "application/json"})
            r = conn.getresponse(); data = r.read()
            ok = r.status == 200
        except OSError:
            ok = False; conn.close(); conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        stats["ms"].append((time.perf_counter() - t0) * 1000)
        stats["requests"] += 1
        if not ok:
            stats["failed"] += 1; continue
        version = json.loads(data)["index_version"]
        if version < last:
            stats["backwards"] += 1
        if version != last:
            stats["versions"].append(version)
        last = max(last, version)
    out.append(stats)
ts = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not become ready")


def load_section(data: Path, encoder: Encoder, corpus: Path, n: int, seconds: float) -> tuple[list, list]:
    items = read_jsonl(corpus)
    indexes = data / "indexes"
    log(f"building the served index ({n} items) ...")
    build_index(indexes_dir=indexes, name="live", items=items[:n], encoder=encoder, use_gpu=False)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_") and k != "REDIS_URL"}
    env |= {"XMODAL_DATA_DIR": str(data), "XMODAL_PORT": str(port), "XMODAL_RELOAD_INTERVAL_S": "0.5"}
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ops = []
    try:
        wait_ready(port)
        log(f"load for {seconds:.0f} s while 5 adds, 2 deletes and a compaction are published ...")
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(port), str(seconds), "8"], stdout=subprocess.PIPE, text=True
        )
        step = seconds / 9
        fresh = iter(range(n, len(items), 200))
        plan = ["add", "add", "delete", "add", "add", "delete", "add", "compact"]
        for op in plan:
            time.sleep(step)
            if op == "add":
                start = next(fresh)
                m, s = timed(
                    add_items,
                    indexes_dir=indexes,
                    name="live",
                    items=items[start : start + 200],
                    encoder=encoder,
                    use_gpu=False,
                )
            elif op == "delete":
                ids = [it.id for it in items[len(ops) * 50 : len(ops) * 50 + 50]]
                (m, _), s = timed(delete_items, indexes, "live", ids)
            else:
                m, s = timed(compact, indexes, "live", use_gpu=False)
            ops.append([op, m.version, len(m.segments), sum(m.counts.values()), f"{s:.2f}"])
        stats = json.loads(client.communicate(timeout=seconds + 120)[0])
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = np.concatenate([s["ms"] for s in stats])
    requests = sum(s["requests"] for s in stats)
    versions = {v for s in stats for v in s["versions"]}
    summary = [
        [
            8,
            f"{seconds:.0f}",
            requests,
            sum(s["failed"] for s in stats),
            sum(s["backwards"] for s in stats),
            len(versions),
            f"{np.percentile(ms, 50):.1f}",
            f"{np.percentile(ms, 99):.1f}",
        ]
    ]
    return summary, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--add", type=int, default=1000)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--load-items", type=int, default=10_000)
    parser.add_argument("--load-seconds", type=float, default=60)
    parser.add_argument("--skip-resume", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        log("preparing xmodal-mini ...")
        bundle = prepare(data / "models")[0]
        encoder = Encoder(data / "models" / bundle.name)
        corpus = text_corpus(Path(tmp), args.items + args.add + 2000)
        indexes = data / "indexes"
        add_row = add_section(indexes, encoder, corpus, args.items, args.add)
        segment_rows = segments_section(indexes, args.segments)
        load, ops = load_section(data, encoder, corpus, args.load_items, args.load_seconds)
    print("\n## Add against a full rebuild\n")
    print(
        table(
            ["items", "added", "build s", "add s", "rebuild s", "rebuild / add", "segments", "new item found"],
            [add_row],
        )
    )
    print(f"\n## Search over 1 segment against {args.segments} (k=10, 500 single queries)\n")
    print(
        table(
            [
                "FAISS",
                "items",
                "1 seg p50 ms",
                "1 seg p99 ms",
                "N seg p50 ms",
                "N seg p99 ms",
                "p50 ratio",
                "1 seg recall@10",
                "N seg recall@10",
                "params (1 / N)",
            ],
            segment_rows,
        )
    )
    print("\n## Load while the index changes\n")
    print(
        table(
            ["clients", "seconds", "requests", "failed", "saw an older version", "versions seen", "p50 ms", "p99 ms"],
            load,
        )
    )
    print()
    print(table(["operation", "version", "segments", "items", "seconds"], ops))
    if not args.skip_resume:
        print("\n## kill -9 of a 20k build, then the same command (bench/resume.py)\n", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("resume.py")), "--items", "20000"], check=True)


if __name__ == "__main__":
    main()
