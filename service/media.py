"""The media of an index's own items, for the search page: the original file, a thumbnail of a picture as the
model saw it (its centre crop, so late-interaction patches line up), a waveform of a sound over the model's clip
window (so matched frames line up).

Files are found by item id in the served version's item store, never from a path in a request. Pictures are
rendered with Pillow and kept in a byte-bounded LRU keyed by index version, so a republished index never shows
stale media.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cachetools import LRUCache
from PIL import Image, ImageDraw

from indexer.search import LoadedIndex
from models.encoder import Encoder
from models.errors import InvalidInput, NotFound

MEDIA_MODALITIES = ("image", "audio")
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".mp3": "audio/mpeg",
}
WAVE_SIZE = (480, 96)


class MediaNotFound(NotFound):
    code = "media_not_found"


@dataclass(frozen=True)
class MediaFile:
    path: Path
    content_type: str
    etag: str  # changes with the index version and the file


def _showable(source: str) -> bool:
    """A media row's source is its file's absolute path in indexes built since media paths are stored."""
    path = Path(source)
    return path.is_absolute() and path.suffix.lower() in CONTENT_TYPES


def media_of(index: LoadedIndex, ids: list[str]) -> dict[str, list[str]]:
    """For each of ``ids``: the modalities it has a file of to show (one item-store query; no disk access)."""
    found = index.items.sources(ids, MEDIA_MODALITIES)
    return {i: sorted(m for m, src in rows.items() if _showable(src)) for i, rows in found.items()}


def find_media(index: LoadedIndex, item_id: str, modality: str) -> MediaFile:
    """The file of ``item_id``'s ``modality`` row in the served version, or MediaNotFound saying why."""
    if modality not in MEDIA_MODALITIES:
        raise InvalidInput(f"modality must be one of {list(MEDIA_MODALITIES)}, not {modality!r}")
    source = index.items.sources([item_id], (modality,)).get(item_id, {}).get(modality)
    if source is None:
        raise MediaNotFound(f"index {index.name!r} has no {modality} for item {item_id!r}")
    path = Path(source)
    if not _showable(source):
        raise MediaNotFound(
            f"index {index.name!r} version {index.version} does not record the {modality} file of item {item_id!r} "
            "(built before media paths were stored: rebuild the index to show its media)"
        )
    try:
        stat = path.stat()
    except OSError:
        raise MediaNotFound(f"the {modality} file of item {item_id!r} is no longer on disk") from None
    etag = f'"{index.version}-{stat.st_size:x}-{int(stat.st_mtime):x}"'
    return MediaFile(path, CONTENT_TYPES[path.suffix.lower()], etag)


class MediaRenderer:
    """Thumbnails and waveforms, rendered once per (index version, item, size) and kept within ``max_bytes``."""

    def __init__(self, max_bytes: int, concurrent: int = 2) -> None:
        self._cache: LRUCache = LRUCache(maxsize=max(max_bytes, 1), getsizeof=len)
        self._lock = threading.Lock()
        # Decoding a large picture costs memory; a few at a time, whatever the page's concurrency.
        self._renders = threading.BoundedSemaphore(concurrent)

    def thumbnail(self, index: LoadedIndex, encoder: Encoder, media: MediaFile, item_id: str, size: int) -> bytes:
        key = ("thumb", index.name, index.version, item_id, size)
        return self._cached(key, item_id, "image", lambda: render_thumbnail(encoder, media.path, size))

    def waveform(self, index: LoadedIndex, encoder: Encoder, media: MediaFile, item_id: str) -> bytes:
        key = ("wave", index.name, index.version, item_id)
        return self._cached(key, item_id, "audio", lambda: render_waveform(encoder, media.path, *WAVE_SIZE))

    def _cached(self, key: tuple, item_id: str, modality: str, render: Callable[[], bytes]) -> bytes:
        with self._lock:
            found = self._cache.get(key)
        if found is not None:
            return found
        with self._renders:
            try:
                found = render()
            except InvalidInput as exc:  # the file on disk is broken, not the request
                raise MediaNotFound(f"the {modality} file of item {item_id!r} cannot be shown: {exc.message}") from None
        if len(found) <= self._cache.maxsize:
            with self._lock:
                self._cache[key] = found
        return found


def render_thumbnail(encoder: Encoder, path: Path, size: int) -> bytes:
    """A ``size`` x ``size`` JPEG of what the image tower sees: the same centre crop (decoded with the tower's own
    pixel limit and EXIF handling)."""
    pre = encoder.preprocessor("image")
    image = pre.decode(path)
    view = image.crop(tuple(round(v) for v in pre.view_box(*image.size)))
    view = view.resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    view.save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()


def render_waveform(encoder: Encoder, path: Path, width: int, height: int) -> bytes:
    """A PNG of the sound's peak envelope across the audio tower's clip window (``clip_seconds``; a longer sound
    is shown as far as the model hears it, a shorter one ends early), so frame spans map to x linearly."""
    pre = encoder.preprocessor("audio")
    window = pre.config.clip_samples
    heard = pre.decode(path)[:window]
    edges = np.linspace(0, window, width + 1).astype(int)
    image = Image.new("RGB", (width, height), (23, 27, 36))
    draw = ImageDraw.Draw(image)
    mid, half = height / 2, height / 2 - 2
    scale = 1.0 / max(float(np.abs(heard).max(initial=0.0)), 1e-3)
    draw.line([(0, mid), (width, mid)], fill=(60, 66, 80))
    for x in range(width):
        column = heard[edges[x] : edges[x + 1]]
        if column.size:
            lo, hi = float(column.min()) * scale, float(column.max()) * scale
            draw.line([(x, mid - hi * half), (x, mid - lo * half)], fill=(94, 200, 160))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
