"""What an input string holds (service.payloads.media_kind): image or audio files as data URIs or raw base64 (by
their first bytes), base64 data of another format, or a text; from real files of each format the models decode."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile
from PIL import Image

from models.errors import InvalidInput
from service.payloads import DATA, input_modality, media_kind


def image_file(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def sound_file(fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(1600, dtype=np.float32), 16000, format=fmt)
    return buf.getvalue()


FILES = [
    *[
        (f"image/{fmt}", "image", lambda fmt=fmt: image_file(fmt))
        for fmt in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")
    ],
    *[(f"audio/{fmt}", "audio", lambda fmt=fmt: sound_file(fmt)) for fmt in ("WAV", "FLAC", "OGG")],
    ("audio/MP3 (ID3 tag)", "audio", lambda: b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(200)),
    ("audio/MP3 (frames)", "audio", lambda: b"\xff\xfb\x90\x64" + bytes(200)),
]


@pytest.mark.parametrize(("name", "kind", "make"), FILES, ids=[name for name, _, _ in FILES])
def test_files_are_known_by_their_first_bytes(name: str, kind: str, make) -> None:
    raw = base64.b64encode(make()).decode()
    assert media_kind(raw) == kind
    assert media_kind(f"data:{name.split(' ')[0].lower()};base64,{raw}") == kind


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("a red circle", None),
        ("//todoFixThisLater", None),  # decodes to MP3's frame sync, but is not base64 data
        ("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", None),  # a hash: short
        ("QUJD" * 40, DATA),  # 160 base64 characters in a row: data, of no known format
        (base64.b64encode(b"\xff\xfb" + bytes(200)).decode(), "audio"),
    ],
)
def test_texts_stay_texts_and_unknown_data_is_data(text: str, kind: str | None) -> None:
    assert media_kind(text) == kind


def test_input_modality_refuses_files_as_text_and_data_without_a_modality() -> None:
    png = base64.b64encode(image_file("PNG")).decode()
    assert input_modality([png, png], None) == "image"
    assert input_modality(["a", "b"], None) == "text"
    with pytest.raises(InvalidInput, match="not text: set `modality`"):
        input_modality([png], "text")
    with pytest.raises(InvalidInput, match="one modality per request"):
        input_modality([png, "a caption"], None)
    with pytest.raises(InvalidInput, match=r"input\[1\] is base64 data"):
        input_modality(["a", "QUJD" * 40], None)
    assert input_modality(["QUJD" * 40], "image") == "image"  # said so: the decoder judges it
