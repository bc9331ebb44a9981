"""Several models in one service: an index built with xmodal-mini (384-d) and one built with a tiny CLIP exported in
the test (16-d, random weights: a real ONNX graph of another architecture and dimension) are served by one app;
each index's queries are encoded with its own model; /v1/models lists both; /v1/embeddings picks by `model`; a
model that XMODAL_MODELS leaves out, or that no bundle matches, refuses its index and the service is not ready."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from indexer.build import build_index
from indexer.corpus import read_jsonl
from models.bundle import DEFAULT_MODEL
from models.encoder import Encoder
from service.app import create_app
from service.settings import Settings
from tests.checkpoints import make_clip_checkpoint

CLIP = "tiny-clip"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 30), (20, 20, 20), (250, 250, 250)]


def png(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, served_data: Path) -> Path:
    """served_data (xmodal-mini, index `demo`) plus a tiny CLIP bundle and an index `pictures` built with it."""
    from models.export.clip import export_clip

    root = tmp_path_factory.mktemp("two-models")
    data = root / "data"
    shutil.copytree(served_data, data)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    export_clip(make_clip_checkpoint(ckpt), data / "models", CLIP)
    media = root / "media"
    media.mkdir()
    rows = []
    for i in range(12):
        path = media / f"p{i}.png"
        path.write_bytes(png(COLOURS[i % len(COLOURS)], i))
        rows.append({"id": f"pic-{i}", "image": str(path), "text": f"picture number {i}", "metadata": {"n": i}})
    corpus = root / "pictures.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = Encoder(data / "models" / CLIP, device="cpu")
    build_index(indexes_dir=data / "indexes", name="pictures", items=read_jsonl(corpus), encoder=encoder, use_gpu=False)
    return data


def client(data: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data, reload_interval_s=0, **settings)))


def test_each_index_is_searched_with_its_own_model(two_models: Path) -> None:
    clip = Encoder(two_models / "models" / CLIP, device="cpu")
    assert clip.dim != 384
    with client(two_models) as c:
        assert c.get("/readyz").status_code == 200
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert set(listed) == {DEFAULT_MODEL, CLIP}
        assert listed[DEFAULT_MODEL]["default"] and not listed[CLIP]["default"]
        assert listed[CLIP]["indexes"] == ["pictures"] and listed[DEFAULT_MODEL]["indexes"] == ["demo"]
        assert listed[CLIP]["dim"] == clip.dim and listed[CLIP]["fingerprint"] == clip.fingerprint

        text = "picture number 3"
        r = c.post("/v1/search", json={"index": "pictures", "query": {"text": text}, "k": 12, "modalities": ["image"]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == CLIP
        # the same ranking as the tiny CLIP's own text vector sent as the query
        vec = clip.encode_text([text])[0].tolist()
        by_vec = c.post(
            "/v1/search", json={"index": "pictures", "query": {"embedding": vec}, "k": 12, "modalities": ["image"]}
        )
        assert [x["id"] for x in r.json()["results"]] == [x["id"] for x in by_vec.json()["results"]]
        assert np.allclose(
            [x["similarity"] for x in r.json()["results"]],
            [x["similarity"] for x in by_vec.json()["results"]],
            atol=1e-5,
        )

        # an uploaded picture finds itself first through the CLIP image tower
        data = base64.b64encode(png(COLOURS[4], 4)).decode()
        r = c.post("/v1/search", json={"index": "pictures", "query": {"image": data}, "k": 3, "modalities": ["image"]})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "pic-4", r.text

        # the demo index is still xmodal-mini's, in the same process
        r = c.post("/v1/search", json={"index": "demo", "query": {"text": "a violinist plays"}, "k": 3})
        assert r.status_code == 200 and r.json()["model"] == DEFAULT_MODEL
        wrong_dim = c.post("/v1/search", json={"index": "demo", "query": {"embedding": vec}})
        assert wrong_dim.status_code == 400 and "has 384" in wrong_dim.json()["error"]["message"]

        # /v1/embeddings by model: its own vectors, and the default without `model`
        e = c.post("/v1/embeddings", json={"input": [text], "model": CLIP}).json()
        assert e["model"] == CLIP and np.allclose(e["data"][0]["embedding"], vec, atol=1e-5)
        by_fp = c.post("/v1/embeddings", json={"input": [text], "model": clip.fingerprint}).json()
        assert np.allclose(by_fp["data"][0]["embedding"], vec, atol=1e-5)
        default = c.post("/v1/embeddings", json={"input": [text]}).json()
        assert default["model"] == DEFAULT_MODEL and len(default["data"][0]["embedding"]) == 384
        # the same text, two models: two cache entries, not one answer for both
        assert not np.allclose(default["data"][0]["embedding"][: clip.dim], vec)

        # each model's lanes are batch series of their own
        lanes = {
            (s.labels["model"], s.labels["lane"]): s.value
            for family in text_string_to_metric_families(c.get("/metrics").text)
            for s in family.samples
            if s.name == "xmodal_batch_size_count"
        }
        mini = listed[DEFAULT_MODEL]["fingerprint"]
        assert set(lanes) == {
            (f"{CLIP}@{clip.fingerprint[:12]}", "text"),
            (f"{CLIP}@{clip.fingerprint[:12]}", "image"),
            (f"{DEFAULT_MODEL}@{mini[:12]}", "text"),
        }, lanes


def test_models_the_service_may_not_load_refuse_their_index(two_models: Path, tmp_path: Path) -> None:
    with client(two_models, models=DEFAULT_MODEL) as c:  # XMODAL_MODELS: these only
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "XMODAL_MODELS does not list" in ready.json()["refused_indexes"]["pictures"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [DEFAULT_MODEL]
        r = c.post("/v1/search", json={"index": "pictures", "query": {"text": "a"}})
        assert r.status_code == 503 and "tiny-clip" in r.json()["error"]["message"]
        assert c.post("/v1/search", json={"index": "demo", "query": {"text": "a"}}).status_code == 200

    # a fresh replica whose models folder lacks the bundle: the index is refused, the replica is not ready
    data = tmp_path / "data"
    shutil.copytree(two_models, data)
    shutil.rmtree(data / "models" / CLIP)
    with client(data) as c:
        ready = c.get("/readyz").json()
        assert ready["ready"] is False and "has the fingerprint" in ready["refused_indexes"]["pictures"]
        assert c.post("/v1/search", json={"index": "demo", "query": {"text": "a"}}).status_code == 200


def test_adds_and_rebuilds_use_the_index_own_model(two_models: Path, tmp_path: Path) -> None:
    """The default model is xmodal-mini, yet an add to (and a rebuild of) the tiny-CLIP index encodes with tiny CLIP,
    found among the bundles by the index's fingerprint: with xmodal-mini the add would be refused."""
    from service.index_ops import add_corpus
    from service.jobs import rebuild

    data = tmp_path / "data"
    shutil.copytree(two_models, data)
    settings = Settings(data_dir=data)
    assert settings.model == DEFAULT_MODEL
    picture = tmp_path / "new.png"
    picture.write_bytes(png((200, 0, 200), 99))
    corpus = tmp_path / "more.jsonl"
    corpus.write_text(json.dumps({"id": "pic-new", "image": str(picture), "text": "a purple picture"}) + "\n")
    added = add_corpus(settings, "pictures", corpus)
    assert added.model.name == CLIP and added.counts["image"] == 13
    rebuilt = rebuild(settings, "pictures", {"from": "current"}, lambda done, total: None)
    with client(data) as c:
        assert c.get("/v1/indexes/pictures").json()["version"] == rebuilt
        query = {"image": base64.b64encode(picture.read_bytes()).decode()}
        r = c.post("/v1/search", json={"index": "pictures", "query": query, "k": 1, "modalities": ["image"]})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "pic-new" and r.json()["model"] == CLIP
