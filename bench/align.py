"""Adapters on a real text upgrade (issue 16, text only): Cranfield retrieval with an OLD model's index searched by a
NEW model's queries projected into OLD's space, against both models natively.

    python bench/align.py [--data DIR] [--refit]

Models: all-minilm-l6-v2 (MiniLM-L6, 384-d transformer) and wordllama-256 (static 256-d token embeddings), prepared
offline into ``DIR/models`` if missing. Adapters: ``xmodal models align`` with its defaults (both tokenizers'
vocabulary words; no Cranfield text is fitted on), reused from ``DIR/models/adapters`` when their fingerprints match,
unless ``--refit``. Collection: ``../shared/data/cranfield`` (1,400 abstracts, title + text; 225 queries; graded
judgements 1-4, gain 5 - grade). Search is exact (cosine over all documents), so only the vectors differ.
Metrics: nDCG@10 with the graded gains, recall@100 of the judged documents.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import table  # noqa: E402  (bench/common.py: this script's folder is on sys.path)

from models.adapter import adapter_dir, load_adapter  # noqa: E402
from models.align import align  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from models.errors import XmodalError  # noqa: E402
from models.registry import WORDLLAMA_MODEL, prepare  # noqa: E402

MINILM = "all-minilm-l6-v2"
CRANFIELD = ROOT.parent / "shared" / "data" / "cranfield"


def read_cranfield(folder: Path) -> tuple[list[str], list[str], dict[int, dict[int, int]]]:
    """(documents: title + abstract, queries, {query number: {doc number: gain}}); numbers start at 1."""

    def records(text: str) -> list[dict[str, str]]:
        out = []
        for chunk in re.split(r"^\.I\s+\d+\s*$", text, flags=re.M)[1:]:
            fields = dict(re.findall(r"^\.([A-Z])\s*$\n(.*?)(?=^\.[A-Z]\s*$|\Z)", chunk, flags=re.M | re.S))
            out.append({k: " ".join(v.split()) for k, v in fields.items()})
        return out

    docs = [f"{r.get('T', '')}. {r.get('W', '')}" for r in records((folder / "cran.all.1400").read_text())]
    queries = [r["W"] for r in records((folder / "cran.qry").read_text())]
    qrels: dict[int, dict[int, int]] = {}
    for line in (folder / "cranqrel").read_text().split("\n"):
        parts = line.split()
        if len(parts) == 3 and 1 <= int(parts[2]) <= 4:
            qrels.setdefault(int(parts[0]), {})[int(parts[1])] = 5 - int(parts[2])
    return docs, queries, qrels


def metrics(scores: np.ndarray, qrels: dict[int, dict[int, int]]) -> dict[str, float]:
    """Mean nDCG@10 (graded) and recall@100 over the judged queries; ``scores`` [queries, docs]."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :100] + 1  # doc numbers
    ndcg, recall = [], []
    discount = 1 / np.log2(np.arange(2, 12))
    for q, judged in qrels.items():
        ranked = top[q - 1]
        gains = np.array([judged.get(int(d), 0) for d in ranked[:10]], dtype=float)
        ideal = np.sort(np.array(list(judged.values()), dtype=float))[::-1][:10]
        ndcg.append(float((gains * discount[: len(gains)]).sum() / (ideal * discount[: len(ideal)]).sum()))
        recall.append(len(set(ranked.tolist()) & set(judged)) / len(judged))
    return {"nDCG@10": float(np.mean(ndcg)), "R@100": float(np.mean(recall))}


def encode(enc: Encoder, texts: list[str]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    vectors = enc.encode_text(texts, batch_size=32)
    return vectors, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data folder (default: a temporary one)")
    parser.add_argument("--refit", action="store_true", help="fit the adapters again even when they exist")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = (args.data or Path(tmp)) / "models"
        for name in (MINILM, WORDLLAMA_MODEL):
            prepare(models, name)
        enc = {name: Encoder(models / name, device="cpu") for name in (MINILM, WORDLLAMA_MODEL)}
        docs, queries, qrels = read_cranfield(CRANFIELD)
        vec, seconds = {}, {}
        for name, e in enc.items():
            vec[name] = {"docs": encode(e, docs), "queries": encode(e, queries)}
            seconds[name] = vec[name]["docs"][1]
        rows = []
        for new, old in ((MINILM, WORDLLAMA_MODEL), (WORDLLAMA_MODEL, MINILM)):
            folder = adapter_dir(models, f"{new}-to-{old}")
            started = time.perf_counter()
            try:
                if args.refit:
                    raise XmodalError("refit")
                adapter = load_adapter(folder, enc[new].fingerprint, enc[old].fingerprint)
                fit_seconds = None
            except XmodalError:
                align(models, new, old)
                fit_seconds = time.perf_counter() - started
                adapter = load_adapter(folder, enc[new].fingerprint, enc[old].fingerprint)
            old_docs, old_q = vec[old]["docs"][0], vec[old]["queries"][0]
            new_docs, new_q = vec[new]["docs"][0], vec[new]["queries"][0]
            cases = [
                (f"OLD {old} native", old_q @ old_docs.T),
                (f"NEW {new} queries projected onto the OLD index", adapter.project(new_q) @ old_docs.T),
                (f"NEW {new} native (after a full re-encode)", new_q @ new_docs.T),
            ]
            for label, scores in cases:
                m = metrics(scores, qrels)
                rows.append([f"{new} -> {old}", label, f"{m['nDCG@10']:.4f}", f"{m['R@100']:.4f}"])
            # The index's own texts are at hand in a real upgrade: fit on a sample of half the documents.
            corpus = models.parent / "cranfield-docs.jsonl"
            corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
            started = time.perf_counter()
            sampled = align(models, new, old, f"{new}-to-{old}-cranfield", corpus, limit=len(docs) // 2)
            sample_seconds = time.perf_counter() - started
            own = load_adapter(adapter_dir(models, sampled.name), enc[new].fingerprint, enc[old].fingerprint)
            m = metrics(own.project(new_q) @ old_docs.T, qrels)
            label = f"NEW queries projected, adapter fitted on {len(docs) // 2} of the index's documents"
            rows.append([f"{new} -> {old}", label, f"{m['nDCG@10']:.4f}", f"{m['R@100']:.4f}"])
            q = adapter.manifest.quality
            fit = f"{fit_seconds:.0f} s" if fit_seconds is not None else "reused"
            note = (
                f"(adapters: vocabulary words, {adapter.manifest.method}, fit {fit}, held-out cos "
                f"{q['heldout_cosine']:.3f}; documents, {sampled.method}, fit {sample_seconds:.0f} s, held-out cos "
                f"{sampled.quality['heldout_cosine']:.3f})"
            )
            rows.append([f"{new} -> {old}", note, "", ""])
        print(f"Cranfield: {len(docs)} documents, {len(queries)} queries, {len(qrels)} judged; exact cosine search\n")
        print(table(["upgrade", "queries / index", "nDCG@10", "R@100"], rows))
        print()
        print(
            table(
                ["model", "encode 1,400 documents (s)", "docs/s"],
                [[n, f"{s:.1f}", f"{len(docs) / s:.0f}"] for n, s in seconds.items()],
            )
        )


if __name__ == "__main__":
    main()
