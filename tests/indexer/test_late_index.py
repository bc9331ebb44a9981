"""Late interaction through a real index: the default model's token vectors stored by build_index, searched by
LoadedIndex.search_late, checked against MaxSim written plainly in numpy over tokens re-encoded here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.build import LateBuild, build_index
from indexer.corpus import read_corpus
from indexer.late.pipeline import LateParams
from indexer.layout import TOKENS
from indexer.search import LateRequest, LoadedIndex
from indexer.verify import verify_index
from models.encoder import Encoder
from models.errors import InvalidInput

QUERIES = [
    "two red circles",
    "a blue square above a green triangle",
    "three white crosses",
    "a low hum that rises",
    "a fast beeping sound",
    "one green circle on a dark background",
]


def maxsim(query: np.ndarray, item: np.ndarray, symmetric: bool = False) -> float:
    sim = query.astype(np.float64) @ item.astype(np.float64).T
    forward = sim.max(axis=1).mean()
    return (forward + sim.max(axis=0).mean()) / 2 if symmetric else forward


@pytest.fixture(scope="module")
def media(late_data: Path):
    index = LoadedIndex(late_data / "indexes", "media", use_gpu=False)
    yield index
    index.close()


@pytest.fixture(scope="module")
def tokens_of(encoder: Encoder, media_corpus: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every (item id, modality)'s token vectors, encoded here and rounded to fp16 as the store keeps them."""
    items = read_corpus(media_corpus)
    out = {}
    texts = encoder.encode_text_tokens([it.text for it in items])
    for it, t in zip(items, texts.tokens, strict=True):
        out[(it.id, "text")] = t
    for modality in ("image", "audio"):
        having = [it for it in items if getattr(it, modality) is not None]
        decoded = [encoder.decode(modality, getattr(it, modality)) for it in having]
        for it, t in zip(having, encoder.encode_media_tokens(modality, decoded).tokens, strict=True):
            out[(it.id, modality)] = t
    return {key: t.astype(np.float16).astype(np.float32) for key, t in out.items()}


def query_tokens(encoder: Encoder, text: str) -> LateRequest:
    out = encoder.encode_text_tokens([text])
    return LateRequest(out.tokens[0], out.embedding[0])


def test_build_stores_every_rows_encoder_tokens(late_data: Path, media: LoadedIndex, tokens_of) -> None:
    m = media.manifest
    (view,) = media.segments
    assert TOKENS in view.data.manifest.files
    assert (late_data / "indexes" / "media" / "segments" / view.data.id / TOKENS).is_dir()
    assert m.tokens["storage"] == "fp16" and m.tokens["rows"] == media.size == len(tokens_of)
    assert m.tokens["storage_recall_at_10"] is None  # stored as encoded: nothing to lose
    store = view.data.tokens
    records = media.items.get(list(range(media.size)))
    for row in range(media.size):
        key = (records[row]["id"], records[row]["modality"])
        np.testing.assert_allclose(store.row_tokens(row), tokens_of[key], atol=1e-6)
    # rows of one item share its ordinal, and different items do not
    ids = [records[r]["id"] for r in range(media.size)]
    assert len(set(zip(ids, store.row_item.tolist(), strict=True))) == len(set(ids)) == len(set(store.row_item))
    assert verify_index(late_data / "indexes", "media")["ok"]


@pytest.mark.parametrize("symmetric", [False, True])
def test_exhaustive_late_search_equals_numpy_maxsim(
    encoder: Encoder, media: LoadedIndex, tokens_of, symmetric: bool
) -> None:
    images = {i: t for (i, m), t in tokens_of.items() if m == "image"}
    for text in QUERIES[:3]:
        q = query_tokens(encoder, text)
        q.params = LateParams(exhaustive=True, symmetric=symmetric)
        hits = media.search_late(q, 10, modalities=["image"])
        want = sorted(((maxsim(q.tokens, t, symmetric), i) for i, t in images.items()), reverse=True)[:10]
        assert [h.id for h in hits] == [i for _, i in want]
        np.testing.assert_allclose([h.similarity for h in hits], [s for s, _ in want], atol=1e-4)
        assert all(h.modality == "image" and h.score == h.similarity for h in hits)  # one target: no calibration


