"""The publisher: staged segments and a plan in, a published version out. Under the index's writer lock it moves
the staged segments into ``segments/``, makes the new version's segment list from the published one (``plan``),
writes ``versions/<version>.json`` with its summary, moves ``CURRENT`` and garbage-collects old versions and the
segments nothing lists any more."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from indexer.items import ItemStore
from indexer.layout import (
    ITEMS,
    IndexDir,
    ModelRef,
    SegmentManifest,
    SegmentRef,
    Upgrade,
    VersionManifest,
    new_version_name,
    now_iso,
)
from models.errors import InvalidInput
from models.files import replace_dir

Plan = Callable[[VersionManifest | None], list[SegmentRef]]


def commit(
    target: IndexDir,
    operation: str,
    staged: list[tuple[Path, SegmentManifest]],
    plan: Plan,
    *,
    build: dict,
    publish: bool = True,
    keep_versions: int | None = None,
    locked: bool = False,
    upgrade: tuple[ModelRef, Upgrade] | None = None,
) -> VersionManifest:
    """Under the index's writer lock (taken here unless the caller holds it: ``locked``, as a compaction does from
    its start): move the staged segments in, make the version of ``plan(published version)``, write it, publish it,
    garbage-collect."""
    with contextlib.nullcontext() if locked else target.writing():
        for folder, segment in staged:
            replace_dir(folder, target.segment_dir(segment.id))
        base = target.manifest() if target.exists() else None
        refs = plan(base)
        known = {s.id: s for _, s in staged}
        segments = {r.id: known.get(r.id) or target.segment_manifest(r.id) for r in refs}
        version = summarise(target.name, new_version_name(), base, operation, refs, segments, build, upgrade)
        target.write_version(version)
        if publish:
            target.publish(version.version)
        if keep_versions:
            target.prune(keep_versions)
        return version


def summarise(
    name: str,
    version: str,
    base: VersionManifest | None,
    operation: str,
    refs: list[SegmentRef],
    segments: dict[str, SegmentManifest],
    build: dict,
    upgrade: tuple[ModelRef, Upgrade] | None = None,
) -> VersionManifest:
    """A version's manifest: its segments, live counts, and the largest segment's FAISS settings, recall and
    calibration (the fits of the most items; every segment keeps its own).

    One model encodes every segment, except during a model upgrade (``upgrade``: NEW and the upgrade record, or the
    base version's, which every operation but a full build carries on): then segments of OLD and NEW may mix, the
    version's model is NEW (its queries' model) and the record stays while any OLD segment does."""
    if not refs:
        raise InvalidInput(f"index {name!r} would have no segments left")
    if upgrade is None and base is not None and base.upgrade is not None and operation != "build":
        upgrade = (base.model, base.upgrade)
    models = {segments[r.id].model.fingerprint: segments[r.id].model for r in refs}
    record = None
    if upgrade is not None and upgrade[1].from_model.fingerprint in models:
        model, record = upgrade
        strays = set(models) - {model.fingerprint, record.from_model.fingerprint}
        if strays:
            raise InvalidInput(
                f"index {name!r} is being upgraded from {record.from_model.name} to {model.name}: segments of "
                f"another model ({sorted(s[:12] for s in strays)}) cannot join it"
            )
    elif len(models) > 1:
        raise InvalidInput(f"index {name!r}: its segments were encoded by different models ({sorted(models)})")
    else:
        model = next(iter(models.values()))
    counts: dict[str, int] = {}
    live: dict[str, int] = {}
    for ref in refs:
        seg = segments[ref.id]
        dead = dead_by_modality(seg, ref.tombstones)
        for modality, n in seg.counts.items():
            counts[modality] = counts.get(modality, 0) + n - dead.get(modality, 0)
        live[ref.id] = seg.size - len(ref.tombstones)
    native = [r for r in refs if segments[r.id].model.fingerprint == model.fingerprint] or refs
    largest = segments[max(native, key=lambda r: (live[r.id], r.id)).id]
    return VersionManifest(
        name=name,
        version=version,
        created_at=now_iso(),
        base=base.version if base is not None else None,
        operation=operation,
        model=model,
        dim=model.dim,
        segments=refs,
        counts=counts,
        faiss=largest.faiss,
        recall_at_10=largest.recall_at_10,
        calibration=largest.calibration,
        score_calibration=largest.score_calibration,
        tokens=largest.tokens,
        build=build,
        upgrade=record,
    )


def dead_by_modality(segment: SegmentManifest, tombstones: list[int]) -> dict[str, int]:
    rows = np.asarray(tombstones, dtype=np.int64)
    return {m: int(((rows >= s) & (rows < e)).sum()) for m, (s, e) in segment.rows.items()}


def tombstoned(target: IndexDir, refs: list[SegmentRef], ids: set[str]) -> tuple[list[SegmentRef], set[str]]:
    """``refs`` with every live row of ``ids`` added to their segments' tombstones, and the ids found."""
    out, found = [], set()
    wanted = sorted(ids)
    for ref in refs:
        store = ItemStore(target.segment_dir(ref.id) / ITEMS)
        try:
            rows = store.rows_of_ids(wanted)
        finally:
            store.close()
        dead = set(ref.tombstones)
        new = {row: item for row, item in rows.items() if row not in dead}
        found |= set(new.values())
        out.append(ref.model_copy(update={"tombstones": sorted(dead | set(new))}) if new else ref)
    return out, found
