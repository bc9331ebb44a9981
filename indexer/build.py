"""Building and adding: the pipeline encode (checkpointed chunks, indexer.encode) → segment writer
(indexer.segment_writer) → publisher (indexer.publish). A full build makes a version of one new segment; an add
makes a version of the published one's segments plus a new one, the old rows of ids it holds tombstoned
(an upsert)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from indexer.corpus import CorpusItem
from indexer.encode import CHUNK_BATCHES, MEDIA_SOURCES, Encoded, Engine, LocalEngine, Progress, encode_items, records
from indexer.layout import IndexDir, ModelRef, SegmentRef, VersionManifest, new_version_name
from indexer.publish import commit, tombstoned
from indexer.segment_writer import LateBuild, write_segment
from indexer.shards import ShardStore, build_key
from models.encoder import Encoder
from models.errors import IndexNotFound, InvalidInput
from models.files import sha256_file, staging_dir

# the segments of the version a new segment is committed in: (the published version, the new segment's ref) -> refs
Place = Callable[[VersionManifest | None, SegmentRef], list[SegmentRef]]

log = logging.getLogger(__name__)
MAX_FAILURES_KEPT = 50  # in the manifest; the count is always exact

__all__ = ["BuildResult", "LateBuild", "add_items", "build_index", "late_of", "model_warnings"]


@dataclass
class BuildResult:
    manifest: VersionManifest
    published: bool


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
    memory_budget: int | None = None,
    engine: Engine | None = None,
) -> BuildResult:
    """Encode every item into one new segment and publish a version of it alone. With ``late``, also the token
    store for late interaction. With ``keep_versions``, older versions beyond that many (and the segments only
    they list) are removed afterwards (never the published one). With ``checkpoint``, encoded chunks are saved as
    they are done (``indexer.shards``): the same build run again after a crash encodes only what was not saved.
    ``engine`` encodes (default: in this process; ``indexer.ray_engine.RayEngine``: over Ray Data)."""
    build = {"corpus": str(corpus_path) if corpus_path else None}
    build["corpus_sha256"] = corpus_digest(corpus_path) if corpus_path else None
    manifest = encode_and_commit(
        IndexDir(indexes_dir, name),
        "build",
        items,
        encoder,
        lambda base, new: [new],
        build=build,
        faiss_key=faiss_key,
        batch_size=batch_size,
        publish=publish,
        use_gpu=use_gpu,
        progress=progress,
        late=late,
        keep_versions=keep_versions,
        checkpoint=checkpoint,
        memory_budget=memory_budget,
        engine=engine,
    )
    return BuildResult(manifest, publish)


def late_of(manifest: VersionManifest) -> LateBuild | None:
    """How a version stores tokens, to store new rows the same way (None: dense only)."""
    t = manifest.tokens
    return LateBuild(**{k: t[k] for k in ("storage", "nbits", "pool_factor") if k in t}) if t else None


def add_items(
    *,
    indexes_dir: Path,
    name: str,
    items: list[CorpusItem],
    encoder: Encoder,
    batch_size: int = 32,
    use_gpu: bool = True,
    progress: Progress | None = None,
    keep_versions: int | None = None,
    checkpoint: bool = True,
    max_segments: int | None = None,
    engine: Engine | None = None,
    memory_budget: int | None = None,
) -> VersionManifest:
    """Encode only ``items`` into a new segment and publish a version of the published one's segments plus it;
    an id the index already holds is an upsert (its old rows are tombstoned). Stored as the index stores tokens.
    With ``max_segments``, a version left with more segments gets its small segments merged (indexer.lifecycle's
    tiered compaction; that version is returned). The new segment's index type (and the merged one's) is chosen
    within ``memory_budget`` (bytes; None: no limit) as a build's is."""
    target = IndexDir(indexes_dir, name)
    base = target.manifest()
    _check_model(name, base, encoder)
    ids = {it.id for it in items}

    def plan(current: VersionManifest | None) -> list[SegmentRef]:
        if current is None:
            raise IndexNotFound(f"index {name!r} has no published version to add to")
        _check_model(name, current, encoder)  # a rebuild with another model may have landed meanwhile
        refs, replaced = tombstoned(target, current.segments, ids)
        build["replaced"] = len(replaced)
        return refs

    build: dict = {"base": base.version}
    version = encode_and_commit(
        target,
        "add",
        items,
        encoder,
        lambda current, new: [*plan(current), new],
        build=build,
        batch_size=batch_size,
        use_gpu=use_gpu,
        progress=progress,
        late=late_of(base),
        keep_versions=keep_versions,
        checkpoint=checkpoint,
        engine=engine,
        memory_budget=memory_budget,
    )
    if max_segments is not None and len(version.segments) > max_segments:
        from indexer.lifecycle import compact

        log.info("index %s has %d segments (more than %d): compacting", name, len(version.segments), max_segments)
        version = compact(
            indexes_dir,
            name,
            use_gpu=use_gpu,
            keep_versions=keep_versions,
            everything=False,
            memory_budget=memory_budget,
        )
    return version


