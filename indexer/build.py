"""Build an index version from a corpus: encode in batches, build FAISS, measure recall, write, publish."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import calibration, faiss_backend
from indexer.corpus import MEDIA, CorpusItem
from indexer.integrity import file_checksums
from indexer.items import write_items
from indexer.late_eval import measure_late
from indexer.layout import DENSE, ITEMS, MANIFEST, TOKENS, IndexDir, IndexManifest, new_version_name
from indexer.shards import Shard, ShardStore, build_key
from indexer.tokens import TokenStore, concat_rows, write_token_store
from models.encoder import Encoder, TokenOutput
from models.errors import InvalidInput
from models.files import atomic_write_json, replace_dir, sha256_file, staging_dir

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (done, total)
RECALL_SAMPLE = 256
MAX_FAILURES_KEPT = 50  # in the manifest; the count is always exact
CHUNK_BATCHES = 8  # batches per encoded chunk: the unit of progress and of checkpoints


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
    tokens: list[np.ndarray] | None = None  # with_tokens: each row's token vectors, float16 [n, D]
    resumed: int = 0  # rows read back from an interrupted build's checkpoints, not encoded


def encode_items(
    encoder: Encoder,
    items: list[CorpusItem],
    batch_size: int,
    progress: Progress | None,
    with_tokens: bool = False,
    checkpoints: ShardStore | None = None,
) -> Encoded:
    """A vector per (item, modality), and with ``with_tokens`` its token vectors too. Media that cannot be
    decoded are reported in ``failures`` and skipped; a corpus with modalities the model has no tower for (or,
    with tokens, whose tower emits none) is refused before any work. With ``checkpoints``, each chunk is saved
    as it is done and read back instead of encoded when an earlier, interrupted build saved it."""
    missing = sorted({m for it in items for m in it.modalities} - set(encoder.modalities))
    if missing:
        raise InvalidInput(f"the corpus has {missing} items but model {encoder.name} only has {encoder.modalities}")
    if with_tokens:
        silent = sorted(
            m for m in {m for it in items for m in it.modalities} if not encoder.manifest.towers[m].emits_tokens
        )
        if silent:
            raise InvalidInput(f"model {encoder.name}'s {silent} tower(s) emit no token vectors: no late index")
    texts = [it for it in items if it.text is not None]
    media = {m: [it for it in items if getattr(it, m) is not None] for m in MEDIA}
    total, done = len(texts) + sum(len(v) for v in media.values()), 0
    rows: list[Row] = []
    parts: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    failures: list[dict] = []
    resumed = 0

    def as_shard(out: np.ndarray | TokenOutput, ok: list[int], failed: list[dict]) -> Shard:
        if isinstance(out, TokenOutput):
            return Shard(np.array(ok), out.embedding, [t.astype(np.float16) for t in out.tokens], failed)
        return Shard(np.array(ok), out, None, failed)

    def keep(modality: str, part: list[CorpusItem], shard: Shard) -> None:
        nonlocal done
        if len(shard.ok):
            parts.append(shard.vectors)
            if shard.tokens is not None:
                tokens.extend(shard.tokens)
            rows.extend(Row(part[i], modality) for i in shard.ok.tolist())
        failures.extend(shard.failures)
        done += len(part)
        if progress:
            progress(done, total)

    def resume(name: str) -> Shard | None:
        nonlocal resumed
        shard = checkpoints.load(name) if checkpoints is not None else None
        if shard is not None:
            resumed += len(shard.ok)
        return shard

    def encoded(name: str, shard: Shard) -> Shard:
        if checkpoints is not None:
            checkpoints.save(name, shard)
        return shard

    # Chunks of several batches: the encoder sorts a text chunk by length, decoded media never pile up in
    # memory, progress moves steadily, and a chunk is the unit of checkpointing.
    chunk = batch_size * CHUNK_BATCHES
    encode_text = encoder.encode_text_tokens if with_tokens else encoder.encode_text
    encode_media = encoder.encode_media_tokens if with_tokens else encoder.encode_media
    for start in range(0, len(texts), chunk):
        part, name = texts[start : start + chunk], f"text-{start:010d}"
        shard = resume(name) or encoded(
            name, as_shard(encode_text([it.text for it in part], batch_size=batch_size), list(range(len(part))), [])
        )
        keep("text", part, shard)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for modality, with_media in media.items():
            for start in range(0, len(with_media), chunk):
                part, name = with_media[start : start + chunk], f"{modality}-{start:010d}"
                shard = resume(name)
                if shard is None:
                    decoded, ok, failed = [], [], []
                    # Decoding (JPEG, resampling) releases the GIL: a thread per core keeps it off the critical path.
                    results = pool.map(lambda it, m=modality: _try_decode(encoder, m, it), part)
                    for i, result in enumerate(results):
                        if isinstance(result, dict):
                            failed.append(result)
                        else:
                            decoded.append(result)
                            ok.append(i)
                    out = encode_media(modality, decoded, batch_size=batch_size) if ok else _empty(encoder, with_tokens)
                    shard = encoded(name, as_shard(out, ok, failed))
                keep(modality, part, shard)
    if not rows:
        raise InvalidInput(f"nothing to index: all {len(items)} items failed ({failures[0]['error']})")
    return Encoded(rows, np.concatenate(parts), failures, tokens if with_tokens else None, resumed)


def _empty(encoder: Encoder, with_tokens: bool) -> np.ndarray | TokenOutput:
    """What encoding no item gives (a chunk whose every file failed to decode)."""
    vectors = np.zeros((0, encoder.dim), dtype=np.float32)
    return TokenOutput(vectors, []) if with_tokens else vectors


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


def item_ordinals(rows: list[Row]) -> np.ndarray:
    """int32 [R]: each row's item as an ordinal (rows of one item share it)."""
    ordinal: dict[str, int] = {}
    return np.array([ordinal.setdefault(r.item.id, len(ordinal)) for r in rows], dtype=np.int32)


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


