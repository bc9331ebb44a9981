"""Scores comparable across modalities (indexer.calibration) on the real tri-modal index (real ONNX towers, FAISS,
token store): the fits in the manifest, the fused ranking's rules, and the fallback for indexes built before them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.calibration import DEFAULT, METHODS, apply, fit_isotonic, fit_platt, resolve
from indexer.corpus import read_corpus
from indexer.search import LateRequest, LoadedIndex
from models.encoder import Encoder

PAIRS = {f"{q}->{t}" for q in ("text", "image", "audio") for t in ("text", "image", "audio")}
MODES = ("dense", "late")


@pytest.fixture(scope="module")
def media(late_data: Path) -> LoadedIndex:
    index = LoadedIndex(late_data / "indexes", "media", use_gpu=False)
    yield index
    index.close()


@pytest.fixture(scope="module")
def queries(encoder: Encoder, media_corpus: Path) -> dict[str, list[tuple[str, LateRequest]]]:
    """Per query modality, (item id, query) for a few of the index's own pictures, sounds and captions, encoded
    from their files as a service query is."""
    items = read_corpus(media_corpus)
    pictures = [it for it in items if it.image is not None][::17][:5]
    sounds = [it for it in items if it.audio is not None][::19][:5]
    captions = items[::23][:5]
    out = {}
    for modality, chosen in (("image", pictures), ("audio", sounds)):
        enc = encoder.encode_media_tokens(modality, [encoder.decode(modality, getattr(it, modality)) for it in chosen])
        out[modality] = [(it.id, LateRequest(t, v)) for it, v, t in zip(chosen, enc.embedding, enc.tokens, strict=True)]
    enc = encoder.encode_text_tokens([it.text for it in captions])
    out["text"] = [(it.id, LateRequest(t, v)) for it, v, t in zip(captions, enc.embedding, enc.tokens, strict=True)]
    return out


def run(index: LoadedIndex, q: LateRequest, mode: str, k: int = 10, **kw):  # noqa: ANN201
    if mode == "late":
        return index.search_late(q, k, **kw)
    return index.search(q.vector, k, **kw)


def test_fitted_params_are_in_the_manifest(media: LoadedIndex) -> None:
    for fitted in (media.manifest.score_calibration, media.manifest.tokens["score_calibration"]):
        assert fitted["default"] == DEFAULT and fitted["methods"] == list(METHODS)
        assert set(fitted["pairs"]) == PAIRS
        assert fitted["duplicate"]["threshold"] == 0.99 and fitted["duplicate"]["self_score_min"] > 0.999
        for name, entry in fitted["pairs"].items():
            q, t = name.split("->")
            assert entry["points"] > 0 and isinstance(entry["centred"]["mean"], float)
            if {q, t} == {"image", "audio"}:  # no item has a picture and a sound: nothing is relevant
                assert entry["positives"] == 0 and entry["platt"] is None and entry["isotonic"] is None
                continue
            assert entry["positives"] > 0 and entry["platt"]["a"] > 0
            assert np.all(np.diff(entry["isotonic"]["y"]) >= 0) and np.all(np.diff(entry["isotonic"]["x"]) > 0)
            for method, brier in entry["held_out_brier"].items():  # measured on held-out queries
                assert brier["fit"] <= 1.01 * brier["base_rate"], (name, method, brier)
                if name in ("text->image", "image->text"):  # a picture and its caption: the fit clearly helps
                    assert brier["fit"] < 0.8 * brier["base_rate"], (name, method, brier)
    # the demo's captions of pictures and sounds are relevant pairs: their calibrated probability is high
    pair = media.manifest.score_calibration["pairs"]["text->image"]
    assert apply("isotonic", pair, np.array([0.9]))[0] > 0.5 > apply("isotonic", pair, np.array([0.1]))[0]


@pytest.mark.parametrize("mode", MODES)
def test_calibration_never_reorders_one_modalitys_items(media: LoadedIndex, queries, mode: str) -> None:
    for query_modality, qs in queries.items():
        for _, q in qs[:3]:
            alone = {t: [h.id for h in run(media, q, mode, 30, modalities=[t])] for t in media.modalities}
            for method in METHODS:
                hits = run(media, q, mode, 30, query_modality=query_modality, calibration=method)
                duplicates = [h for h in hits if h.similarity >= 0.99]
                assert hits[: len(duplicates)] == duplicates  # near duplicates first, then by score
                rest = [h.score for h in hits[len(duplicates) :]]
                assert rest == sorted(rest, reverse=True)
                for t in media.modalities:
                    fused = [h.id for h in hits if h.modality == t]
                    # the modality's hits come in the order of its own search (skipping items listed by another row)
                    assert [i for i in alone[t] if i in set(fused)] == fused, (method, t)
                    sims = [h.similarity for h in hits if h.modality == t]
                    assert sims == sorted(sims, reverse=True)


@pytest.mark.parametrize("mode", MODES)
def test_an_exact_duplicate_ranks_first_for_every_query_modality(media: LoadedIndex, queries, mode: str) -> None:
    for query_modality, qs in queries.items():
        for item_id, q in qs:
            for method in METHODS:
                top = run(media, q, mode, 5, query_modality=query_modality, calibration=method)[0]
                # the item itself, or for a caption an item with the very same caption
                assert top.modality == query_modality and top.similarity >= 0.999, (method, item_id, top)
                assert top.id == item_id or query_modality == "text"
                if method in ("platt", "isotonic"):
                    assert top.score == 1.0  # a duplicate is relevant with certainty


def test_without_the_duplicate_rule_zscores_rank_another_modality_first(media: LoadedIndex, queries) -> None:
    """Why the rule is there: today's z-scores alone put a caption or a picture above the identical sound."""
    firsts = [
        run(media, q, "dense", 5, query_modality="audio", calibration="zscore", duplicates_first=False)[0]
        for _, q in queries["audio"]
    ]
    ruled = [run(media, q, "dense", 5, query_modality="audio", calibration="zscore")[0] for _, q in queries["audio"]]
    assert all(h.modality == "audio" for h in ruled)
    assert any(h.modality != "audio" for h in firsts)


