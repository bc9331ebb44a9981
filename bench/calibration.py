"""Scores comparable across modalities (issue 18): each calibration of indexer.calibration side by side, dense and
late, on the demo index (xmodal-mini) and on spoken digits (FSDD), through the real index (LoadedIndex: FAISS,
the token store, the fits written in the manifest at build time).

Usage:
    python bench/calibration.py [--scenes 1500] [--sounds 1500] [--queries 60] [--fsdd-epochs 8] [--no-fsdd]

1. The demo index: ``indexer.demo.write_media_demo`` (pictures with a caption, sounds with a caption), built with
   ``--late`` by ``indexer.build.build_index``. Queries: ``--queries`` pictures, sounds and captions of its own
   items, re-encoded from their files (an exact duplicate of each query is in the index). Relevant: the items
   that share the query's item or its composition label (``shows`` / ``sounds``).
2. FSDD: an audio tower trained on five speakers (``bench/mini.py``'s ``train_fsdd_bundle``), an index of the
   sixth speaker's clips, each an item with one caption ("the digit seven", ...). Queries: its clips and their
   captions. Relevant: the items of the same digit. Skipped when ``../shared/data/fsdd`` is absent.

For every query modality: nDCG@10 of the search restricted to one target modality (each), and of the search over
all target modalities with each ``calibration``; ``dup@1``: the share of queries whose first result is an exact
duplicate of the query (its own item, or a row of the query's modality with cosine >= 0.9999). ``zscore, no
rule`` is the behaviour before issue 18 (z-scores, no duplicate rule). ``mixed`` averages the query modalities.
Prints markdown tables (progress on stderr). About 10 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import table  # noqa: E402  (bench/common.py: this script's folder is on sys.path)
from mini import FSDD, add_shared_arguments, load_fsdd, log, train_fsdd_bundle  # noqa: E402  (bench/mini.py)

from indexer.build import LateBuild, build_index  # noqa: E402
from indexer.calibration import METHODS  # noqa: E402
from indexer.corpus import CorpusItem, read_corpus  # noqa: E402
from indexer.demo import write_media_demo  # noqa: E402
from indexer.search import LateRequest, LoadedIndex  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.mini.prepare import MINI_MODEL  # noqa: E402
from models.registry import prepare  # noqa: E402

K = 10
EXACT = 1 - 1e-4
VARIANTS = [(m, True) for m in METHODS] + [("zscore", False)]


def variant_name(method: str, rule: bool) -> str:
    return method if rule else f"{method}, no rule"


@dataclass
class Query:
    modality: str
    item: str
    label: str
    vector: np.ndarray
    tokens: np.ndarray


def encode_queries(enc: Encoder, picks: list[tuple[str, CorpusItem]], labels: dict[str, str]) -> list[Query]:
    """Each (modality, item) query encoded from the item's own file or caption, as a service query would be."""
    out = []
    for modality in ("image", "audio", "text"):
        chosen = [it for m, it in picks if m == modality]
        if not chosen:
            continue
        if modality == "text":
            enc_out = enc.encode_text_tokens([it.text for it in chosen])
        else:
            enc_out = enc.encode_media_tokens(modality, [enc.decode(modality, getattr(it, modality)) for it in chosen])
        for it, v, t in zip(chosen, enc_out.embedding, enc_out.tokens, strict=True):
            out.append(Query(modality, it.id, labels[it.id], v, t))
    return out


def ndcg(ids: list[str], labels: dict[str, str], label: str, n_relevant: int) -> float:
    gains = [1.0 if labels[i] == label else 0.0 for i in ids[:K]]
    dcg = sum(g / np.log2(r + 2) for r, g in enumerate(gains))
    ideal = sum(1 / np.log2(r + 2) for r in range(min(K, n_relevant)))
    return dcg / ideal if ideal else 0.0


def duplicate_first(hits, q: Query) -> bool:  # noqa: ANN001
    if not hits:
        return False
    top = hits[0]
    return top.id == q.item or (top.modality == q.modality and top.similarity >= EXACT)


def evaluate(index: LoadedIndex, queries: list[Query], labels: dict[str, str], mode: str) -> dict:
    """{query modality: {column: (mean nDCG@10, dup@1 share)}}: one target modality at a time, then each variant."""
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    out: dict[str, dict[str, list[tuple[float, bool]]]] = {}

    def run(q: Query, modalities: list[str] | None, method: str | None, rule: bool):  # noqa: ANN202
        common = {"modalities": modalities, "query_modality": q.modality, "calibration": method}
        if mode == "late":
            return index.search_late(LateRequest(q.tokens, q.vector), K, duplicates_first=rule, **common)
        return index.search(q.vector, K, duplicates_first=rule, **common)

    for q in queries:
        row = out.setdefault(q.modality, {})
        for t in index.modalities:
            hits = run(q, [t], None, True)
            row.setdefault(f"only {t}", []).append(
                (ndcg([h.id for h in hits], labels, q.label, counts[q.label]), False)
            )
        for method, rule in VARIANTS:
            hits = run(q, None, method, rule)
            score = ndcg([h.id for h in hits], labels, q.label, counts[q.label])
            row.setdefault(variant_name(method, rule), []).append((score, duplicate_first(hits, q)))
    return {
        m: {col: (float(np.mean([s for s, _ in v])), float(np.mean([d for _, d in v]))) for col, v in cols.items()}
        for m, cols in out.items()
    }


