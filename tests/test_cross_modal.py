"""Cross-modal indexing and search with a CLIP bundle exported by the CLI from a tiny random checkpoint, on
the real COCO photos of ../shared/data (skipped cleanly when that folder is absent). Random weights make
the ranking meaningless across modalities, so the checks are the mechanics: every photo indexes, broken
files are skipped and counted, same-modality queries find their own item exactly as exact search does,
results never repeat an item, and mixed-modality scores are calibrated."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.build import build_index
from indexer.corpus import read_corpus
from indexer.layout import IndexDir
from indexer.search import LoadedIndex
from indexer.tuning import exact_topk
from models.encoder import Encoder
from service.app import create_app
from service.settings import Settings
from tests.conftest import SHARED_DATA, write_corpus

pytest.importorskip("torch", reason="exporting the CLIP checkpoint needs the `export` extra")
pytestmark = pytest.mark.slow
COCO = SHARED_DATA / "coco-mini"


@pytest.fixture(scope="module")
def coco() -> list[dict]:
    if not (COCO / "captions.jsonl").is_file():
        pytest.skip(f"the COCO sample is not at {COCO} (../shared/data is absent on this machine)")
    return [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with the tiny CLIP bundle, exported through `xmodal models export` (arch detected)."""
    from tests.checkpoints import make_clip_checkpoint

    root = tmp_path_factory.mktemp("xmodal")
    checkpoint = make_clip_checkpoint(tmp_path_factory.mktemp("clip-checkpoint"))
    assert "towers image, text" in export_with_cli(root, checkpoint, "tiny-clip")
    return root


