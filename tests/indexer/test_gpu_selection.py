"""Where FAISS runs (indexer.gpu): the decision for real CPU FAISS indexes of every kind, and what a build and a
loaded index record. No GPU here: a GPU count is faked only at the boundary (faiss_backend.gpu_count) to test the
decision, and nothing below claims a search ran on a GPU: every index searched is a CPU index."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer import faiss_backend
from indexer.build import build_index
from indexer.corpus import read_jsonl
from indexer.gpu import GPU_MAX_K, Placement, fallback, gpu_support, place, summary
from indexer.layout import IndexDir, ModelRef, SegmentRef
from indexer.search import LoadedIndex
from indexer.segment_reader import SegmentData, SegmentView
from indexer.segment_writer import RowRecord, write_segment
from indexer.synthetic import clustered

DIM = 384
# what this machine does without a GPU (CI's case); on a GPU machine bench/gpu.py checks the GPU side
without_gpu = pytest.mark.skipif(faiss_backend.gpu_count(faiss) > 0, reason="describes a machine without a GPU")

# factory key -> (has a GPU twin, words of the reason)
KEYS = {
    "Flat": (True, "GpuIndexFlat"),
    "SQfp16": (True, "float16 GpuIndexFlat"),
    "SQ8": (False, "without an inverted file"),
    "IVF64,Flat": (True, "GpuIndexIVFFlat"),
    "IVF64,SQ8": (True, "GpuIndexIVFScalarQuantizer"),
    "IVF64,SQ4": (True, "GpuIndexIVFScalarQuantizer"),
    "IVF64,SQfp16": (True, "GpuIndexIVFScalarQuantizer"),
    "IVF64,PQ48": (True, "GpuIndexIVFPQ"),
    "IVF64,PQ96": (True, "float16 lookup tables"),  # 96 x 256 float32 tables overflow a block's shared memory
    "IVF64,PQ192": (False, "bytes only"),  # 192-byte codes: not a length the GPU scans
    "IVF64,PQ48x4": (False, "8-bit codes only"),
    "IVF64,PQ192x4fs": (False, "fast-scan"),  # what indexer.index_choice picks for IVF-PQ
    "IVF64,RQ8x8": (False, "no GPU twin"),
    "HNSW32,Flat": (False, "CAGRA"),
    "HNSW32,SQ8": (False, "CAGRA"),
    "IVF64_HNSW32,Flat": (False, "coarse quantizer"),
    "PCA64,IVF64,Flat": (True, "transform stays on the CPU"),
    "IDMap,Flat": (True, "GpuIndexFlat"),
    "IVF64,PQ16,RFlat": (False, "IndexRefineFlat"),
    "PQ48": (False, "IndexPQ"),
}


@pytest.mark.parametrize("key", sorted(KEYS))
def test_which_indexes_have_a_gpu_twin(key: str) -> None:
    ok, words = KEYS[key]
    support = gpu_support(faiss.index_factory(DIM, key, faiss.METRIC_INNER_PRODUCT))
    assert support.ok is ok and words in support.reason, support
    assert support.float16_lookup is (key == "IVF64,PQ96")


def test_limits_of_a_trained_inverted_file(tmp_path: Path) -> None:
    vectors = clustered(4000, 32, clusters=64)
    index = faiss.index_factory(32, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    assert gpu_support(index).ok
    index.nprobe = GPU_MAX_K + 1  # past what FAISS's GPU IVF probes: the clone itself would throw
    assert not gpu_support(index).ok and "nprobe" in gpu_support(index).reason
    index.nprobe = 8
    # inverted lists on disk (FAISS's own OnDiskInvertedLists, as for IVF-PQ beyond RAM) stay memory-mapped on the CPU
    ondisk = faiss.OnDiskInvertedLists(index.nlist, index.code_size, str(tmp_path / "lists.ivfdata"))
    index.replace_invlists(ondisk, False)
    support = gpu_support(index)
    assert not support.ok and "OnDiskInvertedLists" in support.reason


def test_placement_decision() -> None:
    flat = faiss.IndexFlatIP(DIM)
    hnsw = faiss.index_factory(DIM, "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    assert place(flat, use_gpu=False, gpus=2) == Placement("cpu", "GPU use is turned off (device cpu)")
    assert place(flat, use_gpu=True, gpus=0).device == "cpu"
    assert "FAISS sees no GPU" in place(flat, use_gpu=True, gpus=0).reason
    # the decision alone, given a GPU count: nothing is cloned or searched here
    assert place(flat, use_gpu=True, gpus=2) == Placement("gpu", "Flat has a GPU twin (GpuIndexFlat)", 2)
    on_cpu = place(hnsw, use_gpu=True, gpus=1)
    assert on_cpu.device == "cpu" and "CAGRA" in on_cpu.reason and on_cpu.gpus == 0
    assert on_cpu.record() == {"device": "cpu", "reason": on_cpu.reason, "gpus": 0, "float16_lookup": False}
    failed = fallback(RuntimeError("Error in void* faiss::gpu::allocMemorySpace: cudaMalloc failed\nmore"))
    assert failed.device == "cpu" and "cudaMalloc failed" in failed.reason and "more" not in failed.reason
    assert summary(["gpu", "gpu"]) == "gpu" and summary(["gpu", "cpu"]) == "mixed" and summary([]) == "cpu"


@without_gpu
def test_this_machine_builds_and_searches_on_the_cpu_and_says_why() -> None:
    vectors = clustered(2000, DIM, clusters=32)
    index, placement = faiss_backend.build(vectors, "Flat", use_gpu=True)
    assert placement.device == "cpu" and "FAISS sees no GPU" in placement.reason
    searched, placed = faiss_backend.to_device(index, use_gpu=True)
    assert searched is index and placed == placement
    _, off = faiss_backend.build(vectors, "Flat", use_gpu=False)
    assert off.reason == "GPU use is turned off (device cpu)"


def test_an_index_type_the_gpu_lacks_is_built_on_the_cpu_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With a GPU counted, an index without a GPU twin is never cloned: it is built (and searched) on the CPU, the
    reason logged and written into the segment manifest."""
    monkeypatch.setattr(faiss_backend, "gpu_count", lambda _faiss: 1)
    n, dim = 2000, 64
    vectors = clustered(n, dim, clusters=32)
    records = [RowRecord(str(i), "text", f"line {i}", f"t{i}", {}) for i in range(n)]
    model = ModelRef(name="m", fingerprint="0" * 64, dim=dim)
    with caplog.at_level(logging.WARNING, logger="indexer.faiss_backend"):
        manifest = write_segment(
            tmp_path, index="t", segment="s", records=records, vectors=vectors, tokens=None, model=model,
            faiss_key="IVF16,PQ32x4fs", use_gpu=True,
        )  # fmt: skip
    assert manifest.faiss.built_on == "cpu"
    assert manifest.faiss.placement["text"]["device"] == "cpu"
    assert "fast-scan" in manifest.faiss.placement["text"]["reason"]
    assert any("built on the CPU" in r.getMessage() and "fast-scan" in r.getMessage() for r in caplog.records)
    index = faiss_backend.read(tmp_path / "dense.text.faiss")
    searched, placed = faiss_backend.to_device(index, use_gpu=True)
    assert searched is index and placed.device == "cpu" and "fast-scan" in placed.reason
    scores, ids = index.search(vectors[:5], 1)
    assert (ids[:, 0] == np.arange(5)).mean() >= 0.6  # a working (approximate) index