def report(title: str, results: dict[str, dict], modalities: list[str], n: dict[str, int]) -> str:
    """Two markdown tables per mode: nDCG@10, and dup@1 of the mixed searches."""
    lines = []
    for mode, res in results.items():
        variants = [variant_name(m, r) for m, r in VARIANTS]
        singles = [f"only {t}" for t in modalities]
        rows = []
        for qm in sorted(res):
            cols = res[qm]
            best = max(singles, key=lambda c: cols[c][0])
            rows.append(
                [f"{qm} ({n[qm]})"]
                + [f"{cols[c][0]:.3f}" for c in singles]
                + [f"{cols[best][0]:.3f}"]
                + [f"{cols[v][0]:.3f}" for v in variants]
            )
        mixed = [float(np.mean([res[qm][v][0] for qm in res])) for v in variants]
        best_single = float(np.mean([max(res[qm][c][0] for c in singles) for qm in res]))
        rows.append(["mixed (mean)"] + ["" for _ in singles] + [f"{best_single:.3f}"] + [f"{v:.3f}" for v in mixed])
        lines += [f"### {title}, {mode}: nDCG@10", "", table(["query", *singles, "best single", *variants], rows), ""]
        dup_rows = [[f"{qm} ({n[qm]})"] + [f"{100 * res[qm][v][1]:.0f}%" for v in variants] for qm in sorted(res)]
        lines += [f"### {title}, {mode}: exact duplicate first (dup@1)", "", table(["query", *variants], dup_rows), ""]
    return "\n".join(lines)


def bench_index(title: str, data: Path, name: str, queries: list[Query], labels: dict[str, str]) -> str:
    index = LoadedIndex(data, name, use_gpu=False)
    results = {}
    for mode in ("dense", "late"):
        started = time.perf_counter()
        results[mode] = evaluate(index, queries, labels, mode)
        log(f"{title} {mode}: {len(queries)} queries in {time.perf_counter() - started:.1f} s")
    n = {m: sum(q.modality == m for q in queries) for m in {q.modality for q in queries}}
    return report(title, results, index.modalities, n)


def demo(enc: Encoder, work: Path, scenes: int, sounds: int, n_queries: int, seed: int) -> str:
    corpus = write_media_demo(work / "demo", n_scenes=scenes, n_sounds=sounds)
    items = read_corpus(corpus)
    started = time.perf_counter()
    build_index(indexes_dir=work / "indexes", name="demo", items=items, encoder=enc, use_gpu=False, late=LateBuild())
    log(f"demo index: {len(items)} items built in {time.perf_counter() - started:.1f} s")
    labels = {it.id: f"{it.metadata['kind']}:{it.metadata.get('shows') or it.metadata.get('sounds')}" for it in items}
    rng = np.random.default_rng(seed)
    by_kind = {m: [it for it in items if getattr(it, m) is not None] for m in ("image", "audio", "text")}
    picks = [
        (m, by_kind[m][i])
        for m in ("image", "audio", "text")
        for i in rng.choice(len(by_kind[m]), size=min(n_queries, len(by_kind[m])), replace=False)
    ]
    return bench_index(
        f"Demo index ({scenes} pictures, {sounds} sounds)",
        work / "indexes",
        "demo",
        queries_of(enc, picks, labels),
        labels,
    )


def queries_of(enc: Encoder, picks: list[tuple[str, CorpusItem]], labels: dict[str, str]) -> list[Query]:
    started = time.perf_counter()
    out = encode_queries(enc, picks, labels)
    log(f"{len(out)} queries encoded in {time.perf_counter() - started:.1f} s")
    return out


def fsdd(enc: Encoder, work: Path, holdout: str, epochs: int, n_queries: int, seed: int) -> str:
    digits = load_fsdd(holdout)
    digits_enc, info = train_fsdd_bundle(enc, digits, epochs, 0, work)
    log(f"fsdd: trained in {info['train_seconds']} s, loss {info['loss'][0]:.3f} -> {info['loss'][1]:.3f}")
    n = len(digits.captions[0])
    items = [
        CorpusItem(
            id=digits.files[i].stem,
            text=digits.captions[i][j % n],
            audio=digits.files[i],
            metadata={"digit": int(digits.digit[i])},
        )
        for j, i in enumerate(digits.test_idx)
    ]
    build_index(
        indexes_dir=work / "indexes", name="fsdd", items=items, encoder=digits_enc, use_gpu=False, late=LateBuild()
    )
    labels = {it.id: str(it.metadata["digit"]) for it in items}
    rng = np.random.default_rng(seed)
    picks = [
        (m, items[i])
        for m in ("audio", "text")
        for i in rng.choice(len(items), size=min(n_queries, len(items)), replace=False)
    ]
    title = f"FSDD, speaker {holdout} ({len(items)} clips with captions; tower trained on the other 5)"
    return bench_index(title, work / "indexes", "fsdd", queries_of(digits_enc, picks, labels), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=1500, help="pictures in the demo index")
    parser.add_argument("--sounds", type=int, default=1500, help="sounds in the demo index")
    parser.add_argument("--queries", type=int, default=60, help="queries per query modality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fsdd", action="store_true", help="skip the spoken digits")
    add_shared_arguments(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models_dir = args.models_dir or work / "models"
        manifest, _ = prepare(models_dir, MINI_MODEL)
        enc = Encoder(models_dir / MINI_MODEL, device="cpu")
        log(f"{MINI_MODEL} {manifest.fingerprint[:12]}")
        print(demo(enc, work, args.scenes, args.sounds, args.queries, args.seed))
        if not args.no_fsdd:
            if FSDD.is_dir():
                (work / "fsdd").mkdir()
                print(fsdd(enc, work / "fsdd", args.holdout, args.fsdd_epochs, args.queries, args.seed))
            else:
                log(f"skipping FSDD: no spoken digits at {FSDD}")
    print(f"total: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
