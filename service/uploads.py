"""Items posted over HTTP (``POST /v1/indexes/{name}/items``), kept as a corpus an add job reads: the media decoded
from base64 into files under ``<data>/media/<index>/<upload>/`` (they stay: the index's rows point at them, and the
search page shows them), and an ``items.jsonl`` beside them, written last and atomically."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import Field, field_validator

from indexer.layout import check_name
from models.errors import InvalidInput
from models.files import atomic_write_bytes
from service.schemas import RequestBody

MAX_ITEMS = 1000  # per request; the body limit bounds the media
# What a file starts with -> the suffix it is saved under (the decoders and the media routes go by it).
SIGNATURES = {
    "image": [
        (0, b"\x89PNG\r\n\x1a\n", ".png"),
        (0, b"\xff\xd8\xff", ".jpg"),
        (0, b"GIF8", ".gif"),
        (8, b"WEBP", ".webp"),
        (0, b"BM", ".bmp"),
        (0, b"II*\x00", ".tif"),
        (0, b"MM\x00*", ".tif"),
    ],
    "audio": [
        (8, b"WAVE", ".wav"),
        (0, b"fLaC", ".flac"),
        (0, b"OggS", ".ogg"),
        (0, b"ID3", ".mp3"),
        (0, b"\xff\xfb", ".mp3"),
        (0, b"\xff\xf3", ".mp3"),
        (0, b"\xff\xf2", ".mp3"),
    ],
}


def media_suffix(data: bytes, modality: str, field: str) -> str:
    """The file suffix of an uploaded picture or sound, from its first bytes; InvalidInput for anything else."""
    for offset, magic, suffix in SIGNATURES[modality]:
        if data[offset : offset + len(magic)] == magic:
            return suffix
    kinds = sorted({suffix.lstrip(".") for _, _, suffix in SIGNATURES[modality]})
    raise InvalidInput(f"{field} is not an {modality} file this service reads ({', '.join(kinds)})")


class ItemIn(RequestBody):
    id: str = Field(min_length=1, max_length=256, description="the item's id; an id the index holds is replaced")
    text: str | None = Field(None, max_length=100_000)
    image: str | None = Field(None, description="an image file, base64 or a data URI")
    audio: str | None = Field(None, description="an audio file, base64 or a data URI")
    metadata: dict = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("id must be printable")
        return v


class ItemsRequest(RequestBody):
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS)


class DeleteRequest(RequestBody):
    ids: list[str] = Field(min_length=1, max_length=100_000, description="ids of the items to delete")


def save_upload(media_root: Path, index: str, body: ItemsRequest, decode) -> Path:  # noqa: ANN001
    """Write the items as a corpus (``items.jsonl`` and its media files); returns the JSONL's path. ``decode``
    turns a base64 or data-URI field into bytes (or raises InvalidInput naming the field)."""
    ids = [it.id for it in body.items]
    if len(set(ids)) != len(ids):
        raise InvalidInput("items: every id must appear once")
    files: dict[str, bytes] = {}  # checked in full before anything is written: a refused request leaves nothing
    lines = []
    for i, item in enumerate(body.items):
        row: dict = {"id": item.id, "metadata": item.metadata}
        if item.text is not None:
            row["text"] = item.text
        for modality in ("image", "audio"):
            value = getattr(item, modality)
            if value is not None:
                field = f"items[{i}].{modality}"
                data = decode(value, field)
                name = f"{i:05d}{media_suffix(data, modality, field)}"
                files[name] = data
                row[modality] = name  # relative to the JSONL
        if len(row) == 2:
            raise InvalidInput(f"items[{i}] ({item.id!r}) has no text, image or audio")
        lines.append(json.dumps(row, ensure_ascii=False))
    folder = media_root / check_name(index) / secrets.token_hex(8)
    folder.mkdir(parents=True)
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    path = folder / "items.jsonl"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    os.chmod(folder, 0o755)
    return path
