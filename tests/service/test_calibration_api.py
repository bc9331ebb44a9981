"""`calibration` through the real app over HTTP: every method accepted (JSON and multipart), an unknown one a 422,
the one applied reported, and an index built before the fits served with the fallback."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.calibration import METHODS
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(late_data: Path):
    with TestClient(create_app(Settings(data_dir=late_data, reload_interval_s=0))) as c:
        yield c


def sound(media_corpus: Path, n: int = 7) -> bytes:
    return (media_corpus.parent / "sounds" / f"snd-{n:05d}.flac").read_bytes()


@pytest.mark.parametrize("mode", ["dense", "late"])
@pytest.mark.parametrize("method", METHODS)
def test_every_calibration_is_accepted_and_a_sound_finds_itself(
    client: TestClient, media_corpus: Path, method: str, mode: str
) -> None:
    body = {"index": "media", "query": {"audio": base64.b64encode(sound(media_corpus)).decode()}, "k": 10}
    r = client.post("/v1/search", json=body | {"calibration": method, "mode": mode})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["calibration"] == method
    top = out["results"][0]
    assert top["id"] == "snd-00007" and top["modality"] == "audio" and top["similarity"] > 0.999
    if method in ("platt", "isotonic"):
        assert top["score"] == 1.0 and all(0 <= x["score"] <= 1 for x in out["results"])


def test_default_calibration_and_one_target(client: TestClient) -> None:
    r = client.post("/v1/search", json={"index": "media", "query": {"text": "two red circles"}, "k": 10})
    assert r.status_code == 200 and r.json()["calibration"] == "isotonic"
    one = client.post(
        "/v1/search", json={"index": "media", "query": {"text": "two red circles"}, "k": 5, "modalities": ["image"]}
    ).json()
    assert one["calibration"] is None and all(x["score"] == x["similarity"] for x in one["results"])
    # a raw embedding has no modality to calibrate from: raw cosines
    vec = client.post("/v1/embeddings", json={"input": "two red circles"}).json()["data"][0]["embedding"]
    raw = client.post("/v1/search", json={"index": "media", "query": {"embedding": vec}, "k": 5}).json()
    assert raw["calibration"] == "raw" and all(x["score"] == x["similarity"] for x in raw["results"])


def test_requests_of_other_calibrations_are_cached_apart(client: TestClient) -> None:
    body = {"index": "media", "query": {"text": "a low hum"}, "k": 10}
    first = client.post("/v1/search", json=body | {"calibration": "rrf"}).json()
    other = client.post("/v1/search", json=body | {"calibration": "raw"}).json()
    assert other["cached"] is False and other["calibration"] == "raw"
    assert [x["score"] for x in first["results"]] != [x["score"] for x in other["results"]]


def test_unknown_calibration_is_a_422(client: TestClient, media_corpus: Path) -> None:
    r = client.post("/v1/search", json={"index": "media", "query": {"text": "a"}, "calibration": "softmax"})
    assert r.status_code == 422 and "calibration" in r.text
    r = client.post(
        "/v1/search/file",
        data={"index": "media", "k": "3", "calibration": "softmax"},
        files={"file": ("q.flac", sound(media_corpus), "audio/flac")},
    )
    assert r.status_code == 422 and "calibration" in r.text


def test_upload_with_a_calibration(client: TestClient, media_corpus: Path) -> None:
    r = client.post(
        "/v1/search/file",
        data={"index": "media", "k": "5", "calibration": "platt"},
        files={"file": ("q.flac", sound(media_corpus, 11), "audio/flac")},
    )
    assert r.status_code == 200, r.text
    assert r.json()["calibration"] == "platt" and r.json()["results"][0]["id"] == "snd-00011"


def test_an_index_built_before_the_fits_serves_with_the_fallback(
    tmp_path: Path, late_data: Path, media_corpus: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(late_data / "models", data / "models")
    shutil.copytree(late_data / "indexes" / "media", data / "indexes" / "media")
    for manifest in (data / "indexes" / "media" / "versions").glob("*.json"):  # what searches read their fits from
        old = json.loads(manifest.read_text())
        del old["score_calibration"], old["tokens"]["score_calibration"]
        manifest.write_text(json.dumps(old))
    audio = base64.b64encode(sound(media_corpus)).decode()
    with TestClient(create_app(Settings(data_dir=data, reload_interval_s=0))) as c:
        assert c.get("/v1/indexes").json()["refused"] == {}
        for mode in ("dense", "late"):
            for method in (None, "isotonic"):
                body = {"index": "media", "query": {"audio": audio}, "k": 5, "mode": mode, "calibration": method}
                r = c.post("/v1/search", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["calibration"] == "zscore" and r.json()["results"][0]["id"] == "snd-00007"
