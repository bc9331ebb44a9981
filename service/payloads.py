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


def input_modality(inputs: list[str], given: str | None) -> str:
    """The inputs' modality: as given, or image/audio when every input is such a data URI, else text. An image or
    audio data URI among texts is refused, not embedded as text."""
    kinds = {m.group(1).lower() if (m := MEDIA_URI.match(x)) else "text" for x in inputs}
    if given is None:
        if len(kinds) > 1:
            raise InvalidInput(f"input mixes {sorted(kinds)}: one modality per request", param="input")
        return kinds.pop() if kinds else "text"
    if given == "text" and kinds - {"text"}:
        raise InvalidInput(
            f"input holds {'/'.join(sorted(kinds - {'text'}))} data URIs: set `modality` to embed them",
            param="modality",
        )
    return given


def upload_modality(file: UploadFile) -> str:
    """audio for an audio/* content type or an audio file extension, else image."""
    if (file.content_type or "").startswith("audio/"):
        return "audio"
    return "audio" if Path(file.filename or "").suffix.lower() in AUDIO_SUFFIXES else "image"
