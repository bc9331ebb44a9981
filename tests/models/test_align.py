"""Adapters: a projection from MiniLM's space onto wordllama-256's, fitted on texts, written as an ONNX bundle, and
loaded only between exactly the two models it was fitted for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.adapter import INPUT, OUTPUT, adapter_dir, load_adapter, load_adapter_manifest
from models.align import align, project, read_texts
from models.bundle import load_manifest
from models.encoder import Encoder
from models.errors import AdapterMismatch, FingerprintMismatch, InvalidInput
from models.mini.prepare import TEXT_MODEL
from models.registry import WORDLLAMA_MODEL, prepare

pytest.importorskip("wordllama", reason="the wordllama-256 bundle comes from the `wordllama` package")
pytest.importorskip("onnx", reason="writing the adapter graph needs onnx (the `export` extra)")

# Texts unlike the bundled captions the fit uses: a transfer check, not a held-out one.
OTHER_TEXTS = [
    "A man riding a wave on top of a surfboard.",
    "Pressure distribution over a swept wing at supersonic speeds.",
    "A plate of food with broccoli and rice.",
    "Two giraffes standing next to each other in a zoo.",
    "heat transfer in laminar boundary layers with suction",
    "A red double decker bus driving down a street.",
    "A kitchen with a stove, a sink and wooden cabinets.",
    "the buckling of thin cylindrical shells under axial compression",
    "A cat sleeping on top of a laptop keyboard.",
    "A group of people flying kites in a park on a windy day.",
    "An airplane taking off from a runway at dusk.",
    "vibration of a cantilever plate in a transonic stream",
]


@pytest.fixture(scope="module")
def models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM (from the shared fixture) and wordllama-256 (prepared here) in one models folder."""
    folder = tmp_path_factory.mktemp("align-models")
    shutil.copytree(models_dir / TEXT_MODEL, folder / TEXT_MODEL)
    prepare(folder, WORDLLAMA_MODEL)
    return folder


