"""A published version's own items as corpus items, to encode them again (after a model change, or to rebuild
without the original corpus): text rows give the text, image and audio rows their media file (the row's source
is its absolute path), rows grouped back into items by id."""

from __future__ import annotations

from pathlib import Path

from indexer.build import MEDIA_SOURCES
from indexer.corpus import MEDIA, CorpusItem
from indexer.items import ItemStore
from indexer.layout import ITEMS, IndexDir
from models.errors import BundleError


def items_of_version(indexes_dir: Path, name: str, version: str | None = None) -> list[CorpusItem]:
    """The items of ``version`` (default: the published one), in their first row's order."""
    index = IndexDir(indexes_dir, name)
    manifest = index.manifest(version)
    if manifest.build.get("media_sources") != MEDIA_SOURCES and set(manifest.counts) & set(MEDIA):
        raise BundleError(
            f"index {name!r} version {manifest.version} predates stored media paths: its pictures and sounds "
            "cannot be found again; rebuild it from its corpus instead"
        )
    store = ItemStore(index.version_dir(manifest.version) / ITEMS)
    try:
        rows = store.all_rows()
    finally:
        store.close()
    fields: dict[str, dict] = {}
    for _row, item_id, modality, source, text, metadata in rows:
        item = fields.setdefault(item_id, {"id": item_id, "metadata": metadata, "source": source})
        if modality == "text":
            item["text"], item["source"] = text, source
        else:
            item[modality] = Path(source)
    return [CorpusItem(**f) for f in fields.values()]
