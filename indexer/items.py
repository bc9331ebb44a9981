"""The items store of a segment (row number → external id, modality, source, text and metadata, in SQLite), and
the items of a version: its segments' stores seen as one, in the version's row numbering, deleted rows left out."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import BundleError

CHUNK = 10_000  # ids per query, below SQLite's limit on host parameters

SCHEMA = """
CREATE TABLE items (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    modality TEXT NOT NULL,
    source TEXT NOT NULL,
    text TEXT,
    metadata TEXT NOT NULL,
    UNIQUE (id, modality)
)
"""


def write_items(path: Path, rows: Iterable[tuple[int, str, str, str, str | None, dict]]) -> None:
    con = sqlite3.connect(path)
    try:
        con.execute(SCHEMA)
        con.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
            ((r, i, m, s, t, json.dumps(md, sort_keys=True)) for r, i, m, s, t, md in rows),
        )
        con.commit()
    finally:
        con.close()


class ItemStore:
    """Read-only; one connection shared across threads (SQLite serialises access internally)."""

    def __init__(self, path: Path) -> None:
        self._con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self.count = self._con.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def get(self, rows: list[int]) -> dict[int, dict]:
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        cur = self._con.execute(
            f"SELECT row, id, modality, source, text, metadata FROM items WHERE row IN ({marks})", rows
        )
        out = {}
        for r, i, m, s, t, md in cur:
            try:
                metadata = json.loads(md)
            except (json.JSONDecodeError, TypeError):  # a damaged row (checksums catch it at load when present)
                raise BundleError(f"row {r} of the items store is damaged: its metadata is not JSON") from None
            out[r] = {"id": i, "modality": m, "source": s, "text": t, "metadata": metadata}
        return out

    def rows_of_ids(self, ids: list[str]) -> dict[int, str]:
        """Every row of each of ``ids`` (all its modalities): {row: id}; ids not in the store are absent."""
        return {row: item_id for row, item_id, _, _ in self.lookup(ids)}

    def lookup(self, ids: list[str], modalities: tuple[str, ...] | None = None) -> list[tuple[int, str, str, str]]:
        """(row, id, modality, source) of every row of ``ids`` (of ``modalities`` only, when given)."""
        out = []
        for start in range(0, len(ids), CHUNK):
            part = ids[start : start + CHUNK]
            sql = f"SELECT row, id, modality, source FROM items WHERE id IN ({','.join('?' * len(part))})"
            args = list(part)
            if modalities is not None:
                sql += f" AND modality IN ({','.join('?' * len(modalities))})"
                args += list(modalities)
            out += self._con.execute(sql, args).fetchall()
        return out

    def all_rows(self) -> list[tuple[int, str, str, str, str | None, dict]]:
        """Every row in row order: (row, id, modality, source, text, metadata)."""
        cur = self._con.execute("SELECT row, id, modality, source, text, metadata FROM items ORDER BY row")
        try:
            return [(r, i, m, s, t, json.loads(md)) for r, i, m, s, t, md in cur]
        except (json.JSONDecodeError, TypeError):
            raise BundleError("a row of the items store is damaged: its metadata is not JSON") from None

    def close(self) -> None:
        self._con.close()


class VersionItems:
    """The live rows of a version's segments (``SegmentView``s: a ``data.items`` store, ``offset``, ``dead``,
    ``size``) as one store: row numbers are the version's (a segment's rows follow the previous segments')."""

    def __init__(self, views: list[Any]) -> None:
        self.views = views
        self.offsets = np.array([v.offset for v in views], dtype=np.int64)
        self.count = sum(v.size for v in views)

    def locate(self, row: int) -> tuple[Any, int]:
        """The segment view holding version row ``row``, and the row's number in it."""
        view = self.views[int(np.searchsorted(self.offsets, row, side="right")) - 1]
        return view, row - view.offset

    def get(self, rows: list[int]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        by_view: dict[int, list[int]] = {}
        for row in rows:
            view, local = self.locate(row)
            by_view.setdefault(id(view), []).append(local)
        for view in self.views:
            if id(view) in by_view:
                for local, record in view.data.items.get(by_view[id(view)]).items():
                    out[local + view.offset] = record
        return out

    def _live(self, ids: list[str], modalities: tuple[str, ...] | None = None) -> list[tuple[int, str, str, str]]:
        """(version row, id, modality, source) of the live rows of ``ids``, in row order."""
        found = []
        for view in self.views:
            for row, item_id, modality, source in view.data.items.lookup(ids, modalities):
                if not view.dead[row]:
                    found.append((row + view.offset, item_id, modality, source))
        return sorted(found)

    def sources(self, ids: list[str], modalities: tuple[str, ...] = ("image", "audio")) -> dict[str, dict[str, str]]:
        """For each of ``ids`` that has live rows of ``modalities``: {modality: source}."""
        out: dict[str, dict[str, str]] = {}
        if ids and modalities:
            for _, item_id, modality, source in self._live(ids, modalities):
                out.setdefault(item_id, {})[modality] = source
        return out

    def first_rows(self, ids: list[str]) -> dict[str, int]:
        """For each of ``ids`` in the version: its smallest live row (a stable per-version number for an item)."""
        out: dict[str, int] = {}
        for row, item_id, _, _ in self._live(ids):
            out.setdefault(item_id, row)
        return out

    def rows_of(self, ids: list[str], modality: str) -> dict[str, int]:
        """For each of ``ids`` that has a live ``modality`` row: that row's number."""
        return {item_id: row for row, item_id, _, _ in self._live(ids, (modality,))}

    def all_rows(self) -> list[tuple[int, str, str, str, str | None, dict]]:
        """Every live row in row order: (row, id, modality, source, text, metadata)."""
        out = []
        for view in self.views:
            out += [(r + view.offset, *rest) for r, *rest in view.data.items.all_rows() if not view.dead[r]]
        return out
