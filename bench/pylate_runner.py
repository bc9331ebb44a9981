"""PyLate's side of bench/late.py: its PLAID (fast-plaid) and Voyager indexes over precomputed token vectors.

Runs INSIDE PyLate's own environment (``bench/.pylate-venv``, made by ``bench/pylate-env.sh``); bench/late.py
starts it with that venv's python. It imports nothing from xmodal. Nothing is encoded here: the document tokens
(``--vectors`` float16 [T, D] with ``--offsets`` int64 [N+1]) and the query tokens (``--queries`` float32
[Q, Lq, D]) are the very arrays xmodal indexes, handed over as ``.npy`` files.

- PLAID: ``pylate.indexes.PLAID`` (fast-plaid backend) built once per ``--plaid-nbits`` value with
  ``kmeans_niters`` (PyLate's k-means sample size and centroid count); searched through
  ``pylate.retrieve.ColBERT(index).retrieve`` for every (``n_ivf_probe``, ``n_full_scores``) pair of
  ``--plaid-grid``. ``--plaid-engine`` times the fast-plaid search call alone (``FastPlaid.search``, without
  PyLate's wrapper, which reloads its id-mapping pickles on every call) for every pair, and the wrapper only for
  the pairs of ``--plaid-api-grid`` (PyLate's defaults; the wrapper adds about the same time to every call).
- Voyager: ``pylate.indexes.Voyager`` (HNSW over every token, then exact MaxSim reranking of the documents the
  query tokens reached) built once with ``M`` / ``ef_construction``; searched through ``retrieve.ColBERT`` for
  every (``ef_search``, ``k_token``) pair of ``--voyager-grid``.

Latency: one query at a time, ``--warmup`` queries first, wall time of the call, with the share of CPU time other
processes used meanwhile. Build time: wall time of constructing the index object and ``add_documents``. A built
index stays in ``--work`` with a ``built.json`` recording its settings and build time; a later run with the same
settings reuses it (and reports that build time, marked ``cached``) unless ``--rebuild`` is given. Index bytes: the
files searched (PLAID: the fast-plaid folder without its per-chunk copies of codes and residuals, which its merged
files repeat; Voyager: ``index.voyager``), and everything on disk including PyLate's id-mapping pickles.

Writes one JSON (``--out``), after every configuration: versions, threads, and per configuration the per-query
top-10 document numbers, latencies (ms), build seconds and bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

from common import OtherLoad  # bench/common.py (standard library only): this script's folder is on sys.path


def log(text: str) -> None:
    print(f"[pylate] {text}", file=sys.stderr, flush=True)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plaid_bytes(folder: Path) -> int:
    """What fast-plaid searches: everything but the per-chunk N.codes.npy / N.residuals.npy (merged copies exist)."""

    def chunk(f: Path) -> bool:
        return f.name.split(".")[0].isdigit() and f.name.endswith((".codes.npy", ".residuals.npy"))

    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not chunk(f))


def pairs(spec: str) -> list[tuple[int, int]]:
    """'8:256,16:1024' -> [(8, 256), (16, 1024)]"""
    out = []
    for part in spec.split(","):
        if part.strip():
            a, b = part.split(":")
            out.append((int(a), int(b)))
    return out


def cached_build(folder: Path, settings: dict, rebuild: bool) -> float | None:
    """The recorded build time of the index in ``folder`` if it was built with these settings, else None."""
    record = folder / "built.json"
    if rebuild or not record.is_file():
        return None
    built = json.loads(record.read_text())
    return built["build_s"] if built.get("settings") == settings else None


def record_build(folder: Path, settings: dict, build_s: float, other_load: float) -> None:
    record = {"settings": settings, "build_s": build_s, "build_other_load": other_load, "built_at": time.time()}
    (folder / "built.json").write_text(json.dumps(record) + "\n")


def build_other_load(folder: Path) -> float | None:
    """The share of CPU time other processes used while the index in ``folder`` was built."""
    record = folder / "built.json"
    return json.loads(record.read_text()).get("build_other_load") if record.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=Path, required=True, help="float16 [T, D] document token vectors (.npy)")
    parser.add_argument("--offsets", type=Path, required=True, help="int64 [N+1]: document i is offsets[i]:[i+1]")
    parser.add_argument("--queries", type=Path, required=True, help="float32 [Q, Lq, D] query token vectors (.npy)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the indexes (kept for reuse)")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--systems", default="plaid,voyager")
    parser.add_argument("--plaid-nbits", default="2,4")
    parser.add_argument("--kmeans-niters", type=int, default=4, help="PLAID k-means iterations (PyLate's default 4)")
    parser.add_argument("--plaid-grid", default="8:256,8:1024,16:1024,32:4096,8:8192")
    parser.add_argument("--plaid-engine", action="store_true", help="also time fast-plaid's search call alone")
    parser.add_argument(
        "--plaid-api-grid",
        default="8:8192",
        help="with --plaid-engine, the settings also timed through retrieve.ColBERT (default: PyLate's defaults)",
    )
    parser.add_argument("--voyager-m", type=int, default=16)
    parser.add_argument("--voyager-ef-construction", type=int, default=100)
    parser.add_argument("--voyager-grid", default="32:16,64:32,200:100")
    parser.add_argument("--rebuild", action="store_true", help="build the indexes even when --work has them")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from pylate import indexes, retrieve

    vectors = np.load(args.vectors, mmap_mode="r")
    offsets = np.load(args.offsets)
    queries = np.load(args.queries).astype(np.float32)
    n_docs, dim = len(offsets) - 1, vectors.shape[1]
    n_tokens = int(offsets[-1])
    log(f"{n_docs} documents, {n_tokens} tokens, dim {dim}, {len(queries)} queries of {queries.shape[1]} tokens")
    doc_ids = [str(i) for i in range(n_docs)]
    args.work.mkdir(parents=True, exist_ok=True)
    systems = {s.strip() for s in args.systems.split(",") if s.strip()}
    result: dict = {
        "versions": {p: version(p) for p in ("pylate", "fast-plaid", "torch", "voyager", "numpy")},
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "tokens": n_tokens,
        "runs": [],
    }

    def save() -> None:  # after every configuration, so a crash later keeps what was measured
        args.out.write_text(json.dumps(result))

    def timed_queries(search) -> dict:  # noqa: ANN001
        for i in range(min(args.warmup, len(queries))):
            search(queries[i])
        lat, top = [], []
        with OtherLoad() as load:
            for q in queries:
                t0 = time.perf_counter()
                found = search(q)
                lat.append((time.perf_counter() - t0) * 1000)
                top.append([int(d) for d in found[:10]])
        return {"latency_ms": lat, "top10": top, "other_load": load.share}

    def add(run: dict) -> None:
        result["runs"].append(run)
        log(f"{run['system']} via {run['call']} {run['config']}: p50 {np.median(run['latency_ms']):.1f} ms")
        save()

    if "plaid" in systems:
        docs16 = None
        for nbits in [int(b) for b in args.plaid_nbits.split(",") if b.strip()]:
            name = f"plaid{nbits}"
            settings = {"nbits": nbits, "kmeans_niters": args.kmeans_niters, "tokens": n_tokens, "docs": n_docs}
            build_s = cached_build(args.work / name, settings, args.rebuild)
            cached = build_s is not None
            t0 = time.perf_counter()
            index = indexes.PLAID(
                index_folder=str(args.work),
                index_name=name,
                override=not cached,
                nbits=nbits,
                kmeans_niters=args.kmeans_niters,
                show_progress=False,
                device="cpu",
            )
            if cached:
                log(f"PLAID nbits={nbits}: reusing {args.work / name} (built in {build_s:.0f} s)")
            else:
                if docs16 is None:
                    docs16 = [torch.from_numpy(np.array(vectors[offsets[i] : offsets[i + 1]])) for i in range(n_docs)]
                log(f"PLAID nbits={nbits}: building")
                with OtherLoad() as load:
                    index.add_documents(documents_ids=doc_ids, documents_embeddings=docs16)
                build_s = time.perf_counter() - t0
                record_build(args.work / name, settings, build_s, load.share)
            core = plaid_bytes(args.work / name / "fast_plaid_index")
            base = {
                "build_s": build_s,
                "cached": cached,
                "index_bytes": core,
                "all_bytes": folder_bytes(args.work / name),
                "build_other_load": build_other_load(args.work / name),
            }
            log(f"PLAID nbits={nbits}: {build_s:.1f} s to build, {core / n_tokens:.1f} B/token")
            retriever = retrieve.ColBERT(index=index)
            retriever._show_progress = lambda: False  # no tqdm bar per call (PyLate's hook for it)
            fp = index._index.fast_plaid
            for n_ivf_probe, n_full_scores in pairs(args.plaid_grid):
                index._index.n_ivf_probe = n_ivf_probe  # what PLAID(n_ivf_probe=..., n_full_scores=...) sets
                index._index.n_full_scores = n_full_scores
                config = {"nbits": nbits, "kmeans_niters": args.kmeans_niters, "n_ivf_probe": n_ivf_probe}
                config["n_full_scores"] = n_full_scores

                def api(q, retriever=retriever):  # noqa: ANN001, ANN202
                    return [r["id"] for r in retriever.retrieve(queries_embeddings=[q], k=10)[0]]

                if not args.plaid_engine or (n_ivf_probe, n_full_scores) in pairs(args.plaid_api_grid):
                    run = {"system": "PyLate PLAID", "call": "retrieve.ColBERT.retrieve", "config": config}
                    add(run | base | timed_queries(api))
                if args.plaid_engine:

                    def engine(q, fp=fp, p=n_ivf_probe, s=n_full_scores):  # noqa: ANN001, ANN202
                        hits = fp.search(
                            queries_embeddings=torch.from_numpy(q[None]),
                            top_k=10,
                            n_ivf_probe=p,
                            n_full_scores=s,
                            show_progress=False,
                            n_processes=1,
                        )[0]
                        return [pid for pid, _ in hits]  # plaid ids are the document numbers here (added in order)

                    run = {"system": "PyLate PLAID", "call": "fast_plaid.FastPlaid.search", "config": config}
                    add(run | base | timed_queries(engine))
            del index, retriever, fp
        del docs16

    if "voyager" in systems:
        settings = {"M": args.voyager_m, "ef_construction": args.voyager_ef_construction, "tokens": n_tokens}
        build_s = cached_build(args.work / "voyager", settings, args.rebuild)
        cached = build_s is not None
        t0 = time.perf_counter()
        index = indexes.Voyager(
            index_folder=str(args.work),
            index_name="voyager",
            override=not cached,
            embedding_size=dim,
            M=args.voyager_m,
            ef_construction=args.voyager_ef_construction,
        )
        if cached:
            log(f"Voyager: reusing {args.work / 'voyager'} (built in {build_s:.0f} s)")
        else:
            log(f"Voyager M={args.voyager_m} ef_construction={args.voyager_ef_construction}: building")
            docs32 = [np.asarray(vectors[offsets[i] : offsets[i + 1]], dtype=np.float32) for i in range(n_docs)]
            with OtherLoad() as load:
                index.add_documents(documents_ids=doc_ids, documents_embeddings=docs32)
            build_s = time.perf_counter() - t0
            record_build(args.work / "voyager", settings, build_s, load.share)
            del docs32
        core = (args.work / "voyager" / "index.voyager").stat().st_size
        base = {
            "build_s": build_s,
            "cached": cached,
            "index_bytes": core,
            "all_bytes": folder_bytes(args.work / "voyager"),
            "build_other_load": build_other_load(args.work / "voyager"),
        }
        log(f"Voyager: {build_s:.1f} s to build, {core / n_tokens:.1f} B/token")
        retriever = retrieve.ColBERT(index=index)
        retriever._show_progress = lambda: False
        for ef_search, k_token in pairs(args.voyager_grid):
            index.ef_search = ef_search

            def api(q, k_token=k_token):  # noqa: ANN001, ANN202
                found = retriever.retrieve(queries_embeddings=[q], k=10, k_token=k_token, device="cpu")[0]
                return [r["id"] for r in found]

            config = {
                "M": args.voyager_m,
                "ef_construction": args.voyager_ef_construction,
                "ef_search": ef_search,
                "k_token": k_token,
            }
            add(
                {"system": "PyLate Voyager", "call": "retrieve.ColBERT.retrieve", "config": config}
                | base
                | timed_queries(api)
            )
    save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
