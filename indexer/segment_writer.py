"""The segment writer: encoded rows in, one immutable segment folder out (``segments/<id>/``): the items store,
one FAISS index per modality, the token store for late interaction, the calibration fits and the recall they
were measured at, a sha256 per file. A full build, an add and a compaction all write their rows this way."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer import calibration, dense_build, gpu, index_choice, tuning
from indexer.integrity import file_checksums
from indexer.items import write_items
from indexer.late.evaluate import measure_late
from indexer.late.kernels import concat_rows
from indexer.late.store import STORAGES, TokenStore, write_token_store
from indexer.layout import ITEMS, MANIFEST, TOKENS, FaissInfo, ModelRef, SegmentManifest, now_iso
from indexer.vector_source import VectorSource
from models.errors import InvalidInput
from models.files import atomic_write_json

log = logging.getLogger(__name__)
CALIBRATION_SAMPLE = 256  # queries of the calibration statistics and fits


@dataclass
class RowRecord:
    """One row of a segment: an item seen through one modality. ``source``: an image or audio row's media file
    (an absolute path), a text row's corpus line."""

    id: str
    modality: str
    source: str
    text: str | None
    metadata: dict


@dataclass
class LateBuild:
    """How to store tokens for late interaction (indexer.late.store.write_token_store)."""

    storage: str = "fp16"
    nbits: int = 2
    pool_factor: int = 1

    @classmethod
    def from_options(cls, late: bool, storage: str, nbits: int, pool_factor: int) -> LateBuild | None:
        """What `index build --late --token-storage S --nbits N --pool-factor P` asks for, checked."""
        if storage not in STORAGES:
            raise InvalidInput(f"token storage must be one of {list(STORAGES)}, not {storage!r}")
        if not late:
            if storage != "fp16" or pool_factor != 1:
                raise InvalidInput("--token-storage and --pool-factor shape the token store: add --late")
            return None
        return cls(storage=storage, nbits=nbits, pool_factor=pool_factor)


def row_ranges(modalities: list[str]) -> dict[str, list[int]]:
    """[start, end) of each modality's rows, which must be contiguous (a modality's FAISS index holds them in
    order, so FAISS id i of modality m is row start_m + i)."""
    ranges: dict[str, list[int]] = {}
    for i, modality in enumerate(modalities):
        if modality not in ranges:
            ranges[modality] = [i, i + 1]
        elif ranges[modality][1] == i:
            ranges[modality][1] = i + 1
        else:
            raise AssertionError(f"{modality} rows are not contiguous")
    return ranges


def item_ordinals(ids: list[str]) -> np.ndarray:
    """int32 [R]: each row's item as an ordinal (rows of one item share it)."""
    ordinal: dict[str, int] = {}
    return np.array([ordinal.setdefault(i, len(ordinal)) for i in ids], dtype=np.int32)


def calibration_stats(vectors: np.ndarray, ranges: dict[str, list[int]], seed: int = 1) -> dict:
    """Mean and spread of the top-10 scores that queries of modality q get among items of modality t, for
    every pair (``"q->t"``), with a sample of the segment's own vectors of modality q as queries. Scores of
    different modalities are not on one scale (the modality gap); search z-normalises with these when one
    result list mixes target modalities."""
    rng = np.random.default_rng(seed)
    stats = {}
    for q, (qs, qe) in ranges.items():
        sample = qs + rng.choice(qe - qs, size=min(CALIBRATION_SAMPLE, qe - qs), replace=False)
        for t, (ts, te) in ranges.items():
            scores = vectors[sample] @ vectors[ts:te].T
            k = min(11 if q == t else 10, te - ts)
            top = -np.sort(-scores, axis=1)[:, :k]
            if q == t and top.shape[1] > 1:
                top = top[:, 1:]  # the query itself
            stats[f"{q}->{t}"] = {"mean": float(top.mean()), "std": float(top.std()), "sample": int(len(sample))}
    return stats


