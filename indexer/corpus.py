"""Corpus readers. A JSONL corpus has one item per line: ``id``, ``text``, optional ``metadata`` object."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import InvalidInput

MAX_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class CorpusItem:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)
    source: str = ""


def _parse_line(raw: str, where: str) -> CorpusItem:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: each line must be a JSON object")
    item_id = obj.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise InvalidInput(f"{where}: `id` must be a non-empty string or an integer")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"{where}: `text` must be a non-empty string")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidInput(f"{where}: `metadata` must be a JSON object")
    unknown = set(obj) - {"id", "text", "metadata"}
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {sorted(unknown)}; allowed: id, text, metadata")
    return CorpusItem(id=str(item_id), text=text, metadata=metadata, source=where)


def read_jsonl(path: Path) -> list[CorpusItem]:
    """All items, or an InvalidInput naming the first few bad lines: a corpus is fixed, not half-indexed."""
    if not path.is_file():
        raise InvalidInput(f"corpus {path} does not exist")
    items: list[CorpusItem] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in _lines(path):
        where = f"{path.name}:{lineno}"
        try:
            item = _parse_line(raw, where)
        except InvalidInput as exc:
            errors.append(exc.message)
            continue
        if item.id in seen:
            errors.append(f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})")
            continue
        seen[item.id] = lineno
        items.append(item)
    if errors:
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise InvalidInput(f"{len(errors)} bad line(s) in {path}{more}:\n  " + "\n  ".join(errors[:MAX_ERRORS_SHOWN]))
    if not items:
        raise InvalidInput(f"corpus {path} holds no items")
    return items


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                yield lineno, raw
