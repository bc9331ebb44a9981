"""The automatic FAISS index choice (indexer.index_choice): the pure rule at several sizes and budgets, and real builds
of synthetic clustered vectors above a lowered Flat threshold, tuned to recall@10 0.95 against exact search, recorded
in the manifest and searched through the segment search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_backend
from indexer.index_choice import GB, IndexTooLarge, choose_index, estimate_bytes, mapped_bytes, nlist_for
from indexer.layout import IndexDir, ModelRef, SegmentRef, new_version_name
from indexer.publish import commit
from indexer.search import LoadedIndex
from indexer.segment_writer import RowRecord, write_segment
from indexer.synthetic import clustered
from indexer.tuning import exact_truth
from indexer.verify import verify_index
from models.files import staging_dir

DIM = 64
N = 12_000
EXACT_UP_TO = 2_000  # lowered so that a small corpus gets what a large one would


@pytest.mark.parametrize(
    ("n", "budget_gb", "key"),
    [
        (1_000, None, "Flat"),
        (50_000, None, "Flat"),
        (50_001, None, "IVF1024,Flat"),
        (200_000, None, "IVF2048,Flat"),
        (200_000, 0.2, "IVF2048,SQ8"),  # IVF-Flat (~0.29 GB) exceeds the budget
        (1_000_000, None, "IVF4096,SQ8"),
        (1_000_000, 0.2, "IVF4096,PQ48np,Refine(SQ8)"),  # on disk: SQ8 in RAM (~0.37 GiB) exceeds the budget
        (5_000_000, 8, "IVF4096,SQ8"),  # ~1.8 GiB; at most 4,096 lists
        (5_000_000, 1, "IVF4096,PQ48np,Refine(SQ8)"),
        (5_000_001, None, "IVF4096,PQ48np,Refine(SQ8)"),
        (10_000_000, None, "IVF4096,PQ48np,Refine(SQ8)"),
        (100_000_000, 0.01, "IVF4096,PQ48np,Refine(SQ8)"),  # ~6 MiB resident, ~41 GiB mapped
    ],
)
def test_choice_by_size_and_budget(n: int, budget_gb: float | None, key: str) -> None:
    budget = None if budget_gb is None else int(budget_gb * GB)
    choice = choose_index(n, 384, budget)
    assert choice.key == key
    assert budget is None or choice.estimated_bytes <= budget
    assert choice.ondisk == ("Refine" in key) and (choice.mapped_bytes > 0) == choice.ondisk
    record = choice.record()
    assert record["n"] == n and record["dim"] == 384 and record["budget_bytes"] == budget and record["reason"]
    if choice.nlist:
        assert f"IVF{choice.nlist}," in key and 0 < choice.train_sample <= 64 * choice.nlist


def test_nlist_and_estimates() -> None:
    for n in (700, 10_000, 100_000, 1_000_000, 10_000_000, 10**9):
        nlist = nlist_for(n)
        assert nlist & (nlist - 1) == 0 and 16 <= nlist <= 65_536 and n // nlist >= 39
    # bytes a vector: 4*dim for Flat, dim + id for SQ8, dim/4 + id for the fast-scan PQ
    assert estimate_bytes("Flat", 1000, 384) == 1000 * 1536
    per = {k: (estimate_bytes(k, 2_000_000, 384, 4096) - estimate_bytes(k, 1_000_000, 384, 4096)) / 1e6 for k in (
        "IVF-Flat", "IVF-SQ8", "IVF-PQ-disk")}  # fmt: skip
    assert per == {"IVF-Flat": 1544, "IVF-SQ8": 392, "IVF-PQ-disk": 0}  # on disk: nothing resident grows with n
    # what it maps instead: 48 bytes of PQ code, an 8-byte id and 384 bytes of SQ8 code a vector
    assert mapped_bytes("IVF-PQ-disk", 1_000_000, 384) == 440 * 1_000_000 and mapped_bytes("IVF-SQ8", 10, 384) == 0


def test_a_budget_nothing_fits_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IndexTooLarge, match=r"no FAISS index of 100000000 vectors .* fits the memory budget of 0.001"):
        choose_index(100_000_000, 384, GB // 1000)  # even the on-disk index's centroids take ~6 MiB
    with pytest.raises(IndexTooLarge, match="memory budget"):
        choose_index(500, 384, 1000)  # too few vectors for an inverted file, and Flat too large
    vectors = clustered(3_000, DIM)
    with pytest.raises(IndexTooLarge, match="--memory-budget"):
        write_segment(tmp_path, **segment_args(vectors), memory_budget=10_000, exact_up_to=EXACT_UP_TO, use_gpu=False)


def test_a_users_key_wins(tmp_path: Path) -> None:
    vectors = clustered(3_000, DIM)
    m = write_segment(
        tmp_path,
        **segment_args(vectors),
        faiss_key="HNSW8,Flat",
        memory_budget=10_000,
        exact_up_to=EXACT_UP_TO,
        use_gpu=False,
    )
    assert m.faiss.key == "HNSW8,Flat" and m.faiss.choice["reason"] == "given by the user"
    assert m.recall_at_10["value"] >= 0.95 and "efSearch" in m.faiss.params


def segment_args(vectors: np.ndarray) -> dict:
    n, dim = vectors.shape
    records = [RowRecord(id=f"item{i}", modality="text", source=str(i), text=f"t{i}", metadata={}) for i in range(n)]
    model = ModelRef(name="synthetic", fingerprint="0" * 64, dim=dim)
    segment = new_version_name()
    return {"index": "s", "segment": segment, "records": records, "vectors": vectors, "tokens": None, "model": model}


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return clustered(N, DIM, clusters=64)


@pytest.mark.parametrize(("budget", "kind"), [(None, "Flat"), (N * (DIM + 8) + 200_000, "SQ8")])
def test_built_above_the_flat_threshold_reaches_the_recall_target_and_searches_right(
    tmp_path: Path, vectors: np.ndarray, budget: int | None, kind: str
) -> None:
    d = IndexDir(tmp_path, "s")
    d.segments_dir.mkdir(parents=True)
    args = segment_args(vectors)
    with staging_dir(d.segments_dir, args["segment"]) as tmp:
        m = write_segment(tmp, **args, memory_budget=budget, exact_up_to=EXACT_UP_TO, use_gpu=False)
        commit(d, "build", [(tmp, m)], lambda base: [SegmentRef(id=m.id, rows=m.size)], build={})
    assert m.faiss.key == f"IVF{nlist_for(N)},{kind}"
    choice = m.faiss.choice
    assert choice["n"] == N and choice["dim"] == DIM and choice["budget_bytes"] == budget
    assert choice["estimated_bytes"] > 0 and choice["train_sample"] == min(N, 64 * choice["nlist"])
    recall = m.recall_at_10
    assert recall["value"] >= 0.95 and recall["reached"] and recall["target"] == 0.95
    assert recall["tuned"]["nprobe"][-1] == [m.faiss.params["nprobe"], round(recall["value"], 4)]
    assert all(r < 0.95 for _, r in recall["tuned"]["nprobe"][:-1])
    assert recall["queries_per_second"] > 0 and recall["queries_per_second_batched"] > 0

    # the segment search, with the tuned nprobe it loads, against exact search (ties tolerated)
    index = LoadedIndex(tmp_path, "s", use_gpu=False)
    assert index.manifest.faiss.key == m.faiss.key and index.manifest.faiss.choice == choice
    queries = clustered(100, DIM, clusters=64, stream=1)  # fresh draws
    truth = exact_truth(vectors, queries, 10)
    hits = 0
    for q, kth in zip(queries, truth.kth, strict=True):
        found = index.search(q, 10, duplicates_first=False)
        rows = [int(h.id[4:]) for h in found]
        exact = vectors[rows] @ q
        assert len(found) == 10 and np.allclose([h.similarity for h in found], exact, atol=0.02)
        hits += int((exact >= kth - 1e-5).sum())
    assert hits / 1000 >= 0.93
    index.close()

    report = verify_index(tmp_path, "s")["segments"][0]
    assert report["recall_at_10"]["value"] >= 0.95 and report["params"] == m.faiss.params
    assert report["truth"] == "exact search over the original float vectors"
    assert report["recall_at_10"] == {
        k: v for k, v in m.recall_at_10["heldout"].items() if k in ("value", "k", "sample")
    }


def test_training_sample_is_bounded() -> None:
    rows = faiss_backend.train_rows(100_000, 256)
    assert rows is not None and len(rows) == 64 * 256 and len(set(rows.tolist())) == len(rows)
    assert faiss_backend.train_rows(10_000, 256) is None


def test_cli_memory_budget_refuses_then_the_same_build_resumes(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`xmodal index build --memory-budget` and XMODAL_INDEX_MEMORY_GB reach the choice; a refused build keeps its
    encoded checkpoints, so the same build with a larger budget encodes nothing again."""
    from typer.testing import CliRunner

    from indexer.demo import write_demo_corpus
    from service.cli import app

    corpus = write_demo_corpus(tmp_path / "c.jsonl", n=40)
    monkeypatch.setenv("XMODAL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XMODAL_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("XMODAL_INDEX_MEMORY_GB", "0.000001")  # ~1 KiB: not even 40 vectors fit
    build = ["index", "build", "--name", "t", "--corpus", str(corpus)]
    result = CliRunner().invoke(app, build)
    assert isinstance(result.exception, IndexTooLarge) and "fits the memory budget" in result.exception.message
    result = CliRunner().invoke(app, [*build, "--memory-budget", "0.5"])  # the option wins over the setting
    assert result.exit_code == 0, result.output
    m = IndexDir(tmp_path / "data" / "indexes", "t").manifest()
    assert m.faiss.key == "Flat" and m.faiss.choice["budget_bytes"] == 1 << 29
    assert m.build["resumed_vectors"] == m.build["vectors"] > 0


@pytest.mark.slow  # a build, two adds and two compactions through the CLI with the real encoder: ~10 s
def test_adds_and_compactions_choose_within_the_memory_budget(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segment an add or a compaction writes gets its index chosen within the budget too: XMODAL_INDEX_MEMORY_GB
    (through the service's index operations, as the jobs call them), or --memory-budget, which wins."""
    from typer.testing import CliRunner

    from indexer.demo import write_demo_corpus
    from service.cli import app

    monkeypatch.setenv("XMODAL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XMODAL_MODELS_DIR", str(models_dir))
    corpus = write_demo_corpus(tmp_path / "c.jsonl", n=30)
    more = write_demo_corpus(tmp_path / "more.jsonl", n=40, seed=8)
    runner = CliRunner()
    assert runner.invoke(app, ["index", "build", "--name", "t", "--corpus", str(corpus)]).exit_code == 0
    d = IndexDir(tmp_path / "data" / "indexes", "t")

    monkeypatch.setenv("XMODAL_INDEX_MEMORY_GB", "0.000001")  # ~1 KiB: not even 30 vectors fit
    for gib in (0.5, 0.25):
        for command in (["index", "add", "t", "--corpus", str(more)], ["index", "compact", "t"]):
            before = d.current()
            result = runner.invoke(app, command)  # with XMODAL_INDEX_MEMORY_GB alone: refused, nothing published
            assert isinstance(result.exception, IndexTooLarge) and "fits the memory budget" in result.exception.message
            assert d.current() == before
            result = runner.invoke(app, [*command, "--memory-budget", str(gib)])
            assert result.exit_code == 0, result.output
            segment = d.manifest().segments[-1]
            assert d.segment_manifest(segment.id).faiss.choice["budget_bytes"] == int(gib * GB)
    assert d.manifest().operation == "compact" and len(d.manifest().segments) == 1
