"""IVF-PQ with on-disk inverted lists (indexer.ondisk), chosen when a memory budget leaves no room for an index in RAM:
built by the segment writer, published, served memory-mapped through the segment search against exact search,
deleted rows kept out, checksums verified (a damaged .ivfdata is refused); and `xmodal index verify` measuring
recall against exact answers over the original float vectors, where compression loss shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexer import dense_build, faiss_backend, ondisk, tuning
from indexer.layout import IndexDir, ModelRef, SegmentRef, new_version_name
from indexer.lifecycle import delete_items
from indexer.publish import commit
from indexer.search import LoadedIndex
from indexer.segment_writer import RowRecord, write_segment
from indexer.synthetic import clustered, clustered_chunks
from indexer.vector_source import VectorSource
from indexer.verify import verify_index
from models.errors import BundleError
from models.files import staging_dir

DIM = 64
N = 12_000
EXACT_UP_TO = 2_000  # lowered so that a small corpus gets what a large one would
ON_DISK = 200_000  # bytes: below IVF-SQ8's ~0.9 MB for N vectors, above the on-disk index's ~0.15 MB resident


def publish_segment(root: Path, vectors: np.ndarray, **options) -> object:  # noqa: ANN003
    """Write ``vectors`` as the only segment of index "s" through the segment writer and publish it."""
    n = len(vectors)
    d = IndexDir(root, "s")
    d.segments_dir.mkdir(parents=True, exist_ok=True)
    segment = new_version_name()
    records = [RowRecord(id=f"item{i}", modality="text", source=str(i), text=None, metadata={}) for i in range(n)]
    model = ModelRef(name="synthetic", fingerprint="0" * 64, dim=vectors.shape[1])
    with staging_dir(d.segments_dir, segment) as tmp:
        m = write_segment(
            tmp, index="s", segment=segment, records=records, vectors=vectors, tokens=None, model=model,
            exact_up_to=EXACT_UP_TO, use_gpu=False, **options,
        )  # fmt: skip
        commit(d, "build", [(tmp, m)], lambda base: [SegmentRef(id=m.id, rows=m.size)], build={})
    return m


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(N, DIM, clusters=64)


def mapped_files() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}


def test_an_on_disk_segment_is_built_served_memory_mapped_and_verified(tmp_path: Path, vectors: np.ndarray) -> None:
    m = publish_segment(tmp_path, vectors, memory_budget=ON_DISK)
    key = "IVF256,PQ8np,Refine(SQ8)"  # 256 lists for 12k vectors, dim/8 sub-quantisers of 8 bits, SQ8 to re-rank
    assert m.faiss.key == key and m.faiss.ondisk and m.faiss.choice["ondisk"]
    assert m.faiss.choice["estimated_bytes"] <= ON_DISK < m.faiss.choice["mapped_bytes"] + m.faiss.choice[
        "estimated_bytes"]  # fmt: skip
    assert "on disk" in m.faiss.choice["reason"] and "IVF-Flat exceeding the budget" in m.faiss.choice["reason"]
    folder = IndexDir(tmp_path, "s").segment_dir(m.id)
    names = {"dense.text.faiss", "dense.text.ivfdata", "dense.text.refine.faiss"}
    assert names <= set(m.checksums) and not (folder / ondisk.SHARDS).exists()
    assert (folder / "dense.text.ivfdata").stat().st_size == N * (8 + 8)  # a PQ code and an id a row
    # tuned together: nprobe and the re-ranked candidates, the first pair that reaches the target
    recall = m.recall_at_10
    tried = recall["tuned"]["nprobe/k_factor_rf"]
    assert recall["reached"] and recall["value"] >= 0.95 and all(r < 0.95 for *_, r in tried[:-1])
    assert tried[-1] == [m.faiss.params["nprobe"], m.faiss.params["k_factor_rf"], round(recall["value"], 4)]
    held = recall["heldout"]
    assert held["value"] >= 0.95 and held["sample"] == 256 and held["truth"].endswith("original float vectors")

    # served through the segment search: the lists and the SQ8 codes memory-mapped, read-only, from the segment
    index = LoadedIndex(tmp_path, "s", use_gpu=False)
    faiss = faiss_backend.import_faiss()
    dense = index.segments[0].data.indexes["text"]
    assert isinstance(dense, faiss.IndexRefine) and dense.ntotal == N
    lists = faiss.extract_index_ivf(dense).invlists
    assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    assert {str(folder / "dense.text.ivfdata"), str(folder / "dense.text.refine.faiss")} <= mapped_files()
    queries = clustered(100, DIM, clusters=64, stream=1)  # fresh draws
    truth = tuning.exact_truth(vectors, queries, 10)
    hits = 0
    for q, kth in zip(queries, truth.kth, strict=True):
        found = index.search(q, 10, duplicates_first=False)
        rows = [int(h.id[4:]) for h in found]
        exact = vectors[rows] @ q
        assert len(found) == 10 and np.allclose([h.similarity for h in found], exact, atol=0.02)  # SQ8 scores
        hits += int((exact >= kth - 1e-5).sum())
    assert hits / 1000 >= 0.93
    index.close()

    # a deleted row is kept out by the selector restricting the IVF's candidates before they are re-ranked
    best = [int(h.id[4:]) for h in LoadedIndex(tmp_path, "s", use_gpu=False).search(queries[0], 5)]
    delete_items(tmp_path, "s", [f"item{best[0]}"])
    after = LoadedIndex(tmp_path, "s", use_gpu=False)
    assert after.segments[0]._selectors["text"] is not None
    found = [int(h.id[4:]) for h in after.search(queries[0], 5)]
    assert best[0] not in found and found[:4] == best[1:5]
    after.close()

    report = verify_index(tmp_path, "s")["segments"][0]
    assert report["ondisk"] and report["truth"] == held["truth"] and report["recall_at_10"]["value"] == held["value"]
    assert report["checksums"] == len(m.checksums)

    # a damaged list file fails its checksum: refused by the service's loader and by verify
    data = folder / "dense.text.ivfdata"
    raw = bytearray(data.read_bytes())
    raw[100:120] = bytes(20)
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"dense.text.ivfdata is damaged"):
        LoadedIndex(tmp_path, "s", use_gpu=False)
    with pytest.raises(BundleError, match=r"dense.text.ivfdata is damaged"):
        verify_index(tmp_path, "s")
    data.unlink()
    with pytest.raises(BundleError, match=r"dense.text.ivfdata is missing"):
        LoadedIndex(tmp_path, "s", use_gpu=False)


def test_built_from_streamed_chunks_as_from_an_array(tmp_path: Path) -> None:
    """The on-disk build reads its vectors as chunks (bench/scale.py's 10M are never held): the same index and the
    same exact answers as from the array, its SQ8 codes written chunk by chunk into a file FAISS reads back."""
    n, dim, chunk = 5_000, 32, 1_500
    array = clustered(n, dim, clusters=32, chunk=chunk)
    streamed = VectorSource(n=n, dim=dim, make_chunks=lambda: clustered_chunks(n, dim, clusters=32, chunk=chunk))
    queries = clustered(50, dim, clusters=32, stream=1)
    key = "IVF64,PQ4np,Refine(SQ8)"
    built, answers = {}, {}
    for name, source in (("array", VectorSource.of_array(array, chunk)), ("stream", streamed)):
        (tmp_path / name).mkdir()
        answers[name] = tuning.TopK(queries)  # other queries answered in the pass that adds the vectors
        built[name] = dense_build.build(tmp_path / name, "text", source, key, True, observers=[answers[name].add])
    a, b = built["array"], built["stream"]
    exact = tuning.exact_truth(array, queries, 10)
    for top in answers.values():
        got = top.truth(10)
        assert np.array_equal(got.ids[:, :10], exact.ids[:, :10]) and np.allclose(got.scores, exact.scores)
    assert np.array_equal(a.heldout.ids, b.heldout.ids) and np.array_equal(a.tune.own, b.tune.own)
    for name in ("dense.text.ivfdata", "dense.text.refine.faiss"):
        assert (tmp_path / "array" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes()
    codes = faiss_backend.import_faiss().read_index(str(tmp_path / "stream" / "dense.text.refine.faiss"))
    assert codes.ntotal == n and np.abs(codes.reconstruct_n(0, n) - array).mean() < 0.005  # 8-bit codes
    assert a.index.search(queries, 10)[1].tolist() == b.index.search(queries, 10)[1].tolist()


def test_verify_measures_recall_against_the_original_vectors(tmp_path: Path, vectors: np.ndarray) -> None:
    """4-bit scalar codes searched exhaustively: exact against their own reconstruction (what verify measured before
    segments kept held-out answers), short of it against the float vectors, which verify now reports."""
    m = publish_segment(tmp_path, vectors, faiss_key="SQ4")
    report = verify_index(tmp_path, "s")["segments"][0]
    value = report["recall_at_10"]["value"]
    assert report["truth"] == "exact search over the original float vectors"
    assert value == m.recall_at_10["heldout"]["value"] == report["recall_at_10_at_build"]["value"] < 0.9
    folder = IndexDir(tmp_path, "s").segment_dir(m.id)
    index = faiss_backend.read(folder / "dense.text.faiss")
    hits = tuning.recall_hits(index, faiss_backend.all_vectors(index))
    assert hits[0] / (hits[1] * hits[2]) > 0.99  # the loss the decoded codes hide
    # the held-out answers are part of the segment: damaged, they are refused like any file
    held = folder / "heldout" / "text.ids.npy"
    ids = np.load(held)
    ids[:, 0] = ids[:, 1]
    np.save(held, ids)
    with pytest.raises(BundleError, match=r"heldout/text.ids.npy is damaged"):
        verify_index(tmp_path, "s")
    assert json.loads((folder / "manifest.json").read_text())["recall_at_10"]["heldout"]["files"] == "heldout"