def test_default_is_the_fitted_map_and_scores_are_probabilities(media: LoadedIndex, queries) -> None:
    _, q = queries["text"][0]
    fusion = media.fusion(None, "text", None)
    assert fusion.method == DEFAULT == "isotonic"
    hits = media.search(q.vector, 20, query_modality="text")
    assert all(0.0 <= h.score <= 1.0 for h in hits) and any(h.score != h.similarity for h in hits)
    # a raw embedding's modality is unknown: no pair to calibrate with, raw cosines
    assert media.fusion(None, None, None).method == "raw"
    assert all(h.score == h.similarity for h in media.search(q.vector, 5))


def copy_index(late_data: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    """A copy of the media index whose manifest ``edit`` changes, as an older build would have written it."""
    target = tmp_path / "indexes"
    shutil.copytree(late_data / "indexes" / "media", target / "media")
    for manifest in (target / "media" / "versions").glob("*.json"):  # what a search reads its fits from
        data = json.loads(manifest.read_text())
        edit(data)
        manifest.write_text(json.dumps(data))
    return target


def drop_fits(data: dict) -> None:
    data.pop("score_calibration")
    data["tokens"].pop("score_calibration")


@pytest.mark.parametrize("mode", MODES)
def test_an_index_built_before_the_fits_falls_back_to_zscores(
    late_data: Path, tmp_path: Path, queries, mode: str
) -> None:
    old = LoadedIndex(copy_index(late_data, tmp_path, drop_fits), "media", use_gpu=False)
    assert old.manifest.score_calibration is None
    item_id, q = queries["audio"][1]
    stats = old.manifest.calibration if mode == "dense" else old.manifest.tokens["calibration"]
    for method in (None, "isotonic", "platt", "centred"):
        assert old.fusion(method, "audio", None, mode).method == "zscore"
        hits = run(old, q, mode, 10, query_modality="audio", calibration=method)
        assert hits[0].id == item_id  # the duplicate rule holds in the fallback too
        for h in hits:
            pair = stats[f"audio->{h.modality}"]
            assert h.score == pytest.approx((h.similarity - pair["mean"]) / pair["std"], abs=1e-5)
    assert old.fusion("rrf", "audio", None, mode).method == "rrf"  # needs no fit
    old.close()


def test_an_index_without_any_statistics_falls_back_to_raw(late_data: Path, tmp_path: Path, queries) -> None:
    def drop_all(data: dict) -> None:
        drop_fits(data)
        data.pop("calibration")
        data["tokens"].pop("calibration")

    old = LoadedIndex(copy_index(late_data, tmp_path, drop_all), "media", use_gpu=False)
    _, q = queries["image"][0]
    assert old.fusion(None, "image", None).method == "raw"
    assert all(h.score == h.similarity for h in old.search(q.vector, 10, query_modality="image"))
    assert all(h.score == h.similarity for h in old.search_late(q, 10, query_modality="image"))
    old.close()


def test_isotonic_and_platt_fits_are_monotone_and_calibrated() -> None:
    """On scores whose true P(relevant) is known (a logistic curve), both fits recover it and never decrease."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 20_000)
    y = (rng.uniform(size=x.size) < 1 / (1 + np.exp(-(12 * x - 8)))).astype(float)
    platt = fit_platt(x, y)
    assert platt["a"] == pytest.approx(12, rel=0.15) and platt["b"] == pytest.approx(-8, rel=0.15)
    iso = {"isotonic": fit_isotonic(x, y)}
    grid = np.linspace(0, 1, 101)
    p = apply("isotonic", iso, grid)
    assert np.all(np.diff(p) >= 0)
    assert np.abs(p - 1 / (1 + np.exp(-(12 * grid - 8))))[5:-5].max() < 0.1
    assert np.all(apply("isotonic", {"isotonic": None}, grid) == 0)  # no positive pair: never relevant


def test_a_manifest_default_this_version_does_not_know_falls_back_to_the_default(media: LoadedIndex) -> None:
    fitted = dict(media.manifest.score_calibration, default="something-newer")
    fusion = resolve(None, fitted, media.manifest.calibration, "text", media.modalities)
    assert fusion.method == DEFAULT
    assert resolve("rrf", fitted, {}, "text", media.modalities).method == "rrf"