# How items.sqlite names a media row's file; indexes without it (older builds) cannot show their media.
MEDIA_SOURCES = "absolute-path"


def row_source(item: CorpusItem, modality: str) -> str:
    """An image or audio row's file as an absolute path (so the service can show it, whatever its working
    directory); a text row's corpus line."""
    media = getattr(item, modality) if modality in MEDIA else None
    return str(Path(media).resolve()) if media is not None else item.source


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
    late: LateBuild | None = None,
    keep_versions: int | None = None,
    checkpoint: bool = True,
) -> BuildResult:
    """Encode, build FAISS, measure recall, write a version atomically, publish it. With ``late``, also the
    token store (``tokens/``) for late interaction, with what its storage and fast path cost in recall. With
    ``keep_versions``, older versions beyond that many are removed afterwards (never the published one). With
    ``checkpoint``, encoded chunks are saved as they are done (``indexer.shards``): the same build run again after
    a crash encodes only what was not saved."""
    target = IndexDir(indexes_dir, name)
    t0 = time.perf_counter()
    with_tokens = late is not None
    checkpoints = None
    if checkpoint:
        key = build_key(encoder.fingerprint, items, batch_size * CHUNK_BATCHES, with_tokens)
        checkpoints = ShardStore(target.root, key)
        checkpoints.prune_stale()
    encoded = encode_items(encoder, items, batch_size, progress, with_tokens=with_tokens, checkpoints=checkpoints)
    vectors, rows = encoded.vectors, encoded.rows
    t_encode = time.perf_counter() - t0
    key = faiss_key or faiss_backend.default_key(len(rows))
    index, built_on = faiss_backend.build(vectors, key, use_gpu=use_gpu)
    params = faiss_backend.default_params(key)
    faiss_backend.apply_params(index, params)
    recall = measure_recall(index, vectors)
    ranges = row_ranges(rows)
    counts = {m: end - start for m, (start, end) in ranges.items()}
    t_dense = time.perf_counter() - t0

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
        score_calibration=calibration.fit_dense(vectors, ranges, item_ordinals(rows), RECALL_SAMPLE),
        build={
            "items": len(items),
            "vectors": len(rows),
            "failed": len(encoded.failures),
            "failures": encoded.failures[:MAX_FAILURES_KEPT],
            "encode_seconds": round(t_encode, 3),
            "dense_seconds": round(t_dense - t_encode, 3),
            "items_per_second": round(len(rows) / max(t_encode, 1e-9), 1),
            "resumed_vectors": encoded.resumed,  # read back from an interrupted build's checkpoints
            "encoded_vectors": len(rows) - encoded.resumed,
            "batch_size": batch_size,
            "providers": encoder.providers,
            "corpus": str(corpus_path) if corpus_path else None,
            "corpus_sha256": corpus_digest(corpus_path) if corpus_path else None,
            "media_sources": MEDIA_SOURCES,
        },
        files={
            DENSE: "FAISS index of item vectors (one per item and modality); ids are row numbers",
            ITEMS: "SQLite table items(row, id, modality, source, text, metadata JSON); the source of an image or "
            "audio row is its media file's absolute path, of a text row its corpus line",
            MANIFEST: "this file",
        },
    )
    with staging_dir(target.versions_dir, version) as tmp:
        if late is not None:
            t_late = time.perf_counter()
            manifest.tokens = write_tokens(tmp / TOKENS, encoded, ranges, late)
            manifest.files[TOKENS] = "token store for late interaction: CSR token vectors, centroids, IVF (meta.json)"
            manifest.build["tokens_seconds"] = round(time.perf_counter() - t_late, 3)
        manifest.build["total_seconds"] = round(time.perf_counter() - t0, 3)
        faiss_backend.write(index, tmp / DENSE)
        write_items(
            tmp / ITEMS,
            (
                (
                    i,
                    r.item.id,
                    r.modality,
                    row_source(r.item, r.modality),
                    r.item.text,
                    r.item.metadata,
                )
                for i, r in enumerate(rows)
            ),
        )
        manifest.checksums = file_checksums(tmp)  # last: every file is written
        atomic_write_json(tmp / MANIFEST, manifest.model_dump())
        replace_dir(tmp, target.versions_dir / version)
    if checkpoints is not None:
        checkpoints.remove()  # the version holds it all now
    if publish:
        target.publish(version)
    if keep_versions:
        target.prune(keep_versions)
    return BuildResult(manifest=manifest, path=target.versions_dir / version, published=publish)


