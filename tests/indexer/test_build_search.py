"""Index build, the on-disk bundle and search, checked against exact numpy search on real embeddings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_backend
from indexer.build import build_index
from indexer.corpus import read_jsonl
from indexer.layout import IndexDir, list_indexes
from indexer.search import LoadedIndex
from indexer.tuning import exact_topk
from indexer.verify import verify_index
from models.encoder import Encoder
from models.errors import BundleError, FingerprintMismatch, IndexNotFound, InvalidInput
from models.files import sha256_file


def only_segment(root: Path, name: str) -> Path:
    """The folder of the one segment of index ``name``'s published version."""
    d = IndexDir(root, name)
    (ref,) = d.manifest().segments
    return d.segment_dir(ref.id)


@pytest.fixture(scope="module")
def items(demo_corpus: Path):
    return read_jsonl(demo_corpus)


@pytest.fixture(scope="module")
def vectors(encoder: Encoder, items) -> np.ndarray:
    return encoder.encode_text([i.text for i in items])


def test_published_index_matches_exact_search(tmp_path: Path, encoder: Encoder, items, vectors) -> None:
    calls = []
    result = build_index(
        indexes_dir=tmp_path,
        name="t",
        items=items,
        encoder=encoder,
        use_gpu=False,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1] == (len(items), len(items)) and len(calls) > 1
    m = result.manifest
    assert IndexDir(tmp_path, "t").current() == m.version
    assert m.counts == {"text": len(items)} and m.dim == 384 and m.faiss.key == "Flat"
    assert m.model.fingerprint == encoder.fingerprint and m.operation == "build" and len(m.segments) == 1
    assert m.recall_at_10["value"] == 1.0
    assert m.build["items_per_second"] > 0
    files = sorted(p.name for p in only_segment(tmp_path, "t").iterdir())
    assert files == ["dense.text.faiss", "heldout", "items.sqlite", "manifest.json"]

    index = LoadedIndex(tmp_path, "t", expect_fingerprint=encoder.fingerprint, use_gpu=False)
    queries = encoder.encode_text(["rocket launch to the moon", "making soup in the kitchen", "a goal in the match"])
    truth = exact_topk(queries, vectors, 10)
    for q, want in zip(queries, truth, strict=True):
        hits = index.search(q, 10)
        assert [h.id for h in hits] == [items[r].id for r in want]
        assert np.allclose([h.score for h in hits], vectors[want] @ q, atol=1e-5)
        assert all(h.modality == "text" and h.text for h in hits)


def test_search_finds_the_right_topic(tmp_path: Path, encoder: Encoder, items) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items, encoder=encoder, use_gpu=False)
    index = LoadedIndex(tmp_path, "t", use_gpu=False)
    for query, topic in [
        ("an astronaut looks at the stars", "space"),
        ("a doctor and a sick patient", "medicine"),
        ("software bugs on the server", "computing"),
    ]:
        hits = index.search(encoder.encode_text([query])[0], 5)
        assert [h.metadata["topic"] for h in hits] == [topic] * 5


def test_metadata_filter_and_modalities(tmp_path: Path, encoder: Encoder, items) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items, encoder=encoder, use_gpu=False)
    index = LoadedIndex(tmp_path, "t", use_gpu=False)
    q = encoder.encode_text(["a rocket in space"])[0]
    hits = index.search(q, 7, filter={"topic": "cooking"})
    assert len(hits) == 7 and {h.metadata["topic"] for h in hits} == {"cooking"}
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    both = index.search(q, 50, filter={"topic": ["music", "weather"]})
    assert {h.metadata["topic"] for h in both} == {"music", "weather"}
    assert index.search(q, 5, filter={"topic": "no such topic"}) == []
    with pytest.raises(InvalidInput, match="holds no \\['image'\\]"):
        index.search(q, 5, modalities=["image"])
    with pytest.raises(InvalidInput, match="shape"):
        index.search(q[:10], 5)


def test_hnsw_recall_is_measured_against_exact(tmp_path: Path, encoder: Encoder, items, vectors) -> None:
    result = build_index(
        indexes_dir=tmp_path, name="h", items=items, encoder=encoder, faiss_key="HNSW8,Flat", use_gpu=False
    )
    m = result.manifest
    ef = m.faiss.params["efSearch"]
    assert m.faiss.key == "HNSW8,Flat" and m.recall_at_10["target"] == 0.95
    # tuned: the cheapest efSearch of the ladder that reaches the target, every cheaper one tried and short of it
    tried = m.recall_at_10["tuned"]["efSearch"]
    assert tried[-1] == [ef, round(m.recall_at_10["value"], 4)] and m.recall_at_10["value"] >= 0.95
    assert all(r < 0.95 for _, r in tried[:-1])
    # Recompute recall independently with the tuned efSearch: FAISS top-10 vs numpy exact top-10 for every item,
    # each item's own vector left out of both.
    index = LoadedIndex(tmp_path, "h", use_gpu=False)
    hnsw = index.segments[0].data.indexes["text"]
    assert hnsw.hnsw.efSearch == ef
    _, found = hnsw.search(vectors, 11)
    truth = exact_topk(vectors, vectors, 11)
    recall = np.mean(
        [len(set(a[a != i][:10]) & set(b[b != i][:10])) / 10 for i, (a, b) in enumerate(zip(found, truth, strict=True))]
    )
    assert recall >= 0.93 and abs(m.recall_at_10["value"] - recall) < 0.03
    assert verify_index(tmp_path, "h")["segments"][0]["recall_at_10"]["value"] >= 0.93


