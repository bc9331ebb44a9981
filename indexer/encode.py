"""The encode stage of a build: corpus items in, a vector (and with late interaction the token vectors) per
(item, modality) out, in checkpointed chunks (indexer.shards): a build killed mid-way and run again encodes only
what was not saved. Media that cannot be decoded are reported, never fatal."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.corpus import MEDIA, CorpusItem
from indexer.segment_writer import RowRecord
from indexer.shards import Shard, ShardStore
from models.encoder import Encoder, TokenOutput
from models.errors import InvalidInput

Progress = Callable[[int, int], None]  # (done, total)
CHUNK_BATCHES = 8  # batches per encoded chunk: the unit of progress and of checkpoints
# How items.sqlite names a media row's file; indexes without it (older builds) cannot show their media.
MEDIA_SOURCES = "absolute-path"


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


def row_source(item: CorpusItem, modality: str) -> str:
    """An image or audio row's file as an absolute path (so the service can show it, whatever its working
    directory); a text row's corpus line."""
    media = getattr(item, modality) if modality in MEDIA else None
    return str(Path(media).resolve()) if media is not None else item.source


def records(rows: list[Row]) -> list[RowRecord]:
    """The encoded rows as the segment writer stores them."""
    return [
        RowRecord(r.item.id, r.modality, row_source(r.item, r.modality), r.item.text, r.item.metadata) for r in rows
    ]
