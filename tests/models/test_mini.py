"""xmodal-mini: the generated data, a tiny real training run, the prepared bundle and the committed weights."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models.bundle import DEFAULT_MODEL, load_manifest, verify_bundle
from models.encoder import Encoder
from models.files import sha256_file
from models.mini import data
from models.mini.prepare import MINI_MODEL, TEXT_MODEL, WEIGHTS, read_recipe
from models.registry import prepare


# --- data ---------------------------------------------------------------------------------------------------------
def test_generated_data_is_deterministic_and_holds_out_compositions() -> None:
    a, b = data.make_scenes(60, 3, "train"), data.make_scenes(60, 3, "train")
    assert [s.key for s in a] == [s.key for s in b] and a[0].captions == b[0].captions
    assert np.array_equal(np.asarray(a[5].render()), np.asarray(b[5].render()))
    assert a[0].render().size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
    pairs = lambda s: {(o[0], o[1]) for o in s.objects}  # noqa: E731
    assert not any(pairs(s) & data.HELDOUT_PAIRS for s in data.make_scenes(400, 0, "train"))
    assert all(pairs(s) & data.HELDOUT_PAIRS for s in data.make_scenes(100, 0, "heldout"))

    sounds = data.make_sounds(200, 0, "train")
    assert [s.key for s in sounds[:20]] == [s.key for s in data.make_sounds(20, 0, "train")]
    wave = sounds[1].render()
    assert wave.dtype == np.float32 and wave.shape == (int(data.SAMPLE_RATE * data.CLIP_SECONDS),)
    assert np.abs(wave).max() <= 1.0 and np.abs(wave).max() > 0.1
    assert not any(data._sound_heldout(s.events) for s in sounds)
    assert all(data._sound_heldout(s.events) for s in data.make_sounds(50, 0, "heldout"))


# --- committed weights ----------------------------------------------------------------------------------------------
def test_committed_weights_match_their_recipe() -> None:
    recipe = read_recipe()  # raises if a file is missing or its sha256 differs
    assert set(recipe["files"]) == {"image.onnx", "audio.onnx"}
    for name, info in recipe["files"].items():
        path = WEIGHTS / name
        assert sha256_file(path) == info["sha256"] and path.stat().st_size == info["bytes"] < 5 << 20
    assert "models.mini.recipe" in recipe["command"] and str(recipe["seed"]) in recipe["command"]
    for modality in ("image", "audio"):
        metrics = recipe["metrics"][modality][f"text->{modality}"]
        assert metrics["dense"]["R@10"] > 2 * recipe["metrics"][modality]["chance_R@10"]
        assert recipe["parity"][modality]["min_cosine"] >= 0.9999
        assert recipe["parity"][modality]["shapes"][0][0] != recipe["parity"][modality]["trace_shape"][0]


# --- a tiny real training -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_training_lowers_the_loss_and_retrieves_far_above_chance(encoder: Encoder) -> None:
    from models.training.trainer import (
        IMAGE_PREPROCESSING,
        TrainConfig,
        embed,
        encode_captions,
        group_ids,
        media_inputs,
        retrieval_metrics,
        train_tower,
    )

    # Count scenes only ("two small red circles"): colour, shape and count, learnable in a few dozen steps.
    train = [s for s in data.make_scenes(1200, 5, "train") if s.key.startswith("count:")][:512]
    test = [s for s in data.make_scenes(600, 6, "train") if s.key.startswith("count:")][:200]
    x_train = media_inputs("image", [s.render() for s in train], IMAGE_PREPROCESSING)
    x_test = media_inputs("image", [s.render() for s in test], IMAGE_PREPROCESSING)
    queries = [s.captions[0] for s in test]
    text = encode_captions(encoder, [c for s in train for c in s.captions] + queries)
    index = text.index()
    config = TrainConfig(epochs=5, batch_size=64, lr=3e-3, width=64, layers=1, seed=0)
    result = train_tower(
        "image",
        x_train,
        [[index[c] for c in s.captions] for s in train],
        group_ids([s.key for s in train]),
        text,
        config,
    )
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses

    emb, tokens = embed(result.module, x_test)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5) and tokens.shape == (200, 16, 384)
    q = [index[c] for c in queries]
    m = retrieval_metrics(
        emb,
        list(tokens),
        text.pooled[q].numpy(),
        [text.tokens[i][text.mask[i]].numpy() for i in q],
        group_ids([s.key for s in test]),
        "image",
    )
    chance = m["chance_R@10"]
    assert m["text->image"]["dense"]["R@10"] > 3 * chance, m
    assert m["image->text"]["dense"]["R@10"] > 3 * chance, m


# --- the prepared bundle --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prepared_mini_bundle_is_verified_and_its_towers_run(models_dir: Path) -> None:
    assert DEFAULT_MODEL == MINI_MODEL
    bundle = models_dir / MINI_MODEL
    m = verify_bundle(bundle)
    assert set(m.towers) == {"text", "image", "audio"} and m.dim == 384
    assert all(t.emits_tokens for t in m.towers.values())
    assert m.towers["image"].inputs == ["pixel_values"] and m.towers["audio"].inputs == ["input_features"]
    # The text tower is the all-minilm-l6-v2 bundle's, byte for byte; the media towers are the committed files.
    assert sha256_file(bundle / "text.onnx") == sha256_file(models_dir / TEXT_MODEL / "text.onnx")
    for name in ("image.onnx", "audio.onnx"):
        assert sha256_file(bundle / name) == sha256_file(WEIGHTS / name)
    _, built = prepare(models_dir, MINI_MODEL)
    assert built is False  # idempotent

    enc = Encoder(bundle, device="cpu")
    scenes = data.make_scenes(12, 21, "all")
    pngs = []
    for s in scenes:
        buf = io.BytesIO()
        s.render().save(buf, format="PNG")
        pngs.append(buf.getvalue())
    images = enc.encode_media_tokens("image", [enc.decode("image", b) for b in pngs], batch_size=5)
    sounds = data.make_sounds(6, 21, "all")
    wavs = []
    for s in sounds:
        buf = io.BytesIO()
        sf.write(buf, s.render(), data.SAMPLE_RATE, format="FLAC")
        wavs.append(buf.getvalue())
    audio = enc.encode_media_tokens("audio", [enc.decode("audio", b) for b in wavs], batch_size=4)
    for out, n_tokens in ((images, 16), (audio, 26)):
        assert np.allclose(np.linalg.norm(out.embedding, axis=1), 1, atol=1e-4)
        for t in out.tokens:
            assert t.shape == (n_tokens, 384) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-4)
    # Trained, not random: each picture is closer to its own caption than to the other pictures' captions.
    captions = enc.encode_text([s.captions[0] for s in scenes])
    sims = images.embedding @ captions.T
    assert np.diag(sims).mean() > sims[~np.eye(len(scenes), dtype=bool)].mean() + 0.05


@pytest.mark.slow
def test_prepare_rebuilds_a_damaged_mini_bundle(tmp_path: Path, models_dir: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(models_dir, copy)
    (copy / MINI_MODEL / "image.onnx").write_bytes(b"truncated")
    manifest, built = prepare(copy, MINI_MODEL)
    assert built and verify_bundle(copy / MINI_MODEL).fingerprint == manifest.fingerprint
    assert manifest.fingerprint == load_manifest(models_dir / MINI_MODEL).fingerprint


@pytest.mark.slow
def test_train_a_tower_on_your_own_pairs(tmp_path: Path, models_dir: Path) -> None:
    from models.training.trainer import TrainConfig, train_from_pairs

    folder = tmp_path / "pairs"
    (folder / "clips").mkdir(parents=True)
    rows = []
    for s in data.make_sounds(48, 2, "train"):
        sf.write(folder / "clips" / f"{s.id}.wav", s.render(), data.SAMPLE_RATE)
        rows.append({"text": s.captions[0], "audio": f"clips/{s.id}.wav"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = tmp_path / "models"
    shutil.copytree(models_dir / MINI_MODEL, models / MINI_MODEL)
    config = TrainConfig(epochs=2, batch_size=16, width=32, layers=1, heads=2)
    manifest, result = train_from_pairs(folder / "pairs.jsonl", "audio", models, "my-sounds", MINI_MODEL, config)
    assert set(manifest.towers) == {"text", "audio"} and result.steps == 6
    assert manifest.parity["audio"]["min_cosine"] >= 0.9999
    enc = Encoder(models / "my-sounds", device="cpu")
    vec = enc.encode_media("audio", [enc.decode("audio", folder / rows[0]["audio"])])
    assert vec.shape == (1, 384) and abs(float(np.linalg.norm(vec)) - 1) < 1e-4
    assert enc.encode_text(["a beep"]).shape == (1, 384)
