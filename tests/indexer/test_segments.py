"""Living indexes: a version is a list of segments with tombstones. Checked against an index built in one go over
the same items (Flat: exact), with the real encoder, FAISS and token stores."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from indexer.build import LateBuild, add_items, build_index
from indexer.corpus import CorpusItem, read_corpus
from indexer.late.pipeline import LateParams
from indexer.layout import IndexDir
from indexer.lifecycle import compact, delete_items
from indexer.search import LateRequest, LoadedIndex
from indexer.verify import verify_index
from models.encoder import Encoder
from models.errors import BundleError, InvalidInput

EXACT = LateParams(exhaustive=True)


@pytest.fixture(scope="module")
def items(media_corpus: Path) -> list[CorpusItem]:
    return read_corpus(media_corpus)


@pytest.fixture(scope="module")
def queries(encoder: Encoder):
    texts = ["two red circles", "a low hum", "a blue square on the left", "birds chirping"]
    return encoder.encode_text(texts), encoder.encode_text_tokens(texts)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory, encoder: Encoder, items) -> Path:
    """``whole``: every item in one build; ``parts``: the first 60% built, the rest added in two adds."""
    root = tmp_path_factory.mktemp("segments")
    a, b = int(len(items) * 0.6), int(len(items) * 0.8)
    build_index(indexes_dir=root, name="whole", items=items, encoder=encoder, use_gpu=False, late=LateBuild())
    build_index(indexes_dir=root, name="parts", items=items[:a], encoder=encoder, use_gpu=False, late=LateBuild())
    add_items(indexes_dir=root, name="parts", items=items[a:b], encoder=encoder, use_gpu=False)
    add_items(indexes_dir=root, name="parts", items=items[b:], encoder=encoder, use_gpu=False)
    return root


def same_hits(a: list, b: list) -> None:
    """The same items with the same scores, ties in any order."""
    assert len(a) == len(b)
    assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    by_score = lambda hits: sorted((round(h.score, 4), h.id) for h in hits)  # noqa: E731
    assert by_score(a) == by_score(b)


def test_segments_give_exactly_the_results_of_one_index(indexes: Path, queries) -> None:
    whole, parts = LoadedIndex(indexes, "whole", use_gpu=False), LoadedIndex(indexes, "parts", use_gpu=False)
    assert len(parts.manifest.segments) == 3 and parts.manifest.operation == "add"
    assert parts.manifest.counts == whole.manifest.counts and parts.size == whole.size
    vectors, tokens = queries
    for i, q in enumerate(vectors):
        for target in whole.modalities:
            same_hits(parts.search(q, 20, [target]), whole.search(q, 20, [target]))
            late = LateRequest(tokens.tokens[i], q, EXACT)
            same_hits(parts.search_late(late, 15, [target]), whole.search_late(late, 15, [target]))
        filtered = {"kind": "sound"}
        same_hits(parts.search(q, 10, ["text"], filtered), whole.search(q, 10, ["text"], filtered))
    # explain: each query token's best item token, found in whichever segment holds the item
    late = LateRequest(tokens.tokens[0], vectors[0], EXACT, explain=True)
    for a, b in zip(parts.search_late(late, 5, ["image"]), whole.search_late(late, 5, ["image"]), strict=True):
        assert a.id == b.id
        assert [(m.item_token, round(m.similarity, 5)) for m in a.matches] == [
            (m.item_token, round(m.similarity, 5)) for m in b.matches
        ]
    # an item's rows, its stored vectors and its media are found across segments
    last = parts.items.all_rows()[-1]
    assert parts.items.get([last[0]])[last[0]]["id"] == last[1]
    rows = parts.items.rows_of([last[1]], last[2])
    assert np.allclose(
        parts.vectors([rows[last[1]]])[0], whole.vectors([whole.items.rows_of([last[1]], last[2])[last[1]]])[0]
    )


def test_add_then_search_finds_the_new_item_and_upsert_replaces(tmp_path: Path, encoder: Encoder, items) -> None:
    texts = [it for it in items if it.text and it.image is None and it.audio is None][:30] or items[:30]
    build_index(indexes_dir=tmp_path, name="t", items=texts, encoder=encoder, use_gpu=False)
    new = CorpusItem(id="new-1", text="a purple giraffe reading a newspaper", metadata={"kind": "added"}, source="x")
    m = add_items(indexes_dir=tmp_path, name="t", items=[new], encoder=encoder, use_gpu=False)
    assert m.build["replaced"] == 0 and sum(m.counts.values()) == sum(1 for it in texts for _ in it.modalities) + 1
    index = LoadedIndex(tmp_path, "t", use_gpu=False)
    top = index.search(encoder.encode_text([new.text])[0], 1, ["text"])[0]
    assert (top.id, top.metadata) == ("new-1", {"kind": "added"})
    # upsert: the same id with another text; the old row is tombstoned, the count unchanged
    changed = dataclasses.replace(new, text="a steam train crossing a bridge", metadata={"kind": "upserted"})
    m2 = add_items(indexes_dir=tmp_path, name="t", items=[changed], encoder=encoder, use_gpu=False)
    assert m2.build["replaced"] == 1 and m2.counts == m.counts
    index = LoadedIndex(tmp_path, "t", use_gpu=False)
    hits = index.search(encoder.encode_text([new.text])[0], index.size, ["text"])
    assert [h.metadata for h in hits if h.id == "new-1"] == [{"kind": "upserted"}]  # once, the new text
    assert index.search(encoder.encode_text([changed.text])[0], 1, ["text"])[0].id == "new-1"


def test_a_new_version_shares_the_segments_it_replaces(tmp_path: Path, encoder: Encoder, items) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items[:30], encoder=encoder, use_gpu=False)
    old = LoadedIndex(tmp_path, "t", use_gpu=False)
    add_items(indexes_dir=tmp_path, name="t", items=items[30:40], encoder=encoder, use_gpu=False)
    delete_items(tmp_path, "t", [items[0].id])
    new = LoadedIndex(tmp_path, "t", use_gpu=False, previous=old)
    assert new.segments[0].data is old.segments[0].data  # loaded and checked once
    assert new.segments[0].dead.sum() > 0 and old.segments[0].dead.sum() == 0  # tombstones are per version
    assert items[0].id in {r[1] for r in old.items.all_rows()} - {r[1] for r in new.items.all_rows()}


def test_deleted_items_are_never_returned(tmp_path: Path, encoder: Encoder, items, queries) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items, encoder=encoder, use_gpu=False, late=LateBuild())
    before = LoadedIndex(tmp_path, "t", use_gpu=False)
    vectors, tokens = queries
    gone = {h.id for q in vectors for h in before.search(q, 5)}  # the best of every query
    m, missing = delete_items(tmp_path, "t", sorted(gone) + ["no-such-id"])
    assert missing == ["no-such-id"] and m.build["deleted"] == len(gone) and m.operation == "delete"
    index = LoadedIndex(tmp_path, "t", use_gpu=False)
    assert index.size < before.size
    kinds = sorted({it.metadata.get("kind") for it in items} - {None})
    for i, q in enumerate(vectors):
        for targets in ([t] for t in index.modalities):
            assert not gone & {h.id for h in index.search(q, index.size, targets)}
            late = LateRequest(tokens.tokens[i], q)
            assert not gone & {h.id for h in index.search_late(late, 50, targets)}
            assert not gone & {h.id for h in index.search_late(LateRequest(tokens.tokens[i], q, EXACT), 50, targets)}
        assert not gone & {h.id for h in index.search(q, 50, filter={"kind": kinds})}
    assert not set(index.items.sources(sorted(gone), ("image", "audio", "text")))
    # the GPU path (no FAISS selectors there: over-fetch by the deleted count, drop deleted rows) gives the same
    unselected = LoadedIndex(tmp_path, "t", use_gpu=False, selectors=False)
    assert unselected.segments[0]._selectors == {m: None for m in unselected.modalities}
    for q in vectors:
        for target in index.modalities:
            same_hits(unselected.search(q, 30, [target]), index.search(q, 30, [target]))
    with pytest.raises(InvalidInput, match="holds none"):
        delete_items(tmp_path, "t", ["no-such-id"])
    assert IndexDir(tmp_path, "t").current() == m.version  # nothing published for it


def test_compaction_drops_deleted_rows_and_keeps_the_results(tmp_path: Path, encoder: Encoder, items, queries) -> None:
    half = len(items) // 2
    build_index(indexes_dir=tmp_path, name="t", items=items[:half], encoder=encoder, use_gpu=False, late=LateBuild())
    add_items(indexes_dir=tmp_path, name="t", items=items[half:], encoder=encoder, use_gpu=False)
    delete_items(tmp_path, "t", [items[0].id, items[-1].id])
    before = LoadedIndex(tmp_path, "t", use_gpu=False)
    m = compact(tmp_path, "t", use_gpu=False, keep_versions=1)
    assert len(m.segments) == 1 and not m.segments[0].tombstones and m.counts == before.manifest.counts
    assert m.build["segments_merged"] == 2 and m.build["rows_dropped"] == sum(
        len(r.tombstones) for r in before.manifest.segments
    )
    after = LoadedIndex(tmp_path, "t", use_gpu=False)
    vectors, tokens = queries
    for i, q in enumerate(vectors):
        for target in after.modalities:
            same_hits(after.search(q, 20, [target]), before.search(q, 20, [target]))
            late = LateRequest(tokens.tokens[i], q, EXACT)
            same_hits(after.search_late(late, 10, [target]), before.search_late(late, 10, [target]))
    d = IndexDir(tmp_path, "t")
    # keep_versions=1: the older versions went, and with them every segment only they listed
    assert d.versions() == [m.version]
    assert sorted(p.name for p in d.segments_dir.iterdir()) == [m.segments[0].id]
    (report,) = verify_index(tmp_path, "t")["segments"]
    assert report["recall_at_10"]["value"] == report["recall_at_10_at_build"]["value"] == 1.0  # exact, ties tolerated
    with pytest.raises(InvalidInput, match="nothing to compact"):
        compact(tmp_path, "t", use_gpu=False)


def test_concurrent_adds_both_land(tmp_path: Path, encoder: Encoder, items) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items[:20], encoder=encoder, use_gpu=False)
    errors = []

    def add(part: list[CorpusItem]) -> None:
        try:
            add_items(indexes_dir=tmp_path, name="t", items=part, encoder=encoder, use_gpu=False)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(p,)) for p in (items[20:30], items[30:40])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    index = LoadedIndex(tmp_path, "t", use_gpu=False)
    assert len(index.manifest.segments) == 3
    assert {r[1] for r in index.items.all_rows()} == {it.id for it in items[:40]}


def test_a_damaged_or_copied_segment_is_refused(tmp_path: Path, encoder: Encoder, items) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items[:30], encoder=encoder, use_gpu=False)
    m = add_items(indexes_dir=tmp_path, name="t", items=items[30:40], encoder=encoder, use_gpu=False)
    d = IndexDir(tmp_path, "t")
    new = d.segment_dir(m.segments[-1].id)
    dense = next(new.glob("dense.*.faiss"))
    data = bytearray(dense.read_bytes())
    data[-20:] = bytes(20)
    dense.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="is damaged"):
        LoadedIndex(tmp_path, "t", use_gpu=False)
    with pytest.raises(BundleError, match="is damaged"):
        verify_index(tmp_path, "t")
    # a segment folder copied under another name serves nobody
    first = d.segment_dir(m.segments[0].id)
    import shutil

    shutil.copytree(first, d.segments_dir / "20990101T000000000-abcdef")
    with pytest.raises(BundleError, match="copied or moved"):
        d.segment_manifest("20990101T000000000-abcdef")
    with pytest.raises(InvalidInput, match="not .*: add with its model"):
        add_items(
            indexes_dir=tmp_path,
            name="t",
            items=items[:1],
            encoder=_OtherModel(encoder),
            use_gpu=False,
        )


class _OtherModel:
    """The real encoder under another fingerprint (what a re-exported model looks like to an index)."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder
        self.fingerprint = "f" * 64

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._encoder, name)


