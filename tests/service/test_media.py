"""The routes that show an index's own items (media file, thumbnail, waveform) and the search page's static files,
through the real app over the tri-modal `media` index: by item id only, right types, caching, no path tricks."""

from __future__ import annotations

import io
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.layout import ITEMS, IndexDir
from models.encoder import Encoder
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(late_data: Path):
    with TestClient(create_app(Settings(data_dir=late_data, reload_interval_s=0))) as c:
        yield c


def media(client: TestClient, kind: str, item: str, index: str = "media", **params):
    return client.get(f"/v1/indexes/{index}/{kind}", params={"id": item, **params})


def test_media_file_by_id_with_type_and_caching(client: TestClient, media_corpus: Path) -> None:
    png = media_corpus.parent / "images" / "img-00003.png"
    r = media(client, "media", "img-00003", modality="image")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content == png.read_bytes()
    assert (
        r.headers["cache-control"].startswith("public, max-age=") and r.headers["x-content-type-options"] == "nosniff"
    )
    again = client.get(
        "/v1/indexes/media/media", params={"id": "img-00003"}, headers={"if-none-match": r.headers["etag"]}
    )
    assert again.status_code == 304 and not again.content

    flac = media_corpus.parent / "sounds" / "snd-00004.flac"
    r = media(client, "media", "snd-00004", modality="audio")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/flac" and r.content == flac.read_bytes()
    part = client.get(
        "/v1/indexes/media/media", params={"id": "snd-00004", "modality": "audio"}, headers={"range": "bytes=0-99"}
    )
    assert part.status_code == 206 and part.content == flac.read_bytes()[:100]  # seeking in the page's player


def test_thumbnail_is_the_models_view_and_cached(client: TestClient, media_corpus: Path, encoder: Encoder) -> None:
    r = media(client, "thumbnail", "img-00003", size=128)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and thumb.size == (128, 128)
    # the same picture the image tower sees (xmodal-mini squashes to 64x64): close to it pixel by pixel
    pre = encoder.preprocessor("image")
    view = pre.decode(media_corpus.parent / "images" / "img-00003.png").resize((128, 128))
    diff = np.abs(np.asarray(thumb, dtype=np.int16) - np.asarray(view, dtype=np.int16)).mean()
    assert diff < 8, diff
    assert media(client, "thumbnail", "img-00003", size=128).content == r.content
    assert media(client, "thumbnail", "img-00003", size=100).status_code == 422
    assert all(media(client, "thumbnail", "img-00003", size=n).status_code == 200 for n in (64, 256, 512))


def test_view_box_follows_resize_and_centre_crop(encoder: Encoder) -> None:
    from models.bundle import ImagePreprocessing
    from models.image import ImagePreprocessor

    clip = ImagePreprocessing(
        size=224, crop_size=224, resize_mode="shortest_edge", mean=[0.5] * 3, std=[0.5] * 3, rescale_factor=1 / 255
    )
    # a 400x200 picture: resized to 448x224, the centre 224 columns kept, i.e. x from 100 to 300 of the original
    assert ImagePreprocessor(clip).view_box(400, 200) == pytest.approx((100, 0, 300, 200))
    mini = encoder.preprocessor("image")
    assert mini.view_box(300, 100) == (0, 0, 300, 100)  # exact resize: the whole picture, squashed


def test_waveform_spans_the_clip_window(client: TestClient, media_corpus: Path, encoder: Encoder) -> None:
    r = media(client, "waveform", "snd-00004")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)
    assert picture.shape == (96, 480, 3)
    trace = ((picture[:, :, 1] > 150) & (picture[:, :, 0] < 150)).sum(axis=0)  # green pixels per column
    # the sound as the audio tower hears it: its first clip_seconds, each column an equal slice of that window
    pre = encoder.preprocessor("audio")
    wave = pre.decode(media_corpus.parent / "sounds" / "snd-00004.flac")[: pre.config.clip_samples]
    edges = np.linspace(0, pre.config.clip_samples, 481).astype(int)
    wave = wave / np.abs(wave).max()
    slices = [wave[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    # each column is drawn from the slice's max to its min over a 46-pixel half-height; nothing past the sound's end
    expected = np.array([(x.max() - x.min()) * 46 + 1 if x.size else 0 for x in slices])
    assert np.abs(trace - expected).max() <= 3, np.abs(trace - expected).max()
    assert trace.max() >= 80 and trace.min() < 20  # it is this sound's shape, not a flat bar


@pytest.mark.parametrize(
    "item",
    ["img-99999", "../../../../etc/passwd", "/etc/passwd", "images/img-00003.png", "img-00003.png", "%2e%2e%2f"],
)
def test_ids_not_in_the_index_and_path_tricks_are_404(client: TestClient, item: str) -> None:
    for kind, params in (("media", {"modality": "image"}), ("thumbnail", {}), ("waveform", {})):
        r = media(client, kind, item, **params)
        assert r.status_code == 404, (kind, item, r.text)
        assert r.json()["error"]["code"] == "media_not_found"


def test_wrong_modality_unknown_index_and_names_are_refused(client: TestClient) -> None:
    assert media(client, "waveform", "img-00003").status_code == 404  # a picture has no sound
    assert media(client, "media", "img-00003", modality="text").status_code == 422
    assert media(client, "media", "img-00003", index="nope").json()["error"]["code"] == "index_not_found"
    assert client.get("/v1/indexes/..%2F..%2Fetc/media", params={"id": "x"}).status_code == 404
    assert media(client, "media", "").status_code == 422
    assert client.get("/static/../service/settings.py").status_code == 404


def test_results_say_which_items_have_media(client: TestClient) -> None:
    r = client.post("/v1/search", json={"index": "media", "query": {"text": "two red circles"}, "k": 10})
    results = r.json()["results"]
    assert results
    for hit in results:
        assert hit["media"] == (["image"] if hit["id"].startswith("img-") else ["audio"]), hit


def test_the_page_is_self_contained(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200, asset
        assert "http://" not in r.text and "https://" not in r.text  # no CDN, no outside address
    assert "http://" not in page.text and "https://" not in page.text
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not part of the API


def test_media_off_and_indexes_built_before_media_paths(tmp_path: Path, late_data: Path) -> None:
    with TestClient(create_app(Settings(data_dir=late_data, reload_interval_s=0, serve_media=False))) as c:
        r = media(c, "media", "img-00003")
        assert r.status_code == 404 and "XMODAL_SERVE_MEDIA" in r.json()["error"]["message"]
    # an index written before sources were absolute paths: no media offered, a message that says to rebuild
    data = tmp_path / "data"
    shutil.copytree(late_data / "models", data / "models")
    shutil.copytree(late_data / "indexes", data / "indexes")
    d = IndexDir(data / "indexes", "media")
    (ref,) = d.manifest().segments
    con = sqlite3.connect(d.segment_dir(ref.id) / ITEMS)
    con.execute("UPDATE items SET source = 'corpus.jsonl:' || row WHERE modality = 'audio'")
    con.commit()
    con.close()
    # such builds wrote no checksums either: serve it unchecked
    with TestClient(create_app(Settings(data_dir=data, reload_interval_s=0, verify_checksums=False))) as c:
        r = media(c, "media", "snd-00004", modality="audio")
        assert r.status_code == 404 and "rebuild" in r.json()["error"]["message"]
        out = c.post("/v1/search", json={"index": "media", "query": {"text": "beeps"}, "modalities": ["audio"]})
        assert all(hit["media"] == [] for hit in out.json()["results"])
