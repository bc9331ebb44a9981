"""Build an index version from a corpus: encode in batches, build FAISS, measure recall, write, publish."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import faiss_backend
from indexer.corpus import MEDIA, CorpusItem
from indexer.items import write_items
from indexer.layout import DENSE, ITEMS, MANIFEST, IndexDir, IndexManifest, new_version_name
from models.encoder import Encoder
from models.errors import InvalidInput
from models.files import atomic_write_json, replace_dir, sha256_file, staging_dir

Progress = Callable[[int, int], None]  # (done, total)
RECALL_SAMPLE = 256
MAX_FAILURES_KEPT = 50  # in the manifest; the count is always exact


@dataclass
class BuildResult:
    manifest: IndexManifest
    path: Path
    published: bool


@dataclass
class Row:
    """One vector of the index: an item seen through one modality."""

    item: CorpusItem
    modality: str


@dataclass
class Encoded:
    rows: list[Row]
    vectors: np.ndarray
    failures: list[dict]


def encode_items(encoder: Encoder, items: list[CorpusItem], batch_size: int, progress: Progress | None) -> Encoded:
    """A vector per (item, modality). Media that cannot be decoded are reported in ``failures`` and skipped;
    a corpus with modalities the model has no tower for is refused before any work."""
    missing = sorted({m for it in items for m in it.modalities} - set(encoder.modalities))
    if missing:
        raise InvalidInput(f"the corpus has {missing} items but model {encoder.name} only has {encoder.modalities}")
    texts = [it for it in items if it.text is not None]
    media = {m: [it for it in items if getattr(it, m) is not None] for m in MEDIA}
    total, done = len(texts) + sum(len(v) for v in media.values()), 0
    rows: list[Row] = []
    parts: list[np.ndarray] = []
    failures: list[dict] = []
    # Chunks of several batches: the encoder sorts a text chunk by length, decoded media never pile up in
    # memory, and progress moves steadily.
    chunk = batch_size * 8
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        parts.append(encoder.encode_text([it.text for it in part], batch_size=batch_size))
        rows += [Row(it, "text") for it in part]
        done += len(part)
        if progress:
            progress(done, total)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for modality, with_media in media.items():
            for start in range(0, len(with_media), chunk):
                part = with_media[start : start + chunk]
                decoded, ok = [], []
                # Decoding (JPEG, resampling) releases the GIL: a thread per core keeps it off the critical path.
                for it, result in zip(
                    part, pool.map(lambda it, m=modality: _try_decode(encoder, m, it), part), strict=True
                ):
                    if isinstance(result, dict):
                        failures.append(result)
                    else:
                        decoded.append(result)
                        ok.append(it)
                if ok:
                    parts.append(encoder.encode_media(modality, decoded, batch_size=batch_size))
                    rows += [Row(it, modality) for it in ok]
                done += len(part)
                if progress:
                    progress(done, total)
    if not rows:
        raise InvalidInput(f"nothing to index: all {len(items)} items failed ({failures[0]['error']})")
    return Encoded(rows, np.concatenate(parts), failures)


def _try_decode(encoder: Encoder, modality: str, item: CorpusItem) -> object:
    """The decoded media, or a failure record: a file that cannot be used is reported, never fatal."""
    path = getattr(item, modality)
    try:
        return encoder.decode(modality, path)
    except (InvalidInput, OSError) as exc:
        error = getattr(exc, "message", str(exc))
        return {"id": item.id, "modality": modality, "source": str(path), "error": error}


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


def row_ranges(rows: list[Row]) -> dict[str, list[int]]:
    """[start, end) of each modality's rows; encode_items writes each modality's rows contiguously, so a
    search restricted to one modality is a FAISS ID range, not a post-filter."""
    ranges: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.modality not in ranges:
            ranges[row.modality] = [i, i + 1]
        elif ranges[row.modality][1] == i:
            ranges[row.modality][1] = i + 1
        else:
            raise AssertionError(f"{row.modality} rows are not contiguous")
    return ranges


def calibration_stats(vectors: np.ndarray, ranges: dict[str, list[int]], seed: int = 1) -> dict:
    """Mean and spread of the top-10 scores that queries of modality q get among items of modality t, for
    every pair (``"q->t"``), with a sample of the index's own vectors of modality q as queries. Scores of
    different modalities are not on one scale (the modality gap); search z-normalises with these when one
    result list mixes target modalities."""
    rng = np.random.default_rng(seed)
    stats = {}
    for q, (qs, qe) in ranges.items():
        sample = qs + rng.choice(qe - qs, size=min(RECALL_SAMPLE, qe - qs), replace=False)
        for t, (ts, te) in ranges.items():
            scores = vectors[sample] @ vectors[ts:te].T
            k = min(11 if q == t else 10, te - ts)
            top = -np.sort(-scores, axis=1)[:, :k]
            if q == t and top.shape[1] > 1:
                top = top[:, 1:]  # the query itself
            stats[f"{q}->{t}"] = {"mean": float(top.mean()), "std": float(top.std()), "sample": int(len(sample))}
    return stats


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
    encoded = encode_items(encoder, items, batch_size, progress)
    vectors, rows = encoded.vectors, encoded.rows
    t_encode = time.perf_counter() - t0
    key = faiss_key or faiss_backend.default_key(len(rows))
    index, built_on = faiss_backend.build(vectors, key, use_gpu=use_gpu)
    params = faiss_backend.default_params(key)
    faiss_backend.apply_params(index, params)
    recall = measure_recall(index, vectors)
    ranges = row_ranges(rows)
    counts = {m: end - start for m, (start, end) in ranges.items()}
    t_total = time.perf_counter() - t0

    version = new_version_name()
    manifest = IndexManifest(
        name=name,
        version=version,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model={"name": encoder.name, "fingerprint": encoder.fingerprint, "dim": encoder.dim},
        dim=encoder.dim,
        faiss={"key": key, "metric": "inner_product", "params": params, "built_on": built_on},
        counts=counts,
        recall_at_10=recall,
        rows=ranges,
        calibration=calibration_stats(vectors, ranges),
        build={
            "items": len(items),
            "vectors": len(rows),
            "failed": len(encoded.failures),
            "failures": encoded.failures[:MAX_FAILURES_KEPT],
            "encode_seconds": round(t_encode, 3),
            "total_seconds": round(t_total, 3),
            "items_per_second": round(len(rows) / max(t_encode, 1e-9), 1),
            "batch_size": batch_size,
            "providers": encoder.providers,
            "corpus": str(corpus_path) if corpus_path else None,
            "corpus_sha256": corpus_digest(corpus_path) if corpus_path else None,
        },
        files={
            DENSE: "FAISS index of item vectors (one per item and modality); ids are row numbers",
            ITEMS: "SQLite table items(row, id, modality, source, text, metadata JSON)",
            MANIFEST: "this file",
        },
    )
    with staging_dir(target.versions_dir, version) as tmp:
        faiss_backend.write(index, tmp / DENSE)
        write_items(
            tmp / ITEMS,
            (
                (
                    i,
                    r.item.id,
                    r.modality,
                    str(r.item.image) if r.modality == "image" else r.item.source,
                    r.item.text,
                    r.item.metadata,
                )
                for i, r in enumerate(rows)
            ),
        )
        atomic_write_json(tmp / MANIFEST, manifest.model_dump())
        replace_dir(tmp, target.versions_dir / version)
    if publish:
        target.publish(version)
    return BuildResult(manifest=manifest, path=target.versions_dir / version, published=publish)


def corpus_digest(path: Path) -> str:
    """sha256 of a corpus file; for a folder, of its file list with sizes (cheap, and changes when it does)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()