def export_with_cli(root: Path, checkpoint: Path, name: str) -> str:
    """`xmodal models export CHECKPOINT --name NAME` into data folder ``root`` (arch detected); its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")} | {"XMODAL_DATA_DIR": str(root)}
    r = subprocess.run(
        [sys.executable, "-m", "service", "models", "export", str(checkpoint), "--name", name],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def clip_encoder(data: Path) -> Encoder:
    return Encoder(data / "models" / "tiny-clip", device="cpu")


@pytest.fixture(scope="module")
def built(data: Path, clip_encoder: Encoder, coco: list[dict], tmp_path_factory: pytest.TempPathFactory):
    corpus_dir = tmp_path_factory.mktemp("corpus")
    (corpus_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (corpus_dir / "truncated.jpg").write_bytes((COCO / coco[0]["image"]).read_bytes()[:2000])
    rows = [
        {
            "id": c["id"],
            "text": c["captions"][0],
            "image": str(COCO / c["image"]),
            "metadata": {"license": c["license"]},
        }
        for c in coco
    ]
    rows += [{"id": "broken", "image": "broken.jpg"}, {"id": "truncated", "image": "truncated.jpg", "text": "a cut"}]
    corpus = write_corpus(corpus_dir / "coco.jsonl", rows)
    result = build_index(
        indexes_dir=data / "indexes",
        name="coco",
        items=read_corpus(corpus),
        encoder=clip_encoder,
        corpus_path=corpus,
        use_gpu=False,
    )
    return result.manifest


def test_every_coco_photo_indexes_and_broken_files_are_counted(data: Path, built, coco: list[dict]) -> None:
    assert built.counts == {"text": len(coco) + 1, "image": len(coco)}
    assert built.build["failed"] == 2
    assert sorted(f["id"] for f in built.build["failures"]) == ["broken", "truncated"]
    assert all(f["modality"] == "image" and f["error"] for f in built.build["failures"])
    (ref,) = built.segments
    segment = IndexDir(data / "indexes", "coco").segment_manifest(ref.id)
    assert segment.rows == {"text": [0, len(coco) + 1], "image": [len(coco) + 1, 2 * len(coco) + 1]}
    assert set(built.calibration) == {"text->text", "text->image", "image->text", "image->image"}


def test_image_to_image_equals_exact_search(data: Path, built, clip_encoder: Encoder, coco: list[dict]) -> None:
    index = LoadedIndex(data / "indexes", "coco", use_gpu=False, expect_fingerprint=clip_encoder.fingerprint)
    image_rows = [row for row, _, modality, *_ in index.items.all_rows() if modality == "image"]
    vectors = index.vectors(image_rows)
    ids = [index.items.get([r])[r]["id"] for r in image_rows]
    queries = clip_encoder.encode_media("image", [clip_encoder.decode("image", COCO / c["image"]) for c in coco[:5]])
    for q, c, truth in zip(queries, coco[:5], exact_topk(queries, vectors, 5), strict=True):
        hits = index.search(q, 5, modalities=["image"], query_modality="image")
        assert [h.id for h in hits] == [ids[t] for t in truth]
        assert hits[0].id == c["id"] and hits[0].similarity > 0.999
        assert all(h.modality == "image" and h.score == h.similarity for h in hits)  # one modality: raw cosine


def test_image_token_vectors(clip_encoder: Encoder, coco: list[dict]) -> None:
    images = [clip_encoder.decode("image", COCO / c["image"]) for c in coco[:3]]
    out = clip_encoder.encode_media_tokens("image", images)
    assert np.allclose(out.embedding, clip_encoder.encode_media("image", images), atol=1e-6)
    for tokens in out.tokens:  # one token per 8x8 patch of the 32 px input, CLS left out
        assert tokens.shape == (16, clip_encoder.dim)
        assert np.allclose(np.linalg.norm(tokens, axis=1), 1, atol=1e-5)


def test_mixed_modalities_are_calibrated_and_deduplicated(data: Path, built, clip_encoder: Encoder, coco) -> None:
    index = LoadedIndex(data / "indexes", "coco", use_gpu=False)
    q = clip_encoder.encode_text([coco[3]["captions"][0]])[0]
    hits = index.search(q, 20, query_modality="text")
    assert len({h.id for h in hits}) == len(hits) == 20
    assert {h.modality for h in hits} <= {"text", "image"}
    top = hits[0]
    assert top.id == coco[3]["id"] and top.modality == "text"
    assert top.similarity > 0.999 and top.score == 1.0  # the caption itself: a duplicate, certainly relevant
    # fitted for this CLIP export too: a photo and its caption are a relevant pair, other photos are not
    fitted = built.score_calibration["pairs"]
    assert set(fitted) == {"text->text", "text->image", "image->text", "image->image"}
    assert fitted["text->image"]["positives"] > 0 and fitted["text->image"]["platt"]["a"] > 0
    assert all(0 <= h.score <= 1 for h in hits)  # the default: probabilities of relevance (isotonic)
    zhits = index.search(q, 20, query_modality="text", calibration="zscore")
    stats = built.calibration
    for h in zhits[1:]:
        pair = stats[f"text->{h.modality}"]
        assert h.score == pytest.approx((h.similarity - pair["mean"]) / pair["std"], rel=1e-6)
    # A raw embedding has no known modality: no calibration, raw cosines.
    raw = index.search(q, 5)
    assert all(h.score == h.similarity for h in raw)


def test_image_queries_over_http(data: Path, built, coco: list[dict]) -> None:
    photo = (COCO / coco[7]["image"]).read_bytes()
    settings = Settings(data_dir=data, model="tiny-clip", reload_interval_s=0)
    with TestClient(create_app(settings)) as client:
        assert set(client.get("/readyz").json()["model"]["providers"]) == {"text", "image"}
        body = {"index": "coco", "query": {"image": base64.b64encode(photo).decode()}, "k": 3, "modalities": ["image"]}
        first = client.post("/v1/search", json=body).json()
        assert first["results"][0]["id"] == coco[7]["id"] and first["results"][0]["modality"] == "image"
        uri = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
        again = client.post("/v1/search", json=body | {"query": {"image": uri}}).json()
        assert [r["id"] for r in again["results"]] == [r["id"] for r in first["results"]]
        upload = client.post(
            "/v1/search/file",
            data={"index": "coco", "k": "3", "modalities": "image"},
            files={"file": ("q.jpg", photo, "image/jpeg")},
        ).json()
        assert [r["id"] for r in upload["results"]] == [r["id"] for r in first["results"]]
        assert upload["cached"] is True  # same bytes, same request: the JSON search's cached result
        emb = client.post("/v1/embeddings", json={"input": [uri], "modality": "image", "tokens": True}).json()
        assert np.array(emb["data"][0]["tokens"]).shape == (16, 16)  # 16 patches of the 32 px input, dim 16
        by_vector = client.post("/v1/search", json=body | {"query": {"embedding": emb["data"][0]["embedding"]}})
        assert [r["id"] for r in by_vector.json()["results"]] == [r["id"] for r in first["results"]]
        bad = client.post("/v1/search", json=body | {"query": {"image": base64.b64encode(b"GIF89a junk").decode()}})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_input"


def test_a_folder_of_images_with_captions(tmp_path: Path, clip_encoder: Encoder, coco: list[dict]) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for c in coco[:4]:
        name = Path(c["image"]).name
        (folder / "sub" / name).write_bytes((COCO / c["image"]).read_bytes())
        (folder / "sub" / name).with_suffix(".txt").write_text(c["captions"][1])
    (folder / "notes.txt").write_text("a lone text item")
    (folder / ".hidden.jpg").write_bytes(b"ignored")
    items = read_corpus(folder)
    assert sorted(i.id for i in items) == sorted([f"sub/{Path(c['image']).name}" for c in coco[:4]] + ["notes.txt"])
    m = build_index(
        indexes_dir=tmp_path / "ix", name="photos", items=items, encoder=clip_encoder, corpus_path=folder, use_gpu=False
    ).manifest
    assert m.counts == {"text": 5, "image": 4} and m.build["failed"] == 0


def test_text_only_model_refuses_an_image_corpus(tmp_path: Path, coco, served_data: Path) -> None:
    from models.errors import InvalidInput

    text_only = Encoder(served_data / "models" / "all-minilm-l6-v2", device="cpu")
    items = [read_corpus(write_corpus(tmp_path / "c.jsonl", [{"id": "a", "image": str(COCO / coco[0]["image"])}]))][0]
    with pytest.raises(InvalidInput, match="only has \\['text'\\]"):
        build_index(indexes_dir=tmp_path, name="x", items=items, encoder=text_only, use_gpu=False)


# --- audio: a tiny CLAP bundle and the real spoken digits ------------------------------------------------------------
FSDD = SHARED_DATA / "fsdd" / "recordings"


@pytest.fixture(scope="module")
def clap_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import make_clap_checkpoint

    if not FSDD.is_dir():
        pytest.skip(f"the spoken digits are not at {FSDD} (../shared/data is absent on this machine)")
    root = tmp_path_factory.mktemp("xmodal-audio")
    checkpoint = tmp_path_factory.mktemp("clap-checkpoint")
    make_clap_checkpoint(checkpoint)
    assert "towers audio, text" in export_with_cli(root, checkpoint, "tiny-clap")
    return root


def test_every_spoken_digit_indexes_and_audio_queries_work(clap_data: Path) -> None:
    encoder = Encoder(clap_data / "models" / "tiny-clap", device="cpu")
    items = read_corpus(FSDD)  # a folder: every WAV is an item, its id the file name
    assert len(items) == 3000 and all(i.audio is not None for i in items)
    m = build_index(
        indexes_dir=clap_data / "indexes", name="digits", items=items, encoder=encoder, corpus_path=FSDD, use_gpu=False
    ).manifest
    assert m.counts == {"audio": 3000} and m.build["failed"] == 0

    clip = (FSDD / "7_jackson_3.wav").read_bytes()
    with TestClient(create_app(Settings(data_dir=clap_data, model="tiny-clap", reload_interval_s=0))) as client:
        assert set(client.get("/readyz").json()["model"]["providers"]) == {"text", "audio"}
        upload = client.post(
            "/v1/search/file", data={"index": "digits", "k": "3"}, files={"file": ("q.wav", clip, "audio/wav")}
        ).json()
        assert upload["results"][0]["id"] == "7_jackson_3.wav" and upload["results"][0]["similarity"] > 0.999
        body = {"index": "digits", "query": {"audio": base64.b64encode(clip).decode()}, "k": 3}
        assert client.post("/v1/search", json=body).json()["results"] == upload["results"]
        text = client.post("/v1/search", json={"index": "digits", "query": {"text": "the digit seven"}, "k": 5})
        assert text.status_code == 200 and len(text.json()["results"]) == 5
        bad = client.post("/v1/search", json=body | {"query": {"audio": base64.b64encode(b"RIFF....WAVE").decode()}})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_input"