@dataclass
class LateBuild:
    """How to store tokens for late interaction (indexer.tokens.write_token_store)."""

    storage: str = "fp16"
    nbits: int = 2
    pool_factor: int = 1


def write_tokens(path: Path, encoded: Encoded, ranges: dict[str, list[int]], late: LateBuild) -> dict:
    """The token store of the encoded rows, then what it costs in recall (indexer.late_eval): the manifest's
    ``tokens`` entry."""
    assert encoded.tokens is not None
    row_item = item_ordinals(encoded.rows)
    vectors, offsets = concat_rows(encoded.tokens, encoded.vectors.shape[1])
    log.info(
        "token store: %d tokens of %d rows (%s, pool factor %d)",
        len(vectors),
        len(offsets) - 1,
        late.storage,
        late.pool_factor,
    )
    meta = write_token_store(
        path, vectors, offsets, row_item, storage=late.storage, nbits=late.nbits, pool_factor=late.pool_factor
    )
    log.info("token store: %s bytes/token; measuring its recall against exhaustive MaxSim", meta["bytes_per_token"])
    quality = measure_late(vectors, offsets, row_item, TokenStore(path), ranges)
    keep = ("storage", "nbits", "dim", "rows", "tokens", "tokens_before_pooling", "pool_factor", "centroids", "bytes")
    return {
        **{key: meta[key] for key in keep if key in meta},
        "bytes_per_token": meta["bytes_per_token"],
        "fp16_bytes_per_token": 2 * encoded.vectors.shape[1],
        **quality,
    }


def corpus_digest(path: Path) -> str:
    """sha256 of a corpus file; for a folder, of its file list with sizes (cheap, and changes when it does)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()
