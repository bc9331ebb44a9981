"""A published version's own items as corpus items, to encode them again (after a model change, or to rebuild
without the original corpus): text rows give the text, image and audio rows their media file (the row's source
is its absolute path), live rows grouped back into items by id."""

from __future__ import annotations

from pathlib import Path

from indexer.corpus import MEDIA, CorpusItem
from indexer.encode import MEDIA_SOURCES
from indexer.items import ItemStore
from indexer.layout import ITEMS, IndexDir, SegmentRef
from models.errors import BundleError


def items_of_version(indexes_dir: Path, name: str, version: str | None = None) -> list[CorpusItem]:
    """The live items of ``version`` (default: the published one), in their first row's order."""
    index = IndexDir(indexes_dir, name)
    fields: dict[str, dict] = {}
    for ref in index.manifest(version).segments:
        _segment_fields(index, ref, fields)
    return [CorpusItem(**f) for f in fields.values()]


def items_of_segment(index: IndexDir, ref: SegmentRef) -> list[CorpusItem]:
    """The live items of one segment of a version (``ref`` carries that version's tombstones)."""
    fields: dict[str, dict] = {}
    _segment_fields(index, ref, fields)
    return [CorpusItem(**f) for f in fields.values()]


def _segment_fields(index: IndexDir, ref: SegmentRef, fields: dict[str, dict]) -> None:
    seg = index.segment_manifest(ref.id)
    if seg.build.get("media_sources", MEDIA_SOURCES) != MEDIA_SOURCES and set(seg.counts) & set(MEDIA):
        raise BundleError(
            f"index {index.name!r} segment {ref.id} predates stored media paths: its pictures and sounds cannot be "
            "found again; rebuild it from its corpus instead"
        )
    dead = set(ref.tombstones)
    store = ItemStore(index.segment_dir(ref.id) / ITEMS)
    try:
        rows = [r for r in store.all_rows() if r[0] not in dead]
    finally:
        store.close()
    for _row, item_id, modality, source, text, metadata in rows:
        item = fields.setdefault(item_id, {"id": item_id, "metadata": metadata, "source": source})
        if modality == "text":
            item["text"], item["source"] = text, source
        else:
            item[modality] = Path(source)
