"""The items store: row number → external id, modality, source, text and metadata, in SQLite."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from models.errors import BundleError

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

    def sources(self, ids: list[str], modalities: tuple[str, ...] = ("image", "audio")) -> dict[str, dict[str, str]]:
        """For each of ``ids`` that has rows of ``modalities``: {modality: source}. One query, on the
        (id, modality) unique index; ids not in the store are absent."""
        if not ids or not modalities:
            return {}
        marks, kinds = ",".join("?" * len(ids)), ",".join("?" * len(modalities))
        cur = self._con.execute(
            f"SELECT id, modality, source FROM items WHERE id IN ({marks}) AND modality IN ({kinds})",
            [*ids, *modalities],
        )
        out: dict[str, dict[str, str]] = {}
        for item_id, modality, source in cur:
            out.setdefault(item_id, {})[modality] = source
        return out

    def first_rows(self, ids: list[str]) -> dict[str, int]:
        """For each of ``ids`` in the store: its smallest row number (a stable per-version number for an item of
        several rows); ids not in the store are absent."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        cur = self._con.execute(f"SELECT id, MIN(row) FROM items WHERE id IN ({marks}) GROUP BY id", ids)
        return {item_id: row for item_id, row in cur}

    def rows_of(self, ids: list[str], modality: str) -> dict[str, int]:
        """For each of ``ids`` that has a ``modality`` row: that row's number."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        cur = self._con.execute(f"SELECT id, row FROM items WHERE id IN ({marks}) AND modality = ?", [*ids, modality])
        return {item_id: row for item_id, row in cur}

    def all_rows(self) -> list[tuple[int, str, str, str, str | None, dict]]:
        """Every row in row order: (row, id, modality, source, text, metadata)."""
        cur = self._con.execute("SELECT row, id, modality, source, text, metadata FROM items ORDER BY row")
        try:
            return [(r, i, m, s, t, json.loads(md)) for r, i, m, s, t, md in cur]
        except (json.JSONDecodeError, TypeError):
            raise BundleError("a row of the items store is damaged: its metadata is not JSON") from None

    def close(self) -> None:
        self._con.close()