def write_segment(
    folder: Path,
    *,
    index: str,
    segment: str,
    records: list[RowRecord],
    vectors: np.ndarray,
    tokens: list[np.ndarray] | None,
    model: ModelRef,
    faiss_key: str | None = None,
    use_gpu: bool = True,
    late: LateBuild | None = None,
    build: dict | None = None,
    recall_target: float = tuning.RECALL_TARGET,
    memory_budget: int | None = None,
    exact_up_to: int = index_choice.EXACT_UP_TO,
    truth_over: str = "the original float vectors",
) -> SegmentManifest:
    """Write segment ``segment`` of ``index`` into ``folder`` (a staging folder: the caller renames it); rows
    grouped by modality, ``vectors`` [R, D] in row order, with ``late`` each row's token vectors too. An approximate
    FAISS index gets the cheapest search parameters that reach ``recall_target`` (indexer.tuning), then its recall is
    measured on a held-out sample whose exact answers the segment keeps (indexer.heldout; ``truth_over``: what they
    were computed over). Without ``faiss_key``, the index type is chosen from the largest modality's row count, the
    dimension and ``memory_budget`` (bytes, None: no limit; ``exact_up_to``: Flat up to that many rows) by
    indexer.index_choice, on disk (indexer.ondisk) when it says so; IndexTooLarge (InvalidInput) when nothing fits."""
    t0 = time.perf_counter()
    ranges = row_ranges([r.modality for r in records])
    largest = max(e - s for s, e in ranges.values())
    if faiss_key:
        choice = {"key": faiss_key, "reason": "given by the user", "n": largest, "dim": int(vectors.shape[1])}
    else:
        choice = index_choice.choose_index(largest, int(vectors.shape[1]), memory_budget, exact_up_to).record()
    key, on_disk = choice["key"], bool(choice.get("ondisk"))
    log.info("FAISS index %s: %s", key, choice["reason"])
    t_faiss = time.perf_counter()
    built: dict[str, dense_build.Built] = {}
    for modality, (start, end) in ranges.items():
        source = VectorSource.of_array(vectors[start:end])
        built[modality] = dense_build.build(folder, modality, source, key, on_disk, use_gpu=use_gpu)
    choice["build_seconds"] = round(time.perf_counter() - t_faiss, 3)
    t_tune = time.perf_counter()
    params, recall, files = dense_build.tune_and_write(folder, built, key, recall_target, truth_over)
    choice["tune_seconds"] = round(time.perf_counter() - t_tune, 3)
    if not recall.get("reached", True):
        log.warning("FAISS %s reaches recall@10 %.3f only, short of %.2f", key, recall["value"], recall_target)
    row_item = item_ordinals([r.id for r in records])
    manifest = SegmentManifest(
        index=index,
        id=segment,
        created_at=now_iso(),
        model=model,
        dim=model.dim,
        faiss=FaissInfo(
            key=key,
            params=params,
            built_on=gpu.summary([b.placement.device for b in built.values()]),
            placement={m: b.placement.record() for m, b in built.items()},
            choice=choice,
            ondisk=on_disk,
        ),
        counts={m: e - s for m, (s, e) in ranges.items()},
        rows=ranges,
        recall_at_10=recall,
        calibration=calibration_stats(vectors, ranges),
        score_calibration=calibration.fit_dense(vectors, ranges, row_item, CALIBRATION_SAMPLE),
        build=dict(build or {}),
        files=files,
        checksums={},
    )
    manifest.build["dense_seconds"] = round(time.perf_counter() - t0, 3)
    if late is not None:
        assert tokens is not None
        t_late = time.perf_counter()
        manifest.tokens = write_tokens(folder / TOKENS, vectors, tokens, row_item, ranges, late)
        manifest.files[TOKENS] = "token store for late interaction: CSR token vectors, centroids, IVF (meta.json)"
        manifest.build["tokens_seconds"] = round(time.perf_counter() - t_late, 3)
    write_items(folder / ITEMS, ((i, r.id, r.modality, r.source, r.text, r.metadata) for i, r in enumerate(records)))
    manifest.files[ITEMS] = (
        "SQLite table items(row, id, modality, source, text, metadata JSON); the source of an image or audio row is "
        "its media file's absolute path, of a text row its corpus line"
    )
    manifest.files[MANIFEST] = "this file"
    manifest.checksums = file_checksums(folder)  # last: every file is written
    atomic_write_json(folder / MANIFEST, manifest.model_dump())
    return manifest


def write_tokens(
    path: Path,
    vectors: np.ndarray,
    token_rows: list[np.ndarray],
    row_item: np.ndarray,
    ranges: dict[str, list[int]],
    late: LateBuild,
) -> dict:
    """The token store of the rows, then what it costs in recall (indexer.late.evaluate): the manifest's ``tokens``."""
    flat, offsets = concat_rows(token_rows, vectors.shape[1])
    log.info(
        "token store: %d tokens of %d rows (%s, pool factor %d)",
        len(flat),
        len(offsets) - 1,
        late.storage,
        late.pool_factor,
    )
    meta = write_token_store(
        path, flat, offsets, row_item, storage=late.storage, nbits=late.nbits, pool_factor=late.pool_factor
    )
    log.info("token store: %s bytes/token; measuring its recall against exhaustive MaxSim", meta["bytes_per_token"])
    quality = measure_late(flat, offsets, row_item, TokenStore(path), ranges)
    keep = ("storage", "nbits", "dim", "rows", "tokens", "tokens_before_pooling", "pool_factor", "centroids", "bytes")
    return {
        **{key: meta[key] for key in keep if key in meta},
        "bytes_per_token": meta["bytes_per_token"],
        "fp16_bytes_per_token": 2 * vectors.shape[1],
        **quality,
    }