def test_bad_faiss_key_is_invalid_input(tmp_path: Path, encoder: Encoder, items) -> None:
    with pytest.raises(InvalidInput, match="FAISS index key"):
        build_index(indexes_dir=tmp_path, name="x", items=items[:20], encoder=encoder, faiss_key="Nonsense99")
    assert not IndexDir(tmp_path, "x").exists()


def test_failed_build_leaves_the_published_version_alone(tmp_path: Path, encoder: Encoder, items) -> None:
    first = build_index(indexes_dir=tmp_path, name="t", items=items[:50], encoder=encoder, use_gpu=False)

    def crash(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt  # the user hits Ctrl-C (or the process dies) mid-encoding

    with pytest.raises(KeyboardInterrupt):
        build_index(indexes_dir=tmp_path, name="t", items=items, encoder=encoder, progress=crash, use_gpu=False)
    d = IndexDir(tmp_path, "t")
    assert d.current() == first.manifest.version
    assert d.versions() == [first.manifest.version]
    assert not [p for p in d.versions_dir.iterdir() if p.name.startswith(".")]
    assert not [p for p in d.segments_dir.iterdir() if p.name.startswith(".")]
    assert LoadedIndex(tmp_path, "t", use_gpu=False).size == 50


def test_unpublished_version_then_publish(tmp_path: Path, encoder: Encoder, items) -> None:
    a = build_index(indexes_dir=tmp_path, name="t", items=items[:30], encoder=encoder, use_gpu=False)
    b = build_index(indexes_dir=tmp_path, name="t", items=items[:60], encoder=encoder, publish=False, use_gpu=False)
    d = IndexDir(tmp_path, "t")
    assert d.current() == a.manifest.version and sorted(d.versions()) == sorted(
        [a.manifest.version, b.manifest.version]
    )
    d.publish(b.manifest.version)
    assert LoadedIndex(tmp_path, "t", use_gpu=False).size == 60
    with pytest.raises(IndexNotFound, match="no version"):
        d.publish("20990101T000000-ffffff")
    with pytest.raises(IndexNotFound):
        d.publish("../../etc")
    assert list_indexes(tmp_path) == ["t"]


def test_index_names_are_checked(tmp_path: Path) -> None:
    for bad in ["", "../x", "a/b", ".hidden", "x" * 65]:
        with pytest.raises(InvalidInput, match="invalid index name"):
            IndexDir(tmp_path, bad)
    with pytest.raises(IndexNotFound, match="does not exist"):
        IndexDir(tmp_path, "absent").current()


def test_index_from_another_model_is_refused(tmp_path: Path, encoder: Encoder, items) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items[:20], encoder=encoder, use_gpu=False)
    with pytest.raises(FingerprintMismatch, match="not the loaded model"):
        LoadedIndex(tmp_path, "t", expect_fingerprint="0" * 64, use_gpu=False)


def test_verify_detects_a_broken_version(tmp_path: Path, encoder: Encoder, items) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items[:40], encoder=encoder, use_gpu=False)
    assert verify_index(tmp_path, "t")["ok"]
    seg = only_segment(tmp_path, "t")
    # Replace the FAISS file with one holding fewer vectors: its checksum fails.
    small, _ = faiss_backend.build(encoder.encode_text(["one", "two"]), "Flat", use_gpu=False)
    faiss_backend.write(small, seg / "dense.text.faiss")
    with pytest.raises(BundleError, match="dense.text.faiss is damaged"):
        verify_index(tmp_path, "t")
    # a manifest whose checksum was forged to match: the counts still give it away
    manifest = json.loads((seg / "manifest.json").read_text())
    manifest["checksums"]["dense.text.faiss"] = sha256_file(seg / "dense.text.faiss")
    (seg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="inconsistent"):
        verify_index(tmp_path, "t")
    os.remove(seg / "items.sqlite")
    with pytest.raises(BundleError, match="items.sqlite is missing"):
        verify_index(tmp_path, "t")
