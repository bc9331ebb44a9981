"""Upgrading an index to a NEW model without re-encoding first (issue 16; XBT-style backward-compatible adapters).

``start_upgrade`` publishes a version of the same segments whose model is NEW and whose ``upgrade`` record names
OLD and the adapter (models.adapter) from NEW to OLD: from then on the service encodes the index's queries with NEW
and searches OLD's segments through the adapter (indexer.projection). ``backfill`` then re-encodes the OLD segments
with NEW, one segment a version: each NEW segment replaces its OLD one in one atomic publish, so no item is missing
from any version and a crash loses at most the segment being encoded (its encoded chunks are checkpointed, as a
build's are). When no OLD segment is left, the version is pure NEW and the adapter is no longer used.

Items added during the upgrade are encoded with NEW (the version's model); deletions and upserts that land while a
segment is being encoded are carried onto its replacement. An item that cannot be encoded again (its media file is
gone) stops the backfill with its reason rather than disappear: the OLD segment stays, searched through the adapter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from indexer.build import encode_and_commit, late_of
from indexer.encode import Encoded, Progress
from indexer.items import ItemStore
from indexer.layout import ITEMS, IndexDir, ModelRef, SegmentRef, Upgrade, VersionManifest, now_iso
from indexer.publish import commit, tombstoned
from indexer.reencode import items_of_segment
from models.adapter import AdapterManifest
from models.encoder import Encoder
from models.errors import AdapterMismatch, IndexNotFound, InvalidInput

log = logging.getLogger(__name__)


class SegmentGone(InvalidInput):
    """The OLD segment being re-encoded left the published version meanwhile (a compaction merged it)."""


def start_upgrade(
    indexes_dir: Path, name: str, new: ModelRef, adapter: AdapterManifest, keep_versions: int | None = None
) -> VersionManifest:
    """Publish the version that serves ``name``'s queries with NEW through ``adapter``; nothing is encoded. Starting
    the same upgrade again returns the version in progress (a job that resumes calls it again)."""
    target = IndexDir(indexes_dir, name)
    base = target.manifest()
    if base.upgrade is not None:
        if base.model.fingerprint == new.fingerprint and base.upgrade.adapter_fingerprint == adapter.fingerprint:
            return base
        raise InvalidInput(
            f"index {name!r} is already being upgraded from {base.upgrade.from_model.name} to {base.model.name}; "
            f"let that backfill finish (xmodal index upgrade {name} --to {base.model.name} resumes it), or publish a "
            "version from before it"
        )
    if base.model.fingerprint == new.fingerprint:
        raise InvalidInput(f"index {name!r} is already encoded by {new.name} ({new.fingerprint[:12]})")
    wanted = (new.fingerprint, base.model.fingerprint)
    if (adapter.from_model.fingerprint, adapter.to_model.fingerprint) != wanted:
        raise AdapterMismatch(
            f"adapter {adapter.name} maps {adapter.from_model.name} ({adapter.from_model.fingerprint[:12]}) to "
            f"{adapter.to_model.name} ({adapter.to_model.fingerprint[:12]}); index {name!r} needs one from "
            f"{new.name} ({new.fingerprint[:12]}) to {base.model.name} ({base.model.fingerprint[:12]})"
        )
    record = Upgrade(
        from_model=base.model,
        from_version=base.version,
        adapter=adapter.name,
        adapter_fingerprint=adapter.fingerprint,
        score_map=adapter.score_map,
        started_at=now_iso(),
    )

    def plan(current: VersionManifest | None) -> list[SegmentRef]:
        if current is None or current.model.fingerprint != base.model.fingerprint or current.upgrade is not None:
            raise InvalidInput(f"index {name!r} changed while its upgrade was being started; start it again")
        return current.segments

    build = {"from": base.model.name, "to": new.name, "adapter": adapter.name, "base": base.version}
    return commit(target, "upgrade", [], plan, build=build, keep_versions=keep_versions, upgrade=(new, record))


def pending(target: IndexDir, manifest: VersionManifest) -> list[SegmentRef]:
    """The segments of ``manifest`` still encoded by the OLD model (none when it is not being upgraded)."""
    if manifest.upgrade is None:
        return []
    old = manifest.upgrade.from_model.fingerprint
    return [r for r in manifest.segments if target.segment_manifest(r.id).model.fingerprint == old]


def backfill(
    indexes_dir: Path,
    name: str,
    encoder: Encoder,
    *,
    batch_size: int = 32,
    use_gpu: bool = True,
    progress: Progress | None = None,
    keep_versions: int | None = None,
    max_segments: int | None = None,
    on_version: Callable[[VersionManifest], None] = lambda _v: None,
    memory_budget: int | None = None,
) -> VersionManifest:
    """Re-encode ``name``'s OLD segments with ``encoder`` (the upgrade's NEW model), publishing a version per
    segment (``on_version`` hears of each, e.g. to announce it); at most ``max_segments`` of them when given. Each
    new segment's index is chosen within ``memory_budget`` (bytes), as an add's is. Returns
    the last version published (pure NEW when no OLD segment is left). ``progress(done, total)`` counts items."""
    target = IndexDir(indexes_dir, name)
    current = target.manifest()
    if current.upgrade is None:
        raise InvalidInput(f"index {name!r} is not being upgraded (start with `xmodal index upgrade {name} --to NEW`)")
    if current.model.fingerprint != encoder.fingerprint:
        raise InvalidInput(
            f"index {name!r} is being upgraded to {current.model.name} ({current.model.fingerprint[:12]}), not "
            f"{encoder.name} ({encoder.fingerprint[:12]})"
        )
    total = sum(r.rows - len(r.tombstones) for r in pending(target, current))
    done, finished = 0, 0
    while max_segments is None or finished < max_segments:
        current = target.manifest()
        todo = pending(target, current)
        if not todo:
            break
        ref = todo[0]
        t0 = time.perf_counter()
        try:
            current = _replace_segment(
                target, ref, encoder, batch_size, use_gpu, keep_versions, progress, done, total, memory_budget
            )
        except SegmentGone:
            log.info("index %s: segment %s was merged meanwhile; backfilling what replaced it", name, ref.id)
            continue
        done += ref.rows - len(ref.tombstones)
        finished += 1
        log.info(
            "index %s: segment %s re-encoded with %s in %.1f s (%d left)",
            name,
            ref.id,
            encoder.name,
            time.perf_counter() - t0,
            len(todo) - 1,
        )
        on_version(current)
    if progress is not None:
        progress(total, total)
    return target.manifest()


def _replace_segment(
    target: IndexDir,
    ref: SegmentRef,
    encoder: Encoder,
    batch_size: int,
    use_gpu: bool,
    keep_versions: int | None,
    progress: Progress | None,
    done: int,
    total: int,
    memory_budget: int | None,
) -> VersionManifest:
    """Encode one OLD segment's live items with NEW and publish the version where the NEW segment replaces it."""
    items = items_of_segment(target, ref)
    build = {"backfill_of": ref.id, "items": len(items)}

    def swap(current: VersionManifest | None, new: SegmentRef | None) -> list[SegmentRef]:
        if current is None:
            raise IndexNotFound(f"index {target.name!r} has no published version")
        now = next((r for r in current.segments if r.id == ref.id), None)
        if now is None:
            raise SegmentGone(f"segment {ref.id} is no longer in index {target.name!r}")
        others = [r for r in current.segments if r.id != ref.id]
        if new is None:
            return others
        gone = _ids_of_rows(target, ref.id, sorted(set(now.tombstones) - set(ref.tombstones)))
        if gone:  # deleted, or upserted into a newer segment, while this one was being encoded
            new = tombstoned(target, [new], gone)[0][0]
            build["deleted_meanwhile"] = len(gone)
        return [*others, new]

    if not items:  # every row deleted: the segment just leaves
        return commit(
            target, "backfill", [], lambda current: swap(current, None), build=build, keep_versions=keep_versions
        )

    def step(d: int, _t: int) -> None:
        if progress is not None:
            progress(done + d, total)

    return encode_and_commit(
        target,
        "backfill",
        items,
        encoder,
        swap,
        build=build,
        batch_size=batch_size,
        use_gpu=use_gpu,
        progress=step,
        late=late_of(target.manifest()),
        keep_versions=keep_versions,
        memory_budget=memory_budget,
        check=lambda encoded: _no_failures(target.name, ref.id, encoded),
    )


def _no_failures(name: str, segment: str, encoded: Encoded) -> None:
    if encoded.failures:
        first = encoded.failures[0]
        raise InvalidInput(
            f"index {name!r}: {len(encoded.failures)} item(s) of segment {segment} could not be encoded again "
            f"(first: {first}); they stay searchable through the adapter. Restore their media, or delete them, "
            "and run the backfill again"
        )


def _ids_of_rows(target: IndexDir, segment: str, rows: list[int]) -> set[str]:
    if not rows:
        return set()
    store = ItemStore(target.segment_dir(segment) / ITEMS)
    try:
        return {record["id"] for record in store.get(rows).values()}
    finally:
        store.close()
