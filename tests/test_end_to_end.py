"""The user's path through the real CLI and a real server process: build an index from JSONL, inspect it,
serve it with uvicorn, query it over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from models.bundle import DEFAULT_MODEL
from tests.conftest import free_port, write_corpus

pytestmark = pytest.mark.slow
XMODAL = [sys.executable, "-m", "service"]


def cli(data: Path, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_") and k != "REDIS_URL"} | (env or {})
    env["XMODAL_DATA_DIR"] = str(data)
    return subprocess.run([*XMODAL, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def data(tmp_path: Path, models_dir: Path) -> Path:
    shutil.copytree(models_dir, tmp_path / "data" / "models")
    return tmp_path / "data"


def test_cli_build_info_verify_and_errors(data: Path, tmp_path: Path) -> None:
    rows = [
        {"id": f"n{i}", "text": t, "metadata": {"i": i}}
        for i, t in enumerate(
            [
                "The wing stalls at a high angle of attack.",
                "Shock waves form at supersonic speed.",
                "A recipe for pancakes with blueberries.",
                "Boundary layer transition on a flat plate.",
            ]
        )
    ]
    corpus = write_corpus(tmp_path / "c.jsonl", rows)

    listing = cli(data, "models", "list")
    assert listing.returncode == 0 and f"{DEFAULT_MODEL} (default)" in listing.stdout

    built = cli(data, "index", "build", "--name", "aero", "--corpus", str(corpus))
    assert built.returncode == 0, built.stderr
    assert "4 items" in built.stderr and "recall@10 1.000" in built.stderr
    info = json.loads(cli(data, "index", "info", "aero").stdout)
    assert info["counts"] == {"text": 4} and info["model"]["name"] == DEFAULT_MODEL
    assert json.loads(cli(data, "index", "verify", "aero").stdout)["ok"] is True

    staged = cli(data, "index", "build", "--name", "aero", "--corpus", str(corpus), "--no-publish")
    assert staged.returncode == 0 and "not published" in staged.stderr
    assert json.loads(cli(data, "index", "info", "aero").stdout)["version"] == info["version"]

    late = cli(
        data, "index", "build", "--name", "aero", "--corpus", str(corpus), "--late", "--token-storage", "residual"
    )
    assert late.returncode == 0, late.stderr
    assert "fast-path recall@10" in " ".join(late.stderr.split()) and "residual" in late.stderr
    tokens = json.loads(cli(data, "index", "info", "aero").stdout)["tokens"]
    assert tokens["storage"] == "residual" and tokens["nbits"] == 2 and tokens["rows"] == 4
    assert json.loads(cli(data, "index", "verify", "aero").stdout)["ok"] is True
    no_late = cli(data, "index", "build", "--name", "aero", "--corpus", str(corpus), "--pool-factor", "2")
    assert no_late.returncode == 2 and "add --late" in no_late.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "fine"}\n{"id": 2}\n')
    failed = cli(data, "index", "build", "--name", "aero2", "--corpus", str(bad))
    assert failed.returncode == 2 and "bad.jsonl:2" in failed.stderr and "Traceback" not in failed.stderr
    missing = cli(data, "index", "info", "nope")
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr

    # rebuilt with another model, which XMODAL_MODELS leaves out: published, and said so with the way back
    other = cli(
        data,
        "index",
        "build",
        "--name",
        "aero",
        "--corpus",
        str(corpus),
        "--model",
        "all-minilm-l6-v2",
        env={"XMODAL_MODELS": "xmodal-mini"},
    )
    assert other.returncode == 0, other.stderr
    said = " ".join(other.stderr.split())
    assert "XMODAL_MODELS (xmodal-mini) leaves out" in said and "add all-minilm-l6-v2 to XMODAL_MODELS" in said
    assert "services now encode this index's queries with all-minilm-l6-v2" in said
    assert f"xmodal index publish aero {info['version']}" not in said  # the previous version was the late one
    assert "to roll back: xmodal index publish aero" in said
    listed = cli(data, "index", "versions", "aero")
    assert listed.returncode == 0, listed.stderr
    assert info["version"] in listed.stdout and "all-minilm-l6-v2" in listed.stdout and "*" in listed.stdout


def test_cli_add_delete_compact(data: Path, tmp_path: Path) -> None:
    texts = ["Lift rises with the angle of attack.", "Drag grows with speed.", "Bread rises in a warm oven."]
    corpus = write_corpus(tmp_path / "c.jsonl", [{"id": f"n{i}", "text": t} for i, t in enumerate(texts)])
    assert cli(data, "index", "build", "--name", "aero", "--corpus", str(corpus)).returncode == 0
    more = write_corpus(
        tmp_path / "more.jsonl", [{"id": "n2", "text": "Flutter of a wing."}, {"id": "n3", "text": "Stall."}]
    )
    added = cli(data, "index", "add", "aero", "--corpus", str(more))
    assert added.returncode == 0, added.stderr
    assert "2 vectors added, 1 item(s) replaced" in added.stderr and "2 segment(s)" in added.stderr
    assert json.loads(cli(data, "index", "info", "aero").stdout)["counts"] == {"text": 4}
    (tmp_path / "gone.txt").write_text("n0\nnot-there\n")
    deleted = cli(data, "index", "delete", "aero", "--ids", str(tmp_path / "gone.txt"), "--id", "n1")
    assert deleted.returncode == 0 and "2 item(s) deleted; not in the index: ['not-there']" in deleted.stderr
    nothing = cli(data, "index", "delete", "aero")
    assert nothing.returncode == 2 and "--id" in nothing.stderr
    compacted = cli(data, "index", "compact", "aero")
    assert compacted.returncode == 0 and "2 segments merged, 3 deleted rows dropped" in compacted.stderr
    info = json.loads(cli(data, "index", "info", "aero").stdout)
    assert info["counts"] == {"text": 2} and info["operation"] == "compact" and len(info["segments"]) == 1
    verified = json.loads(cli(data, "index", "verify", "aero").stdout)
    assert verified["ok"] and verified["items"] == 2
    listed = cli(data, "index", "versions", "aero").stdout
    assert all(op in listed for op in ("build", "add", "delete", "compact"))


def start_serving(data: Path, *options: str, **settings: str) -> tuple[subprocess.Popen, str]:
    """`xmodal serve` in a subprocess on a free port, once /readyz says ready; ``settings`` as XMODAL_* variables."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_") and k != "REDIS_URL"}
    env.update(XMODAL_DATA_DIR=str(data), **{f"XMODAL_{k.upper()}": v for k, v in settings.items()})
    cmd = [*XMODAL, "serve", "--port", str(port), *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "service did not become ready"
        time.sleep(0.3)


def test_serve_over_real_http(served_data: Path) -> None:
    proc, base = start_serving(served_data)
    try:
        body = {"index": "demo", "query": {"text": "a satellite photographs a comet"}, "k": 3}
        first = httpx.post(f"{base}/v1/search", json=body, timeout=10).json()
        second = httpx.post(f"{base}/v1/search", json=body, timeout=10).json()
        assert [r["metadata"]["topic"] for r in first["results"]] == ["space"] * 3
        assert (first["cached"], second["cached"]) == (False, True)
        bad = httpx.post(f"{base}/v1/search", content=b"{nope", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_json"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert base in out


def test_serve_with_workers_answers_from_several_processes(served_data: Path) -> None:
    proc, base = start_serving(served_data, "--workers", "2")
    try:
        # the workers build their own app from the environment: every one serves the same index, same answer
        body = {"index": "demo", "query": {"text": "a satellite photographs a comet"}, "k": 3}

        def ask(_: int) -> tuple[int, list[str]]:
            with httpx.Client() as c:  # a connection each, so the kernel can hand them to either worker
                ready = c.get(f"{base}/readyz", timeout=30).json()
                hits = c.post(f"{base}/v1/search", json=body, timeout=30).json()["results"]
                return ready["pid"], [h["id"] for h in hits]

        # /readyz answered once: one worker is up; on a busy machine the other may still be loading the model
        seen, deadline = set(), time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            with httpx.Client() as c:
                seen.add(c.get(f"{base}/readyz", timeout=30).json()["pid"])
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(48)))
        assert len({pid for pid, _ in answers}) == 2 and proc.pid not in {pid for pid, _ in answers}
        assert len({tuple(ids) for _, ids in answers}) == 1
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_demo_builds_once_then_is_up_to_date(data: Path) -> None:
    first = cli(data, "demo", "--no-serve")
    assert first.returncode == 0, first.stderr
    said = " ".join(first.stderr.split())  # rich wraps long lines
    assert "already ready" in said and "demo version" in said and "3000 items" in said
    assert "1500 image, 1500 audio" in said
    assert "late: " in said and "bytes/token (fp16, pool factor 1)" in said  # the demo serves mode late too
    recall = float(said.split("fast-path recall@10 ")[1].split()[0])
    assert recall >= 0.95, said
    corpus = data / "corpora" / "demo" / "corpus.jsonl"
    assert corpus.is_file() and len(list((corpus.parent / "sounds").glob("*.flac"))) == 1500
    again = cli(data, "demo", "--no-serve")
    assert again.returncode == 0 and "demo index up to date" in again.stderr