@without_gpu
def test_a_build_and_a_loaded_index_say_where_faiss_ran(tmp_path: Path, encoder, demo_corpus: Path) -> None:
    """The real build path: the segment and version manifests record where FAISS built and why, and a loaded index
    reports where each segment's index is searched (the CPU here, since FAISS sees no GPU)."""
    items = read_jsonl(demo_corpus)[:60]
    version = build_index(indexes_dir=tmp_path, name="t", items=items, encoder=encoder).manifest  # use_gpu: True
    assert version.faiss.built_on == "cpu"
    assert version.faiss.placement["text"]["device"] == "cpu"
    assert "FAISS sees no GPU" in version.faiss.placement["text"]["reason"]
    loaded = LoadedIndex(tmp_path, "t")
    assert loaded.device == "cpu"
    (segment,) = loaded.placement().values()
    assert segment["text"]["device"] == "cpu" and "FAISS sees no GPU" in segment["text"]["reason"]
    off = LoadedIndex(tmp_path, "t", use_gpu=False)
    (segment,) = off.placement().values()
    assert segment["text"]["reason"] == "GPU use is turned off (device cpu)"
    loaded.close()
    off.close()


class Recorder:
    """Stands where a GPU clone would be, to check which searches a segment sends there: a CPU FAISS index (a copy of
    the segment's own) that records the k of each search. No GPU is involved."""

    def __init__(self, index) -> None:  # noqa: ANN001
        self.index, self.ks = faiss.clone_index(index), []

    def search(self, q: np.ndarray, k: int):  # noqa: ANN201
        self.ks.append(k)
        return self.index.search(q, k)


def test_routing_of_searches_past_the_gpu_top_k_limit(tmp_path: Path) -> None:
    """A segment whose index is placed on a GPU sends a search there while top-k plus its deleted rows stays within
    GPU_MAX_K, and to the CPU form (with its selector) beyond; results are the same either way."""
    n = GPU_MAX_K + 600
    vectors = clustered(n, 64, clusters=16)
    records = [RowRecord(str(i), "text", f"line {i}", f"t{i}", {}) for i in range(n)]
    model = ModelRef(name="m", fingerprint="0" * 64, dim=64)
    d = IndexDir(tmp_path, "t")
    folder = d.segments_dir / "s1"
    folder.mkdir(parents=True)
    write_segment(folder, index="t", segment="s1", records=records, vectors=vectors, tokens=None, model=model)
    data = SegmentData(d, "s1", use_gpu=False, verify=True)
    dead = [3, 5, 8]
    plain = SegmentView(data, SegmentRef(id="s1", rows=n, tombstones=dead), 0)
    want_small = plain.faiss_rows(vectors[:1], 10, "text")
    want_large = plain.faiss_rows(vectors[:1], GPU_MAX_K, "text")
    recorder = Recorder(data.cpu_indexes["text"])
    data.indexes["text"] = recorder
    data.placement["text"] = Placement("gpu", "routing test: a stand-in, see Recorder", 1)
    routed = SegmentView(data, SegmentRef(id="s1", rows=n, tombstones=dead), 0)
    got_small = routed.faiss_rows(vectors[:1], 10, "text")
    got_large = routed.faiss_rows(vectors[:1], GPU_MAX_K, "text")  # + 3 deleted rows: past the limit
    assert recorder.ks == [10 + len(dead)]  # only the small search went to the "GPU" slot, over-fetching
    for got, want in ((got_small, want_small), (got_large, want_large)):
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
    assert not set(dead) & set(got_large[1].tolist())
    data.close()
