"""Adapters between two models that both have an image tower (xmodal-mini as NEW, a tiny random CLIP exported by the
project's own exporter as OLD): with image pairs, the image tower gets a map of its own, inside the fingerprint,
used for image queries; text queries keep the text map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.adapter import adapter_dir, load_adapter
from models.align import align, normalize
from models.bundle import DEFAULT_MODEL
from models.encoder import Encoder
from models.errors import FingerprintMismatch
from tests.checkpoints import make_clip_checkpoint

pytest.importorskip("transformers", reason="the tiny CLIP is exported with the `export` extra")
pytest.importorskip("onnx", reason="writing the adapter graphs needs onnx (the `export` extra)")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    from models.export.clip import export_clip

    folder = tmp_path_factory.mktemp("tower-models")
    shutil.copytree(models_dir, folder, dirs_exist_ok=True)
    export_clip(make_clip_checkpoint(tmp_path_factory.mktemp("clip")), folder, "tiny-clip")
    return folder


def test_image_pairs_give_the_image_tower_its_own_map(models: Path, media_corpus: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in media_corpus.read_text().splitlines() if '"image"' in line][:80]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"text": r["text"], "image": str(media_corpus.parent / r["image"])}) + "\n" for r in rows)
    )
    texts = [r["text"] for r in rows] + [f"{c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")] * 4
    manifest = align(models, DEFAULT_MODEL, "tiny-clip", name="mini-to-clip", texts=texts, pairs_path=pairs)
    assert manifest.towers == {"image": "adapter.image.onnx"}
    new, old = Encoder(models / DEFAULT_MODEL, device="cpu"), Encoder(models / "tiny-clip", device="cpu")
    folder = adapter_dir(models, "mini-to-clip")
    adapter = load_adapter(folder, new.fingerprint, old.fingerprint)

    images = [str(media_corpus.parent / r["image"]) for r in rows]
    x = new.encode_media("image", [new.decode("image", Path(p)) for p in images])
    y = old.encode_media("image", [old.decode("image", Path(p)) for p in images])
    by_image, by_text = adapter.project(x, "image"), adapter.project(x, "text")
    assert by_image.shape == (len(rows), old.dim) and np.allclose(np.linalg.norm(by_image, axis=1), 1, atol=1e-5)
    assert not np.allclose(by_image, by_text, atol=1e-3)  # two maps
    assert np.allclose(adapter.project(x), by_text)  # no modality: the text map
    # the image map is what lands NEW's images on OLD's image vectors (the text map never saw an image)
    assert (by_image * y).sum(1).mean() > (normalize(by_text) * y).sum(1).mean() + 0.05

    # the tower's graph is inside the fingerprint: a changed byte is refused
    graph = folder / "adapter.image.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + bytes([graph.read_bytes()[-1] ^ 1]))
    with pytest.raises(FingerprintMismatch):
        load_adapter(folder, new.fingerprint, old.fingerprint)