@pytest.fixture(scope="module")
def adapter(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = tmp_path_factory.mktemp("eval") / "other.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in OTHER_TEXTS))
    manifest = align(models, TEXT_MODEL, WORDLLAMA_MODEL, limit=1500, eval_texts=[texts])
    assert manifest.name == f"{TEXT_MODEL}-to-{WORDLLAMA_MODEL}"
    return adapter_dir(models, manifest.name)


def test_projection_beats_chance_and_is_recorded(adapter: Path, models: Path) -> None:
    m = load_adapter_manifest(adapter)
    assert m.kind == "adapter" and m.method in ("procrustes", "lstsq")
    assert (m.from_model.name, m.from_model.dim) == (TEXT_MODEL, 384)
    assert (m.to_model.name, m.to_model.dim) == (WORDLLAMA_MODEL, 256)
    assert m.from_model.fingerprint == load_manifest(models / TEXT_MODEL).fingerprint
    assert m.to_model.fingerprint == load_manifest(models / WORDLLAMA_MODEL).fingerprint
    assert len(m.fit["data_sha256"]) == 64 and m.fit["counts"]["texts"] == 1500
    q = m.quality
    assert q["heldout_texts"] == 300
    # Held-out vocabulary words (1,200 fitted): far above chance, though single words are the hardest case.
    assert q["recall@10"] > 10 * q["chance_recall@10"] and q["recall@1"] > 0.2
    assert q["heldout_cosine"] > q["chance_cosine"] + 0.15
    assert set(m.fit["candidates"]) == {"procrustes", "lstsq"}
    best = max(c["ranking_overlap@10"] for c in m.fit["candidates"].values())
    assert q["ranking_overlap@10"] == best and q["ranking_overlap@10"] > 10 / q["heldout_texts"]  # above chance
    (t,) = q["transfer"]
    assert t["n"] == len(OTHER_TEXTS) and t["recall@1"] >= 0.5  # chance: 1/12


def test_onnx_adapter_equals_the_numpy_fit(adapter: Path, models: Path) -> None:
    import onnx
    from onnx import numpy_helper

    m = load_adapter_manifest(adapter)
    w = next(numpy_helper.to_array(t) for t in onnx.load(str(adapter / m.onnx)).graph.initializer if t.name == "W")
    new, old = Encoder(models / TEXT_MODEL, device="cpu"), Encoder(models / WORDLLAMA_MODEL, device="cpu")
    x = new.encode_text(OTHER_TEXTS)
    loaded = load_adapter(adapter, new.fingerprint, old.fingerprint)
    got = loaded.project(x)
    assert (m.input, m.output) == (INPUT, OUTPUT) and got.shape == (len(OTHER_TEXTS), 256)
    assert np.abs(got - project(x, w)).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # Token vectors [B, T, D] go through the same map.
    tokens = new.encode_text_tokens(OTHER_TEXTS[:1]).tokens[0]
    assert np.abs(loaded.project(tokens[None])[0] - project(tokens, w)).max() < 1e-5
    # Projected MiniLM queries find their own text among wordllama-encoded items far better than chance.
    y = old.encode_text(OTHER_TEXTS)
    assert (np.argmax(got @ y.T, axis=1) == np.arange(len(OTHER_TEXTS))).mean() > 0.5


def test_fingerprints_must_match_exactly(adapter: Path, models: Path) -> None:
    new_fp = load_manifest(models / TEXT_MODEL).fingerprint
    old_fp = load_manifest(models / WORDLLAMA_MODEL).fingerprint
    with pytest.raises(AdapterMismatch, match="its from model"):
        load_adapter(adapter, old_fp, old_fp)
    with pytest.raises(AdapterMismatch, match="its to model"):
        load_adapter(adapter, new_fp, new_fp)
    with pytest.raises(AdapterMismatch):
        load_adapter(adapter, old_fp, new_fp)  # the reverse direction is another adapter
    damaged = adapter.parent / "damaged"
    shutil.copytree(adapter, damaged)
    graph = (damaged / "adapter.onnx").read_bytes()
    (damaged / "adapter.onnx").write_bytes(graph[:-4] + bytes(4))
    with pytest.raises(FingerprintMismatch, match="corrupt"):
        load_adapter(damaged, new_fp, old_fp)


def test_texts_files_and_refusals(tmp_path: Path, models: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a"}\n\n{"captions": ["b", "a", " c "]}\n"d"\n')
    assert read_texts(corpus) == ["a", "b", "c", "d"]
    with pytest.raises(InvalidInput, match="at least 20"):
        align(models, TEXT_MODEL, WORDLLAMA_MODEL, texts_path=corpus)
    with pytest.raises(InvalidInput, match="heldout"):
        align(models, TEXT_MODEL, WORDLLAMA_MODEL, heldout=1.5)


def test_pairs_refine_the_fit_and_change_the_data_hash(tmp_path: Path, models: Path) -> None:
    corpus, pairs = tmp_path / "corpus.jsonl", tmp_path / "pairs.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in OTHER_TEXTS * 2 + [f"item {i}" for i in range(20)])
    )
    pairs.write_text("".join(json.dumps({"text": t}) + "\n" for t in OTHER_TEXTS[:5]))
    plain = align(models, TEXT_MODEL, WORDLLAMA_MODEL, name="plain", texts_path=corpus)
    refined = align(models, TEXT_MODEL, WORDLLAMA_MODEL, name="refined", texts_path=corpus, pairs_path=pairs)
    assert plain.fit["counts"] == {"texts": 32} and plain.fit["rows"] == 32
    assert refined.fit["counts"] == {"texts": 32, "pair_texts": 5} and refined.fit["rows"] == 32 + 5 * 4
    assert refined.fit["data_sha256"] != plain.fit["data_sha256"] and refined.fingerprint != plain.fingerprint