def test_an_interrupted_add_resumes_from_its_checkpoints(tmp_path: Path, encoder: Encoder, items) -> None:
    build_index(indexes_dir=tmp_path, name="t", items=items[:20], encoder=encoder, use_gpu=False, batch_size=4)
    before = IndexDir(tmp_path, "t").current()
    calls = []

    def crash(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after three checkpointed chunks

    more = items[20:120]
    with pytest.raises(KeyboardInterrupt):
        add_items(
            indexes_dir=tmp_path, name="t", items=more, encoder=encoder, use_gpu=False, batch_size=4, progress=crash
        )
    assert IndexDir(tmp_path, "t").current() == before  # nothing published
    m = add_items(indexes_dir=tmp_path, name="t", items=more, encoder=encoder, use_gpu=False, batch_size=4)
    assert m.build["resumed_vectors"] > 0 and m.build["encoded_vectors"] < m.build["vectors"]
    assert len(m.segments) == 2 and not list(IndexDir(tmp_path, "t").segments_dir.glob(".tmp-*"))


def test_an_add_past_max_segments_merges_only_the_small_ones(tmp_path: Path, encoder: Encoder, items, queries) -> None:
    base = build_index(indexes_dir=tmp_path, name="t", items=items[:120], encoder=encoder, use_gpu=False).manifest
    big = base.segments[0].id
    for start in (120, 130):
        add_items(indexes_dir=tmp_path, name="t", items=items[start : start + 10], encoder=encoder, use_gpu=False)
    before = LoadedIndex(tmp_path, "t", use_gpu=False)
    m = add_items(indexes_dir=tmp_path, name="t", items=items[140:150], encoder=encoder, use_gpu=False, max_segments=3)
    assert m.operation == "compact" and m.build["segments_merged"] == 3 and m.build["segments_kept"] == 1
    assert [r.id for r in m.segments][0] == big and len(m.segments) == 2  # the large segment is left alone
    after = LoadedIndex(tmp_path, "t", use_gpu=False)
    build_index(indexes_dir=tmp_path, name="whole", items=items[:150], encoder=encoder, use_gpu=False)
    whole = LoadedIndex(tmp_path, "whole", use_gpu=False)
    assert after.size == whole.size == before.size + sum(len(it.modalities) for it in items[140:150])
    for q in queries[0]:
        for target in whole.modalities:
            same_hits(after.search(q, 15, [target]), whole.search(q, 15, [target]))