def test_scope_all_scores_the_union_of_an_items_tokens(encoder: Encoder, media: LoadedIndex, tokens_of) -> None:
    q = query_tokens(encoder, QUERIES[1])
    q.params = LateParams(exhaustive=True, scope="all")
    hits = media.search_late(q, 10, modalities=["image", "text"])
    ids = {i for i, m in tokens_of if m == "image"}
    union = {i: np.concatenate([tokens_of[(i, "image")], tokens_of[(i, "text")]]) for i in ids}
    want = sorted(((maxsim(q.tokens, t), i) for i, t in union.items()), reverse=True)[:10]
    assert [h.id for h in hits] == [i for _, i in want]
    np.testing.assert_allclose([h.score for h in hits], [s for s, _ in want], atol=1e-4)
    assert {h.modality for h in hits} == {"image+text"}


def test_fast_path_recall_against_exhaustive(encoder: Encoder, media: LoadedIndex, media_corpus: Path) -> None:
    assert media.manifest.tokens["engine_recall_at_10"]["value"] >= 0.95  # measured at build time
    captions = sorted({it.text for it in read_corpus(media_corpus)})[::7][:30]
    hits_total = 0
    for text in captions:
        fast = media.search_late(query_tokens(encoder, text), 10, modalities=["image", "audio"])
        q = query_tokens(encoder, text)
        q.params = LateParams(exhaustive=True)
        exact = media.search_late(q, 10, modalities=["image", "audio"])
        hits_total += len({h.id for h in fast} & {h.id for h in exact})
    assert hits_total / (10 * len(captions)) >= 0.95


def test_mixed_targets_filter_and_explain(encoder: Encoder, media: LoadedIndex, tokens_of) -> None:
    q = query_tokens(encoder, QUERIES[4])
    q.explain = True
    hits = media.search_late(
        q, 8, modalities=["image", "audio"], filter={"kind": "sound"}, query_modality="text", calibration="zscore"
    )
    assert len(hits) == 8 and all(h.id.startswith("snd-") and h.metadata["kind"] == "sound" for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    stats = media.manifest.tokens["calibration"]["text->audio"]
    for h in hits:  # calibrated: two targets and a known query modality
        assert h.score == pytest.approx((h.similarity - stats["mean"]) / stats["std"], abs=1e-5)
        item = tokens_of[(h.id, "audio")]
        sim = q.tokens @ item.T
        assert [m.query_token for m in h.matches] == list(range(len(q.tokens)))
        assert [m.item_token for m in h.matches] == sim.argmax(axis=1).tolist()
        np.testing.assert_allclose([m.similarity for m in h.matches], sim.max(axis=1), atol=1e-5)
        assert np.mean([m.similarity for m in h.matches]) == pytest.approx(h.similarity, abs=1e-5)


def test_compressed_pooled_store_reports_its_cost(tmp_path: Path, encoder: Encoder, media_corpus: Path) -> None:
    items = read_corpus(media_corpus)
    late = LateBuild(storage="residual", nbits=2, pool_factor=2)
    m = build_index(indexes_dir=tmp_path, name="small", items=items, encoder=encoder, use_gpu=False, late=late).manifest
    t = m.tokens
    assert t["storage"] == "residual" and t["tokens"] < t["tokens_before_pooling"]
    # smaller than fp16 even here, where the codec's fixed tables weigh on 3k tokens (1/7 at scale: bench/late.py)
    assert t["bytes_per_token"] < t["fp16_bytes_per_token"]
    assert t["storage_recall_at_10"]["cost_of"] == ["pool factor 2", "2-bit residuals"]
    assert 0.0 < t["storage_recall_at_10"]["value"] <= 1.0
    index = LoadedIndex(tmp_path, "small", use_gpu=False)
    caption = items[5].text
    hits = index.search_late(query_tokens(encoder, caption), 3, modalities=["text"])
    assert caption in [h.text for h in hits]  # its own caption, even through pooled 2-bit tokens
    index.close()


def test_dense_only_index_refuses_late(tmp_path: Path, encoder: Encoder, media_corpus: Path) -> None:
    items = read_corpus(media_corpus)[:20]
    build_index(indexes_dir=tmp_path, name="dense", items=items, encoder=encoder, use_gpu=False)
    index = LoadedIndex(tmp_path, "dense", use_gpu=False)
    assert not index.has_tokens and index.manifest.tokens is None
    with pytest.raises(InvalidInput, match="no token store"):
        index.search_late(query_tokens(encoder, "two red circles"), 5)
    index.close()
