"""bench/gpu.py, the prepared script for a lent GPU machine, on this machine without a GPU: it says so and exits 3
at once, and the parts of it that need no GPU (the index path, the service path, the tower inputs) run here, so that
the one run it gets on a GPU does not die of a mistake a CPU could have shown. Its GPU checks fail here, as they
must."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.runtime import CPU, create_session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu as bench_gpu  # noqa: E402

HERE = bench_gpu.environment()
pytestmark = pytest.mark.skipif(
    HERE["faiss_gpus"] > 0 or "CUDAExecutionProvider" in HERE["ort_providers"],
    reason="describes a machine without a GPU (on one, run bench/gpu.py itself)",
)


def test_without_a_gpu_it_says_so_and_exits_3_at_once() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == bench_gpu.NO_GPU == 3, done.stdout + done.stderr
    assert "no GPU: FAISS sees no GPU and ONNX Runtime offers no CUDA provider; nothing was run" in done.stdout
    assert "| faiss_gpus     | 0 " in done.stdout  # the environment table comes first
    assert time.monotonic() - t0 < 60


def test_the_index_path_runs_here_and_only_its_gpu_checks_fail() -> None:
    report = bench_gpu.Report()
    rows = bench_gpu.index_path(report, dim=64, n=3000)
    failed = {name for name, ok, _ in report.checks if not ok}
    assert failed == {"a Flat segment is built on the GPU", "the loaded index searches on the GPU"}
    passed = {name for name, ok, _ in report.checks if ok}
    assert "GPU-served results equal CPU-served ones (k=10, with deleted rows)" in passed  # both on the CPU here
    assert "no deleted row is returned" in passed
    assert "a fast-scan IVF-PQ segment stays on the CPU, saying why" in passed
    assert rows[0][:2] == ["flat", "cpu"] and "FAISS sees no GPU" in rows[0][2]


@pytest.mark.slow
def test_the_service_path_runs_here(models_dir: Path) -> None:
    """`xmodal index build` in a subprocess, then the app's /readyz and a search: on the CPU here, so the checks that
    expect a GPU are not made (the environment says there is none)."""
    report = bench_gpu.Report()
    env = {"faiss_gpus": 0, "ort_providers": [CPU]}
    rows = bench_gpu.service_path(report, models_dir, env, items=200)
    assert report.checks and all(ok for _, ok, _ in report.checks), report.checks
    assert rows[0][0] == "xmodal index build" and rows[0][2] == "built_on=cpu"
    assert any(r[0] == "/readyz index" and r[1] == "cpu" for r in rows)


def test_tower_inputs_fit_every_graph(models_dir: Path) -> None:
    graphs, source = bench_gpu.tower_graphs(models_dir)
    assert set(graphs) == {"text", "image", "audio"} and "bundle" in source
    committed, source = bench_gpu.tower_graphs(None)
    assert set(committed) == {"image", "audio"} and "no text tower" in source
    rng = np.random.default_rng(0)
    for path in graphs.values():
        session, _ = create_session(path, device="cpu")
        feed = bench_gpu.feed_for(session, 4, rng)
        names = [o.name for o in session.get_outputs()]
        embedding = session.run(None, feed)[names.index("embedding")]
        assert embedding.shape == (4, 384) and np.allclose(np.linalg.norm(embedding, axis=1), 1, atol=1e-4)
    assert bench_gpu.items_per_second(session, feed, 4, seconds=0.2) > 0


def test_recall_tolerates_ties() -> None:
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]  # rows 0 and 1 are the same vector
    queries = np.eye(4, dtype=np.float32)[:1]
    truth_scores = np.array([[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    found = np.array([[1, 0, 2, 3, 4, -1, -1, -1, -1, -1]])
    assert bench_gpu.recall_at_10(found, queries, vectors, truth_scores) == 0.5
