"""CLAP export on tiny random ClapModels (unfused and fused HTSAT): the bundle, and ONNX Runtime against the
transformers model on features from the real ClapFeatureExtractor, tokens included."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from models.bundle import verify_bundle
from models.errors import ExportError, ParityError
from models.runtime import create_session
from models.text import TextPreprocessor
from tests.checkpoints import make_clap_checkpoint

torch = pytest.importorskip("torch", reason="export tests need the `export` extra (torch)")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

TEXTS = ["a dog barks", "rain falls on a tin roof while birds sing at dawn near the river", "piano", "a car engine"]
TOL = 1e-4


def _waves(lengths: list[float], seed: int = 1) -> list[np.ndarray]:
    """Tones, noise and a chirp at 16 kHz, ``lengths`` in seconds."""
    rng = np.random.default_rng(seed)
    out = []
    for i, seconds in enumerate(lengths):
        t = np.arange(int(seconds * 16_000)) / 16_000
        kind = i % 3
        if kind == 0:
            x = 0.5 * np.sin(2 * np.pi * (330 + 200 * i) * t)
        elif kind == 1:
            x = 0.2 * rng.standard_normal(t.size)
        else:
            x = 0.4 * np.sin(2 * np.pi * (200 * t + 3000 * t * t))
        out.append(x.astype(np.float32))
    return out


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x, dim=-1).numpy()


@pytest.fixture(scope="module")
def unfused(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path, object]:
    from models.export.clap import export_clap

    folder = tmp_path_factory.mktemp("clap-ckpt")
    model = make_clap_checkpoint(folder, fusion=False)
    models_dir = tmp_path_factory.mktemp("models")
    manifest = export_clap(folder, models_dir, "tiny-clap")
    return model, folder, models_dir / "tiny-clap", manifest


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path, dict, list[str], object]:
    """The fused audio tower alone (the text tower is the unfused test's): export_clap's audio steps."""
    from models.export.base import export_towers
    from models.export.clap import _audio_export, _audio_preprocessing, _load_model

    folder = tmp_path_factory.mktemp("clap-fused-ckpt")
    model = make_clap_checkpoint(folder, fusion=True)
    pre, note = _audio_preprocessing(folder, fusion=True)
    assert note is None
    path = tmp_path_factory.mktemp("bundle") / "audio.onnx"
    spec = _audio_export(torch, _load_model(transformers, folder), pre, folder)
    _, parity, _ = export_towers(torch, path.parent, [spec])
    return model, folder, path, parity["audio"], spec.inputs, pre


def test_manifest_and_fingerprint(unfused) -> None:
    _, folder, bundle, manifest = unfused
    assert verify_bundle(bundle) == manifest
    assert manifest.dim == 16 and set(manifest.towers) == {"text", "audio"}
    text, audio = manifest.towers["text"], manifest.towers["audio"]
    assert text.inputs == ["input_ids", "attention_mask"] and audio.inputs == ["input_features"]
    for tower in (text, audio):
        assert tower.outputs == ["embedding", "tokens", "token_mask"] and tower.emits_tokens
    assert text.preprocessing.tokenizer == "tokenizer.json" and (bundle / "tokenizer.json").is_file()
    assert (text.preprocessing.max_length, text.preprocessing.pad_id) == (64, 1)  # 66 positions - pad - 1
    pre = audio.preprocessing
    assert (pre.sample_rate, pre.clip_seconds, pre.n_fft, pre.hop_length, pre.n_mels) == (16_000, 1.0, 512, 160, 16)
    assert (pre.f_min, pre.f_max, pre.padding, pre.truncation) == (50.0, 8_000.0, "repeatpad", "rand_trunc")
    assert manifest.source["kind"] == "hf-clap" and manifest.source["fusion"] is False
    for name in ("text", "audio"):
        parity = manifest.parity[name]
        assert parity["min_cosine"] >= 0.9999 and parity["max_abs_diff"] <= 1e-4
        assert all(shape != parity["trace_shape"] for shape in parity["shapes"])
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_text_tower_matches_transformers(unfused) -> None:
    model, folder, bundle, manifest = unfused
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    session, _ = create_session(bundle / "text.onnx", device="cpu")
    own = TextPreprocessor.from_config(bundle, manifest.towers["text"].preprocessing)
    for texts in (TEXTS, TEXTS[2:3], TEXTS[:3]):  # other batch sizes and lengths than the trace, padded rows
        hf = tok(texts, padding=True, return_tensors="pt")
        feed = own(texts)
        assert np.array_equal(feed["input_ids"], hf["input_ids"].numpy())  # the bundle pads as the tokenizer does
        assert np.array_equal(feed["attention_mask"], hf["attention_mask"].numpy())
        emb, tokens, mask = session.run(None, {n: feed[n] for n in ("input_ids", "attention_mask")})
        with torch.inference_mode():
            ref = model.get_text_features(**hf)
            pooler = model.text_model.pooler
            ref_tokens = _unit(model.text_projection(pooler.activation(pooler.dense(ref.last_hidden_state))))
        assert np.abs(emb - _unit(ref.pooler_output)).max() < TOL
        assert mask.dtype == np.int32 and np.array_equal(mask, hf["attention_mask"].numpy())
        real = mask.astype(bool)
        assert np.abs(tokens[real] - ref_tokens[real]).max() < TOL
        assert np.allclose(np.linalg.norm(tokens[real], axis=-1), 1, atol=1e-5)
        assert np.abs(tokens[:, 0] - emb).max() < TOL  # <s> through the head is the embedding


def test_audio_tower_matches_transformers(unfused) -> None:
    model, folder, bundle, _ = unfused
    extractor = transformers.ClapFeatureExtractor.from_pretrained(str(folder))
    session, _ = create_session(bundle / "audio.onnx", device="cpu")
    for lengths in ([0.3, 1.0, 0.75], [0.05], [0.5, 0.2, 1.0, 0.9, 0.33]):
        feats = extractor(_waves(lengths), sampling_rate=16_000, return_tensors="pt")
        assert tuple(feats["input_features"].shape[1:]) == (1, 101, 16)
        emb, tokens, mask = session.run(None, {"input_features": feats["input_features"].numpy()})
        with torch.inference_mode():
            ref = model.get_audio_features(input_features=feats["input_features"])
            encoded = model.audio_model(input_features=feats["input_features"])
            steps = encoded.last_hidden_state.mean(dim=2).transpose(1, 2)  # [B, C, F', T'] -> [B, T', C]
            ref_tokens = _unit(model.audio_projection(steps))
            # The pooled vector is the mean of the time steps: the embedding is their mean through the projection.
            assert torch.allclose(steps.mean(1), encoded.pooler_output, atol=1e-5)
        assert np.abs(emb - _unit(ref.pooler_output)).max() < TOL
        assert tokens.shape == (len(lengths), 32, 16)  # 2 frequency rows x 32 time steps in the final map
        assert mask.dtype == np.int32 and (mask == 1).all() and mask.shape == (len(lengths), 32)
        assert np.abs(tokens - ref_tokens).max() < TOL


def test_fused_audio_tower_takes_is_longer(fused) -> None:
    model, folder, path, parity, inputs, pre = fused
    assert inputs == ["input_features", "is_longer"] and pre.truncation == "fusion"
    assert parity["min_cosine"] >= 0.9999 and parity["max_abs_diff"] <= 1e-4
    assert len(parity["shapes"]) == 6  # batches 1, 3, 5, each with is_longer as preprocessed and flipped
    extractor = transformers.ClapFeatureExtractor.from_pretrained(str(folder))
    session, _ = create_session(path, device="cpu")
    np.random.seed(0)  # the extractor picks fusion chunks (and, with no long clip, an is_longer row) at random
    waves = _waves([1.7, 0.4, 2.5, 0.8])
    feats = extractor(waves, sampling_rate=16_000, return_tensors="pt")
    assert tuple(feats["input_features"].shape[1:]) == (4, 63, 64)
    longer = feats["is_longer"]
    for flags in (longer, ~longer, torch.ones_like(longer), torch.zeros_like(longer)):
        emb, tokens, _ = session.run(
            None, {"input_features": feats["input_features"].numpy(), "is_longer": flags.numpy()}
        )
        with torch.inference_mode():
            ref = model.get_audio_features(input_features=feats["input_features"], is_longer=flags)
            steps = ref.last_hidden_state.mean(dim=2).transpose(1, 2)
            ref_tokens = _unit(model.audio_projection(steps))
        assert np.abs(emb - _unit(ref.pooler_output)).max() < TOL
        assert np.abs(tokens - ref_tokens).max() < TOL
    # is_longer matters for a clip whose four mels differ: the graph does not ignore it.
    a = session.run(
        ["embedding"], {"input_features": feats["input_features"][:1].numpy(), "is_longer": np.array([[True]])}
    )
    b = session.run(
        ["embedding"], {"input_features": feats["input_features"][:1].numpy(), "is_longer": np.array([[False]])}
    )
    assert np.abs(a[0] - b[0]).max() > 1e-3


def test_parity_check_rejects_a_different_model(unfused) -> None:
    from models.export import check_tower_parity as _tower_parity
    from models.export.clap import _audio_feeds, _audio_tower

    model, _, bundle, manifest = unfused
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.audio_model.audio_encoder.layers[1].blocks[1].attention.self.query.weight.mul_(1.5)
    feeds = _audio_feeds(manifest.towers["audio"].preprocessing, fusion=False)
    with pytest.raises(ParityError, match="no bundle written"):
        _tower_parity(torch, _audio_tower(torch, changed, False), bundle / "audio.onnx", feeds, "audio", [2])


def test_not_a_clap_checkpoint_is_refused(tmp_path: Path) -> None:
    from models.export.clap import export_clap

    with pytest.raises(ExportError, match="no config.json"):
        export_clap(tmp_path, tmp_path / "out", "x")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    with pytest.raises(ExportError, match="model_type 'clap'"):
        export_clap(tmp_path, tmp_path / "out", "x")
    assert not (tmp_path / "out" / "x").exists()


def test_truncation_follows_the_model(tmp_path: Path) -> None:
    """An unfused model takes one mel channel: a config asking for fusion's four is overridden, and said so."""
    from models.export.clap import _audio_preprocessing

    config = {"feature_extractor_type": "ClapFeatureExtractor", "feature_size": 64, "truncation": "fusion"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    pre, note = _audio_preprocessing(tmp_path, fusion=False)
    assert pre.truncation == "rand_trunc" and "truncation='fusion'" in note
    pre, note = _audio_preprocessing(tmp_path, fusion=True)
    assert pre.truncation == "fusion" and note is None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "feature_size": 16}))
    with pytest.raises(ExportError, match="feature_size 64"):
        _audio_preprocessing(tmp_path, fusion=True)