def model_warnings(
    name: str, built_with: str, allowed: list[str], previous: VersionManifest | None, encoder: Encoder
) -> list[str]:
    """What an operator should hear after publishing a version built with model ``built_with`` where services
    load only the models ``allowed`` (XMODAL_MODELS; empty: each index's own), over ``previous``."""
    out = []
    if allowed and built_with not in allowed:
        out.append(
            f"built with model {built_with!r}, which XMODAL_MODELS ({','.join(allowed)}) leaves out: services here "
            f"refuse this version and keep serving the one they have; add {built_with} to XMODAL_MODELS"
        )
    if previous is not None and previous.model.fingerprint != encoder.fingerprint:
        out.append(
            f"the previous version {previous.version} was built with model {previous.model.name!r} "
            f"({previous.model.fingerprint[:12]}); services now encode this index's queries with "
            f"{encoder.name} ({encoder.fingerprint[:12]}), whose bundle each replica needs in its models folder; "
            f"to roll back: xmodal index publish {name} {previous.version}"
        )
    return out


def _check_model(name: str, manifest: VersionManifest, encoder: Encoder) -> None:
    if manifest.model.fingerprint != encoder.fingerprint:
        raise InvalidInput(
            f"index {name!r} holds vectors of model {manifest.model.name} ({manifest.model.fingerprint[:12]}), not "
            f"{encoder.name} ({encoder.fingerprint[:12]}): add with its model, or rebuild it with this one"
        )


def encode_and_commit(
    target: IndexDir,
    operation: str,
    items: list[CorpusItem],
    encoder: Encoder,
    place: Place,
    *,
    build: dict,
    faiss_key: str | None = None,
    batch_size: int = 32,
    publish: bool = True,
    use_gpu: bool = True,
    progress: Progress | None = None,
    late: LateBuild | None = None,
    keep_versions: int | None = None,
    checkpoint: bool = True,
    memory_budget: int | None = None,
    check: Callable[[Encoded], None] | None = None,
    engine: Engine | None = None,
) -> VersionManifest:
    """Encode ``items`` (checkpointed), write them as a segment, and commit a version of the segments
    ``place(published version, the new segment's ref)`` lists. ``check`` may refuse what was encoded before
    anything is written."""
    t0 = time.perf_counter()
    with_tokens = late is not None
    checkpoints = None
    if checkpoint:
        checkpoints = ShardStore(
            target.root, build_key(encoder.fingerprint, items, batch_size * CHUNK_BATCHES, with_tokens)
        )
        checkpoints.prune_stale()
    engine = engine or LocalEngine()
    encoded = encode_items(
        encoder, items, batch_size, progress, with_tokens=with_tokens, checkpoints=checkpoints, engine=engine
    )
    t_encode = time.perf_counter() - t0
    if check is not None:
        check(encoded)
    build.update(_encode_stats(items, encoded, encoder, t_encode, batch_size))
    build["engine"] = engine.describe()
    segment = new_version_name()
    model = ModelRef(name=encoder.name, fingerprint=encoder.fingerprint, dim=encoder.dim)
    with staging_dir(target.segments_dir, segment) as tmp:
        written = write_segment(
            tmp,
            index=target.name,
            segment=segment,
            records=records(encoded.rows),
            vectors=encoded.vectors,
            tokens=encoded.tokens,
            model=model,
            faiss_key=faiss_key,
            use_gpu=use_gpu,
            late=late,
            build=dict(build),
            memory_budget=memory_budget,
        )
        build["total_seconds"] = round(time.perf_counter() - t0, 3)
        version = commit(
            target,
            operation,
            [(tmp, written)],
            lambda base: place(base, SegmentRef(id=segment, rows=written.size)),
            build=build,
            publish=publish,
            keep_versions=keep_versions,
        )
    if checkpoints is not None:
        checkpoints.remove()  # the segment holds it all now
    return version


def _encode_stats(items: list[CorpusItem], encoded: Encoded, encoder: Encoder, seconds: float, batch: int) -> dict:
    vectors = len(encoded.rows)
    return {
        "items": len(items),
        "vectors": vectors,
        "failed": len(encoded.failures),
        "failures": encoded.failures[:MAX_FAILURES_KEPT],
        "encode_seconds": round(seconds, 3),
        "items_per_second": round(vectors / max(seconds, 1e-9), 1),
        "resumed_vectors": encoded.resumed,  # read back from an interrupted build's checkpoints
        "encoded_vectors": vectors - encoded.resumed,
        "batch_size": batch,
        "providers": encoder.providers,
        "media_sources": MEDIA_SOURCES,
    }


def corpus_digest(path: Path) -> str:
    """sha256 of a corpus file; for a folder, of its file list with sizes (cheap, and changes when it does)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()
