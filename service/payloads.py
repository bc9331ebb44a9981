"""Media as requests carry them: base64 or data URIs in JSON, uploads with a content type or a file name; which
modality a request's inputs are."""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

from fastapi import UploadFile

from indexer.corpus import AUDIO_SUFFIXES
from models.errors import InvalidInput

MEDIA_URI = re.compile(r"^data:(image|audio)/[\w.+-]+;base64,", re.IGNORECASE)
BASE64_HEAD = re.compile(r"[A-Za-z0-9+/]{16}")  # the first 16 characters (12 bytes) of a file as raw base64
# 128 base64 characters in a row, no space nor punctuation: data, not prose (a text is never embedded as such)
BASE64_DATA = re.compile(r"[A-Za-z0-9+/]{128}")
# The leading bytes of the image and audio files the models decode (Pillow's and soundfile's formats), as (offset,
# bytes) that must all be there: what raw base64 holding such a file decodes to first. ``strong``: unlike any text's
# first 16 characters; the others (MP3's 2-byte frame sync, which a text such as "//todo..." decodes to) count only
# in a string that is base64 data (BASE64_DATA).
SIGNATURES: list[tuple[str, tuple[tuple[int, bytes], ...], bool]] = [
    ("image", ((0, b"\x89PNG\r\n\x1a\n"),), True),
    ("image", ((0, b"\xff\xd8\xff"),), True),  # JPEG
    ("image", ((0, b"GIF8"),), True),
    ("image", ((0, b"RIFF"), (8, b"WEBP")), True),
    ("image", ((0, b"II*\x00"),), True),  # TIFF
    ("image", ((0, b"MM\x00*"),), True),
    ("image", ((0, b"BM"), (6, b"\x00\x00\x00\x00")), True),  # BMP: its reserved bytes are zeros
    ("audio", ((0, b"RIFF"), (8, b"WAVE")), True),
    ("audio", ((0, b"fLaC"),), True),
    ("audio", ((0, b"OggS"),), True),
    ("audio", ((0, b"ID3"),), True),  # MP3 with a tag
    ("audio", ((0, b"\xff\xfb"),), False),  # MP3 frames (MPEG-1 layer III), and MPEG-2 below
    ("audio", ((0, b"\xff\xf3"),), False),
    ("audio", ((0, b"\xff\xf2"),), False),
]
DATA = "data"  # media_kind of base64 data of no format above


def decode_base64(value: str, field: str) -> bytes:
    """Raw base64 or a data URI (``data:image/png;base64,...``)."""
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise InvalidInput(f"{field}: only base64 data URIs are supported", param=field)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field} is not valid base64", param=field) from None
    if not data:
        raise InvalidInput(f"{field} is empty", param=field)
    return data


def media_kind(value: str) -> str | None:
    """What an input string holds: ``image`` or ``audio`` (a data URI of one, or raw base64 that starts with an image
    or audio file's signature), DATA (raw base64 data of another format), or None (a text). Reads the first 128
    characters at most."""
    if m := MEDIA_URI.match(value):
        return m.group(1).lower()
    if not BASE64_HEAD.match(value):
        return None
    data = BASE64_DATA.match(value) is not None
    head = base64.b64decode(value[:16])
    for kind, parts, strong in SIGNATURES:
        if (strong or data) and all(head[at : at + len(magic)] == magic for at, magic in parts):
            return kind
    return DATA if data else None


def input_modality(inputs: list[str], given: str | None) -> str:
    """The inputs' modality: as given, or image/audio when every input is such a file (a data URI, or raw base64 of
    a known image or audio format), else text. A file, or base64 data, is never embedded as text: among texts, or
    with `modality: text`, it is refused; base64 data of an unknown format needs `modality`."""
    kinds = [media_kind(x) for x in inputs]
    if given is None and DATA in kinds:
        i = kinds.index(DATA)
        raise InvalidInput(
            f"input[{i}] is base64 data of no image or audio format recognised from its first bytes: set `modality` "
            "(image or audio) to embed it as a file, or send it as a data URI (data:image/png;base64,...)",
            param="modality",
        )
    found = {k or "text" for k in kinds}
    if given is None:
        if len(found) > 1:
            raise InvalidInput(f"input mixes {sorted(found)}: one modality per request", param="input")
        return found.pop() if found else "text"
    if given == "text" and found - {"text"}:
        files = "/".join(sorted(k if k != DATA else "base64" for k in found - {"text"}))
        raise InvalidInput(
            f"input holds {files} data (data URIs or raw base64), not text: set `modality` to embed them as files",
            param="modality",
        )
    return given


def upload_modality(file: UploadFile) -> str:
    """audio for an audio/* content type or an audio file extension, else image."""
    if (file.content_type or "").startswith("audio/"):
        return "audio"
    return "audio" if Path(file.filename or "").suffix.lower() in AUDIO_SUFFIXES else "image"
