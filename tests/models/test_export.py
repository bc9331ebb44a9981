"""Export of the real MiniLM checkpoint: parity with torch on new shapes, the bundle format, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle import load_manifest, verify_bundle
from models.encoder import Encoder
from models.errors import BundleError, ExportError, FingerprintMismatch, InvalidInput, ModelNotFound, ParityError
from models.mini.prepare import TEXT_MODEL  # the MiniLM bundle: what these export tests are about
from models.registry import _minilm_source, prepare

torch = pytest.importorskip("torch", reason="export tests need the `export` extra (torch)")

# Batch sizes and lengths unlike the export trace (batch 2, 8 tokens), with padding inside batches.
TEXTS = [
    "Wind tunnel measurements of the pressure distribution on a delta wing.",
    "hello",
    "How do heat transfer rates change in hypersonic flow around a blunt body at high Mach numbers?",
    "A cat sleeps on the warm windowsill.",
    "Photos of mountains",
    "the quick brown fox jumps over the lazy dog again and again and again and again",
    "x",
]


@pytest.fixture(scope="module")
def sentence_transformer():
    st = pytest.importorskip("sentence_transformers", reason="reference needs sentence-transformers")
    return st.SentenceTransformer(str(_minilm_source()), device="cpu")


def test_onnx_matches_sentence_transformers_on_new_shapes(encoder: Encoder, sentence_transformer) -> None:
    for batch in (TEXTS, TEXTS[:1], TEXTS[2:5]):
        ref = sentence_transformer.encode(batch, convert_to_numpy=True, normalize_embeddings=True)
        got = encoder.encode_text(batch, batch_size=3)  # batches of 3 with ragged lengths
        assert got.shape == (len(batch), 384)
        cos = (ref * got).sum(1)
        assert cos.min() >= 0.9999, cos
        assert np.abs(ref - got).max() < 1e-4


def test_token_vectors_match_torch_hidden_states(encoder: Encoder, sentence_transformer) -> None:
    out = encoder.encode_text_tokens(TEXTS[:3])
    for text, toks in zip(TEXTS[:3], out.tokens, strict=True):
        ref = np.asarray(sentence_transformer.encode(text, output_value="token_embeddings"))
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        assert toks.shape == ref.shape  # padding is dropped: one vector per real token
        assert np.allclose(np.linalg.norm(toks, axis=1), 1, atol=1e-5)
        assert np.abs(toks - ref).max() < 1e-4


def test_semantics_survive_export(encoder: Encoder) -> None:
    q, a, b = encoder.encode_text(["a kitten on a sofa", "a small cat resting on a couch", "stock market crash"])
    assert q @ a > q @ b + 0.3


def test_manifest_describes_the_bundle(models_dir: Path) -> None:
    m = verify_bundle(models_dir / TEXT_MODEL)
    assert m.dim == 384 and m.similarity == "cosine"
    tower = m.towers["text"]
    assert tower.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert tower.outputs == ["embedding", "tokens", "token_mask"] and tower.emits_tokens
    assert tower.preprocessing.max_length == 256
    parity = m.parity["text"]
    assert parity["min_cosine"] >= 0.9999 and parity["max_abs_diff"] <= 1e-4
    assert all(shape != parity["trace_shape"] for shape in parity["shapes"])
    assert len(m.fingerprint) == 64
    # Readable by other users: the Docker runtime user reads bundles that root built.
    bundle = models_dir / TEXT_MODEL
    for path in (bundle, bundle / "manifest.json", bundle / "text.onnx"):
        assert path.stat().st_mode & 0o004, oct(path.stat().st_mode)


def test_prepare_is_idempotent(models_dir: Path) -> None:
    before = (models_dir / TEXT_MODEL / "text.onnx").stat().st_mtime_ns
    manifest, built = prepare(models_dir, TEXT_MODEL)
    assert not built
    assert (models_dir / TEXT_MODEL / "text.onnx").stat().st_mtime_ns == before
    assert manifest.fingerprint == load_manifest(models_dir / TEXT_MODEL).fingerprint


def test_tampered_bundle_is_refused(models_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(models_dir / TEXT_MODEL, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["truncation"] = {"max_length": 3}
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(FingerprintMismatch, match="corrupt"):
        Encoder(copy)


def test_missing_bundle_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="xmodal models prepare"):
        Encoder(tmp_path / "nothing")
    with pytest.raises(ModelNotFound, match="known"):
        prepare(tmp_path, "no-such-model")


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    from models.export import export_sentence_transformers

    with pytest.raises(ExportError, match="not a sentence-transformers checkpoint"):
        export_sentence_transformers(tmp_path, tmp_path / "out", "x")
    assert not (tmp_path / "out" / "x").exists()


def test_parity_check_rejects_a_graph_that_differs(models_dir: Path) -> None:
    """Parity compares against the torch module: a torch model with one changed weight must be refused."""
    from transformers import AutoModel

    from models.bundle import load_manifest
    from models.export.base import check_tower_parity, text_feeds
    from models.export.sentence_transformers import TEXT_INPUTS, _text_wrapper

    model = AutoModel.from_pretrained(str(_minilm_source())).eval()
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight.mul_(1.5)
    bundle = models_dir / TEXT_MODEL
    feeds = text_feeds(bundle, load_manifest(bundle).towers["text"].preprocessing, TEXT_INPUTS)
    with pytest.raises(ParityError, match="no bundle written"):
        check_tower_parity(torch, _text_wrapper(torch, model, "mean"), bundle / "text.onnx", feeds, "text", [2, 8])


def test_damaged_bundle_is_rebuilt_by_prepare(models_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(models_dir, tmp_path / "models")
    (tmp_path / "models" / TEXT_MODEL / "text.onnx").write_bytes(b"truncated")
    with pytest.raises(BundleError):
        verify_bundle(tmp_path / "models" / TEXT_MODEL)
    manifest, built = prepare(tmp_path / "models", TEXT_MODEL)
    assert built
    verify_bundle(tmp_path / "models" / TEXT_MODEL)
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no staging left


def test_hub_ids_fail_clearly_without_a_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.registry import export_checkpoint

    constants = pytest.importorskip("huggingface_hub.constants")
    # Offline on purpose: a machine with a network must not download a real CLIP here.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ExportError, match="cannot fetch 'openai/clip-vit-base-patch32'.*pass its folder"):
        export_checkpoint("openai/clip-vit-base-patch32", tmp_path, "clip")
    with pytest.raises(InvalidInput, match="neither a checkpoint folder nor a hub id"):
        export_checkpoint(tmp_path / "no" / "such" / "dir", tmp_path, "x")
