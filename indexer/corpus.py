"""Corpus readers.

- JSONL: one item per line: ``id``; ``text``, ``image`` and/or ``audio`` (paths relative to the corpus
  file); optional ``metadata`` object.
- A folder: every image or audio file below it (by extension) is an item, its id the relative path; a
  sidecar ``<name>.txt`` beside it is its caption; a ``.txt`` alone is a text item.

A malformed line stops the read with its line number (a corpus is fixed, not half-indexed); a file that
exists but cannot be decoded is the builder's business: it is reported and skipped there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import InvalidInput

MAX_ERRORS_SHOWN = 5
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3"}
MEDIA = ("image", "audio")
FIELDS = {"id", "text", *MEDIA, "metadata"}


@dataclass(frozen=True)
class CorpusItem:
    id: str
    text: str | None = None
    image: Path | None = None
    audio: Path | None = None
    metadata: dict = field(default_factory=dict)
    source: str = ""

    @property
    def modalities(self) -> list[str]:
        return [m for m in ("text", *MEDIA) if getattr(self, m) is not None]


def _parse_line(raw: str, where: str, base: Path) -> CorpusItem:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: each line must be a JSON object")
    unknown = set(obj) - FIELDS
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(sorted(FIELDS))}")
    item_id = obj.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise InvalidInput(f"{where}: `id` must be a non-empty string or an integer")
    text = obj.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise InvalidInput(f"{where}: `text` must be a non-empty string")
    media = {}
    for modality in MEDIA:
        value = obj.get(modality)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidInput(f"{where}: `{modality}` must be a path (relative to the corpus file)")
        if value is not None:
            media[modality] = base / value
    if text is None and not media:
        raise InvalidInput(f"{where}: an item needs `text`, `image` or `audio`")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidInput(f"{where}: `metadata` must be a JSON object")
    return CorpusItem(id=str(item_id), text=text, metadata=metadata, source=where, **media)


def read_jsonl(path: Path) -> list[CorpusItem]:
    """All items, or an InvalidInput naming the first few bad lines."""
    if not path.is_file():
        raise InvalidInput(f"corpus {path} does not exist")
    items: list[CorpusItem] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in _lines(path):
        where = f"{path.name}:{lineno}"
        try:
            item = _parse_line(raw, where, path.parent)
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
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        raise InvalidInput(f"{len(errors)} bad line(s) in {path}{more}:\n  {shown}")
    if not items:
        raise InvalidInput(f"corpus {path} holds no items")
    return items


def read_folder(root: Path) -> list[CorpusItem]:
    """Images and audio (with optional sidecar captions) and lone text files below ``root``, in path order."""
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    kinds = {**dict.fromkeys(IMAGE_SUFFIXES, "image"), **dict.fromkeys(AUDIO_SUFFIXES, "audio")}
    media_stems = {p.with_suffix("") for p in files if p.suffix.lower() in kinds}
    items = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        kind = kinds.get(path.suffix.lower())
        if kind:
            caption = path.with_suffix(".txt")
            text = _read_caption(caption) if caption.is_file() else None
            items.append(CorpusItem(id=rel, text=text, source=rel, **{kind: path}))
        elif path.suffix.lower() == ".txt" and path.with_suffix("") not in media_stems:
            text = _read_caption(path)
            if text:
                items.append(CorpusItem(id=rel, text=text, source=rel))
    if not items:
        raise InvalidInput(f"folder {root} holds no image, audio or .txt files")
    return items


def read_corpus(path: Path) -> list[CorpusItem]:
    """A JSONL file or a folder of files."""
    return read_folder(path) if path.is_dir() else read_jsonl(path)


def _read_caption(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    return text or None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                yield lineno, raw
