"""The encode stage of a build: corpus items in, a vector (and with late interaction the token vectors) per
(item, modality) out, in checkpointed chunks (indexer.shards): a build killed mid-way and run again encodes only
what was not saved. Media that cannot be decoded are reported, never fatal."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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


@dataclass(frozen=True)
class Chunk:
    """Consecutive items of one modality, encoded together: the unit of checkpoints, of progress and of the work
    an engine hands out. Its name is its checkpoint's."""

    name: str
    modality: str
    items: list[CorpusItem]


class Engine(Protocol):
    """What encodes the chunks a build did not read back from its checkpoints: ``LocalEngine`` in this process,
    ``indexer.ray_engine.RayEngine`` over Ray Data. Either calls ``encode_chunk`` on each chunk, so the vectors
    do not depend on the engine."""

    def encode(
        self, encoder: Encoder, chunks: list[Chunk], batch_size: int, with_tokens: bool
    ) -> Iterator[tuple[Chunk, Shard]]:
        """Each chunk with its shard, as it is done, in any order."""
        ...

    def describe(self) -> dict:
        """What ran the encoding, for the build's manifest."""
        ...


def plan_chunks(items: list[CorpusItem], batch_size: int) -> list[Chunk]:
    """Every (item, modality) in chunks of ``batch_size * CHUNK_BATCHES``: texts first, then each medium. The plan
    depends only on the items and the batch size, so any engine (and a resumed build) cuts the same chunks."""
    size = batch_size * CHUNK_BATCHES
    chunks = []
    for modality in ("text", *MEDIA):
        part = [it for it in items if getattr(it, modality) is not None]
        chunks += [Chunk(f"{modality}-{i:010d}", modality, part[i : i + size]) for i in range(0, len(part), size)]
    return chunks


def encode_items(
    encoder: Encoder,
    items: list[CorpusItem],
    batch_size: int,
    progress: Progress | None,
    *,
    with_tokens: bool = False,
    checkpoints: ShardStore | None = None,
    engine: Engine | None = None,
) -> Encoded:
    """A vector per (item, modality), and with ``with_tokens`` its token vectors too. Media that cannot be
    decoded are reported in ``failures`` and skipped; a corpus with modalities the model has no tower for (or,
    with tokens, whose tower emits none) is refused before any work. With ``checkpoints``, each chunk is saved
    as it is done and read back instead of encoded when an earlier, interrupted build saved it. ``engine`` encodes
    the chunks not read back (default: ``LocalEngine``, in this process); the result does not depend on it."""
    missing = sorted({m for it in items for m in it.modalities} - set(encoder.modalities))
    if missing:
        raise InvalidInput(f"the corpus has {missing} items but model {encoder.name} only has {encoder.modalities}")
    if with_tokens:
        silent = sorted(
            m for m in {m for it in items for m in it.modalities} if not encoder.manifest.towers[m].emits_tokens
        )
        if silent:
            raise InvalidInput(f"model {encoder.name}'s {silent} tower(s) emit no token vectors: no late index")
    chunks = plan_chunks(items, batch_size)
    total, done = sum(len(c.items) for c in chunks), 0
    shards: dict[str, Shard] = {}

    def finished(chunk: Chunk, shard: Shard) -> None:
        nonlocal done
        shards[chunk.name] = shard
        done += len(chunk.items)
        if progress:
            progress(done, total)

    for chunk in chunks:
        saved = checkpoints.load(chunk.name) if checkpoints is not None else None
        if saved is not None:
            finished(chunk, saved)
    resumed = sum(len(s.ok) for s in shards.values())
    pending = [c for c in chunks if c.name not in shards]
    if pending:
        # closing: an engine's resources (a Ray session) go as soon as the loop ends, an exception included.
        with closing((engine or LocalEngine()).encode(encoder, pending, batch_size, with_tokens)) as encoded:
            for chunk, shard in encoded:
                if checkpoints is not None:
                    checkpoints.save(chunk.name, shard)
                finished(chunk, shard)

    rows: list[Row] = []
    parts: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    failures: list[dict] = []
    for chunk in chunks:  # in plan order, whatever order the engine finished them in
        shard = shards[chunk.name]
        if len(shard.ok):
            parts.append(shard.vectors)
            if shard.tokens is not None:
                tokens.extend(shard.tokens)
            rows.extend(Row(chunk.items[i], chunk.modality) for i in shard.ok.tolist())
        failures.extend(shard.failures)
    if not rows:
        raise InvalidInput(f"nothing to index: all {len(items)} items failed ({failures[0]['error']})")
    return Encoded(rows, np.concatenate(parts), failures, tokens if with_tokens else None, resumed)


class LocalEngine:
    """The chunks encoded one after another in this process (ONNX Runtime uses every core for each batch)."""

    def encode(
        self, encoder: Encoder, chunks: list[Chunk], batch_size: int, with_tokens: bool
    ) -> Iterator[tuple[Chunk, Shard]]:
        # Decoding (JPEG, resampling) releases the GIL: a thread per core keeps it off the critical path.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for chunk in chunks:
                yield chunk, encode_chunk(encoder, chunk, batch_size, with_tokens, pool.map)

    def describe(self) -> dict:
        return {"name": "local"}


def encode_chunk(
    encoder: Encoder,
    chunk: Chunk,
    batch_size: int,
    with_tokens: bool,
    map_: Callable[[Callable, Iterable], Iterable] = map,
) -> Shard:
    """One chunk's shard: every engine's unit of work, so that every engine gives the same vectors. An item whose
    media cannot be decoded is a failure record in the shard, never an exception. ``map_`` runs the decoding
    (a thread pool's map decodes in parallel)."""
    if chunk.modality == "text":
        texts = [it.text for it in chunk.items]
        out = (encoder.encode_text_tokens if with_tokens else encoder.encode_text)(texts, batch_size=batch_size)
        return _as_shard(out, list(range(len(texts))), [])
    decoded, ok, failed = [], [], []
    for i, result in enumerate(map_(lambda it: _try_decode(encoder, chunk.modality, it), chunk.items)):
        if isinstance(result, dict):
            failed.append(result)
        else:
            decoded.append(result)
            ok.append(i)
    encode_media = encoder.encode_media_tokens if with_tokens else encoder.encode_media
    out = encode_media(chunk.modality, decoded, batch_size=batch_size) if ok else _empty(encoder, with_tokens)
    return _as_shard(out, ok, failed)


def _as_shard(out: np.ndarray | TokenOutput, ok: list[int], failed: list[dict]) -> Shard:
    if isinstance(out, TokenOutput):
        return Shard(np.array(ok, dtype=np.int32), out.embedding, [t.astype(np.float16) for t in out.tokens], failed)
    return Shard(np.array(ok, dtype=np.int32), out, None, failed)


def _empty(encoder: Encoder, with_tokens: bool) -> np.ndarray | TokenOutput:
    """What encoding no item gives (a chunk whose every file failed to decode)."""
    vectors = np.zeros((0, encoder.dim), dtype=np.float32)
    return TokenOutput(vectors, []) if with_tokens else vectors


def _try_decode(encoder: Encoder, modality: str, item: CorpusItem) -> object:
    """The decoded media, or a failure record: a file that cannot be used is reported, never fatal."""
    try:
        return encoder.decode(modality, getattr(item, modality))
    except (InvalidInput, OSError) as exc:
        error = getattr(exc, "message", str(exc))
        return {"id": item.id, "modality": modality, "source": row_source(item, modality), "error": error}


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
