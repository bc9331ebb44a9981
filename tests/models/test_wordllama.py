"""The wordllama-256 bundle: the static embeddings of the `wordllama` package as a tiny ONNX graph, prepared offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle import verify_bundle
from models.encoder import Encoder
from models.errors import ParityError
from models.registry import PREPARABLE, WORDLLAMA_MODEL, prepare

pytest.importorskip("torch", reason="exporting needs the `export` extra (torch)")
pytest.importorskip("wordllama", reason="the weights ship in the `wordllama` package")

# Other batch sizes and lengths than the export trace (2 x 8) and the export's own parity batches.
TEXTS = [
    "Transition to turbulence in the boundary layer of a flat plate at zero incidence",
    "dog",
    "What are the effects of wall cooling on heat transfer in hypersonic flow?",
    "Two small red circles above a blue square",
    "x y z",
    "a rising chirp, then three short high beeps",
    "A group of people riding bicycles down a rain-soaked city street at night.",
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    manifest, built = prepare(models, WORDLLAMA_MODEL)
    assert built and manifest.name == WORDLLAMA_MODEL
    return models / WORDLLAMA_MODEL


@pytest.fixture(scope="module")
def reference():
    from models.export.wordllama import load_wordllama

    return load_wordllama()[0]


def test_bundle_is_small_verified_and_records_both_parities(bundle: Path) -> None:
    manifest = verify_bundle(bundle)
    assert WORDLLAMA_MODEL in PREPARABLE
    assert manifest.dim == 256 and set(manifest.towers) == {"text"}
    text = manifest.towers["text"]
    assert text.inputs == ["input_ids", "attention_mask"] and text.emits_tokens
    assert text.outputs == ["embedding", "tokens", "token_mask"]
    assert sum(f.stat().st_size for f in bundle.iterdir()) < 20 << 20  # float16 table: ~16 MB
    parity = manifest.parity["text"]
    assert parity["min_cosine"] >= 0.9999 and parity["max_abs_diff"] <= 1e-4  # torch vs ONNX
    ref = parity["reference"]  # the staged bundle vs wordllama.embed
    assert ref["min_cosine"] >= 0.9999 and ref["max_abs_diff"] <= 1e-5
    assert manifest.source["kind"] == "wordllama" and len(manifest.source["weights_sha256"]) == 64


def test_encoder_equals_wordllama_embed_on_new_shapes(bundle: Path, reference) -> None:
    enc = Encoder(bundle, device="cpu")
    for batch in (TEXTS, TEXTS[:1], TEXTS[2:6]):
        got = enc.encode_text(batch)
        want = reference.embed(batch, norm=True)
        assert got.shape == (len(batch), 256)
        assert np.abs(got - want).max() < 1e-5
    out = enc.encode_text_tokens(TEXTS[:3])
    for text, tokens in zip(TEXTS[:3], out.tokens, strict=True):
        assert len(tokens) == len(reference.tokenize([text])[0].ids)  # no <s>, as wordllama tokenizes
        assert np.allclose(np.linalg.norm(tokens, axis=1), 1, atol=1e-5)
    # Meaning, not just numbers: a paraphrase is nearer than an unrelated text.
    a, b, c = enc.encode_text(["a dog runs on the beach", "a puppy running along the shore", "tax law reform"])
    assert a @ b > a @ c + 0.1


def test_prepare_is_idempotent(bundle: Path) -> None:
    manifest, built = prepare(bundle.parent, WORDLLAMA_MODEL)
    assert not built and manifest.fingerprint == verify_bundle(bundle).fingerprint


def test_a_bundle_that_differs_from_wordllama_is_refused(bundle: Path, reference) -> None:
    from models.export.wordllama import reference_parity

    class Shifted:
        def embed(self, texts, norm=True):  # noqa: ANN001
            v = reference.embed(texts, norm=True)
            v[:, 0] += 0.05
            return v

    pre = verify_bundle(bundle).towers["text"].preprocessing
    assert reference_parity(reference, bundle, pre)["min_cosine"] >= 0.9999
    with pytest.raises(ParityError, match="differs from wordllama.embed"):
        reference_parity(Shifted(), bundle, pre)
