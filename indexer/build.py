"""Build an index version from a corpus: encode in batches, build FAISS, measure recall, write, publish."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import faiss_backend
from indexer.corpus import CorpusItem
from indexer.items import write_items
from indexer.layout import DENSE, ITEMS, MANIFEST, IndexDir, IndexManifest, new_version_name
from models.encoder import Encoder
from models.files import atomic_write_json, replace_dir, sha256_file, staging_dir

Progress = Callable[[int, int], None]  # (done, total)
RECALL_SAMPLE = 256


@dataclass
class BuildResult:
    manifest: IndexManifest
    path: Path
    published: bool


def encode_items(encoder: Encoder, items: list[CorpusItem], batch_size: int, progress: Progress | None) -> np.ndarray:
    out = np.empty((len(items), encoder.dim), dtype=np.float32)
    # Chunks of several batches: the encoder sorts each chunk by length, and progress moves steadily.
    chunk = batch_size * 8
    for start in range(0, len(items), chunk):
        texts = [it.text for it in items[start : start + chunk]]
        out[start : start + len(texts)] = encoder.encode_text(texts, batch_size=batch_size)
        if progress:
            progress(start + len(texts), len(items))
    return out


def exact_topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors.T
    k = min(k, vectors.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def measure_recall(index, vectors: np.ndarray, k: int = 10, seed: int = 0) -> dict:
    """recall@k of ``index`` against exact inner-product search, with a sample of the items as queries."""
    rng = np.random.default_rng(seed)
    n = vectors.shape[0]
    sample = rng.choice(n, size=min(RECALL_SAMPLE, n), replace=False)
    queries = vectors[sample]
    k = min(k, n)
    truth = exact_topk(queries, vectors, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found, strict=True))
    return {"value": hits / (len(sample) * k), "k": k, "sample": int(len(sample))}


def score_stats(index, vectors: np.ndarray, seed: int = 1) -> dict:
    """Mean and spread of top-10 neighbour scores: the scale of this modality's scores, for calibration."""
    rng = np.random.default_rng(seed)
    sample = rng.choice(vectors.shape[0], size=min(RECALL_SAMPLE, vectors.shape[0]), replace=False)
    scores, _ = index.search(vectors[sample], min(11, vectors.shape[0]))
    s = scores[:, 1:] if scores.shape[1] > 1 else scores  # drop the item itself
    return {"mean": float(s.mean()), "std": float(s.std()), "sample": int(len(sample))}


def build_index(
    *,
    indexes_dir: Path,
    name: str,
    items: list[CorpusItem],
    encoder: Encoder,
    corpus_path: Path | None = None,
    faiss_key: str | None = None,
    batch_size: int = 32,
    publish: bool = True,
    use_gpu: bool = True,
    progress: Progress | None = None,
) -> BuildResult:
    target = IndexDir(indexes_dir, name)
    t0 = time.perf_counter()
    vectors = encode_items(encoder, items, batch_size, progress)
    t_encode = time.perf_counter() - t0
    key = faiss_key or faiss_backend.default_key(len(items))
    index, built_on = faiss_backend.build(vectors, key, use_gpu=use_gpu)
    params = faiss_backend.default_params(key)
    faiss_backend.apply_params(index, params)
    recall = measure_recall(index, vectors)
    stats = score_stats(index, vectors)
    t_total = time.perf_counter() - t0

    version = new_version_name()
    manifest = IndexManifest(
        name=name,
        version=version,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model={"name": encoder.name, "fingerprint": encoder.fingerprint, "dim": encoder.dim},
        dim=encoder.dim,
        faiss={"key": key, "metric": "inner_product", "params": params, "built_on": built_on},
        counts={"text": len(items)},
        recall_at_10=recall,
        calibration={"text": stats},
        build={
            "items": len(items),
            "encode_seconds": round(t_encode, 3),
            "total_seconds": round(t_total, 3),
            "items_per_second": round(len(items) / max(t_encode, 1e-9), 1),
            "batch_size": batch_size,
            "providers": encoder.providers,
            "corpus": str(corpus_path) if corpus_path else None,
            "corpus_sha256": sha256_file(corpus_path) if corpus_path else None,
        },
        files={
            DENSE: "FAISS index of item vectors; ids are row numbers",
            ITEMS: "SQLite table items(row, id, modality, source, text, metadata JSON)",
            MANIFEST: "this file",
        },
    )
    with staging_dir(target.versions_dir, version) as tmp:
        faiss_backend.write(index, tmp / DENSE)
        write_items(
            tmp / ITEMS,
            ((row, it.id, "text", it.source, it.text, it.metadata) for row, it in enumerate(items)),
        )
        atomic_write_json(tmp / MANIFEST, manifest.model_dump())
        replace_dir(tmp, target.versions_dir / version)
    if publish:
        target.publish(version)
    return BuildResult(manifest=manifest, path=target.versions_dir / version, published=publish)
