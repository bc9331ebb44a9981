"""A model upgrade through the running service (issue 16): POST /v1/indexes/{name}/upgrade queues a job that moves
a wordllama-256 index to MiniLM. Searches keep arriving from other threads the whole time: none may fail, each
version answers with the model it encodes queries with, and the job's progress is readable. Real uvicorn, real
background job process, real models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from indexer.build import add_items, build_index
from indexer.layout import IndexDir
from models.adapter import load_adapter_manifest
from models.align import align
from models.encoder import Encoder
from models.mini.prepare import TEXT_MODEL
from models.registry import WORDLLAMA_MODEL, prepare
from service.settings import Settings
from tests.conftest import ServerThread
from tests.indexer.test_upgrade import TEXTS, items

pytest.importorskip("wordllama", reason="the wordllama-256 bundle comes from the `wordllama` package")
pytest.importorskip("onnx", reason="writing the adapter graph needs onnx (the `export` extra)")
pytestmark = pytest.mark.slow

KEY = "upgrade-admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def data(tmp_path: Path, models_dir: Path) -> Path:
    """MiniLM and wordllama-256 bundles, no adapter yet, and a wordllama-256 index of two segments."""
    data = tmp_path / "data"
    models = data / "models"
    shutil.copytree(models_dir / TEXT_MODEL, models / TEXT_MODEL)
    prepare(models, WORDLLAMA_MODEL)
    old = Encoder(models / WORDLLAMA_MODEL, device="cpu")
    indexes = data / "indexes"
    build_index(indexes_dir=indexes, name="docs", items=items(TEXTS[:90]), encoder=old, checkpoint=False)
    add_items(indexes_dir=indexes, name="docs", items=items(TEXTS[90:], 90), encoder=old, checkpoint=False)
    return data


def test_upgrade_job_under_load_fails_no_request(data: Path) -> None:
    settings = Settings(data_dir=data, model=WORDLLAMA_MODEL, reload_interval_s=0.2, admin_keys=KEY)
    with ServerThread(settings) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        # no adapter between the two models yet: refused before anything is queued
        r = client.post("/v1/indexes/docs/upgrade", json={"model": TEXT_MODEL}, headers=ADMIN)
        assert r.status_code == 404, r.text
        assert "xmodal index upgrade docs" in r.text and "models align" in r.text
        for path, model, headers, status in [
            ("docs", "no-such-model", ADMIN, 404),
            ("nope", TEXT_MODEL, ADMIN, 404),
            ("docs", TEXT_MODEL, {}, 401),
        ]:
            r = client.post(f"/v1/indexes/{path}/upgrade", json={"model": model}, headers=headers)
            assert r.status_code == status, r.text

        align(data / "models", TEXT_MODEL, WORDLLAMA_MODEL, texts=TEXTS, texts_label="the test's texts")

        answers: list[tuple[int, str | None, str | None]] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/v1/search", json={"index": "docs", "query": {"text": "a dog in the snow"}, "k": 5})
                    body = r.json() if r.status_code == 200 else {}
                    answers.append((r.status_code, body.get("model"), body.get("index_version")))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            r = client.post("/v1/indexes/docs/upgrade", json={"model": TEXT_MODEL}, headers=ADMIN)
            assert r.status_code == 202, r.text
            job = wait(client, r.json()["id"], ("succeeded", "failed"))
            assert job["state"] == "succeeded", job
            assert job["progress"]["done"] == job["progress"]["total"] == len(TEXTS)
            served = served_version(client, job["version"])
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert answers and all(code == 200 for code, _, _ in answers), {a for a in answers if a[0] != 200}
    models = [m for _, m, _ in answers]
    assert models[0] == WORDLLAMA_MODEL and models[-1] == TEXT_MODEL and served["model"] == TEXT_MODEL
    d = IndexDir(data / "indexes", "docs")
    ops = [d.manifest(v).operation for v in d.versions()]
    assert ops[-3:] == ["upgrade", "backfill", "backfill"], ops
    final = d.manifest()
    assert final.upgrade is None and final.model.name == TEXT_MODEL and sum(final.counts.values()) == len(TEXTS)
    # the versions in between were served too: with the adapter, answering with MiniLM's name
    mixed = {v for v in d.versions() if d.manifest(v).upgrade is not None}
    assert {m for _, m, v in answers if v in mixed} <= {TEXT_MODEL}


def wait(client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def served_version(client: httpx.Client, version: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.post("/v1/search", json={"index": "docs", "query": {"text": "a bus"}, "k": 3}).json()
        if body.get("index_version") == version:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_cli_fits_an_adapter_on_the_index_texts_switches_then_backfills(data: Path) -> None:
    """`xmodal index upgrade` with no adapter: one is fitted on the index's own texts, the switch is published
    (--no-backfill), and the same command run again backfills to pure NEW."""
    env = {**os.environ, "XMODAL_DATA_DIR": str(data), "XMODAL_MODEL": WORDLLAMA_MODEL}
    cmd = [sys.executable, "-m", "service", "index", "upgrade", "docs", "--to", TEXT_MODEL]
    r = subprocess.run([*cmd, "--no-backfill"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = IndexDir(data / "indexes", "docs")
    switched = d.manifest()
    assert switched.operation == "upgrade" and switched.upgrade.from_model.name == WORDLLAMA_MODEL
    adapter = load_adapter_manifest(data / "models" / "adapters" / switched.upgrade.adapter)
    assert adapter.fingerprint == switched.upgrade.adapter_fingerprint
    assert adapter.fit["texts"].startswith("index docs version") and adapter.fit["counts"]["texts"] == len(TEXTS)
    assert adapter.score_map["slope"] > 0 and switched.upgrade.score_map == adapter.score_map
    assert "backfill with: xmodal index upgrade docs" in " ".join((r.stdout + r.stderr).split())

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    final = d.manifest()
    assert final.upgrade is None and final.model.name == TEXT_MODEL and sum(final.counts.values()) == len(TEXTS)
    assert [d.manifest(v).operation for v in d.versions()][-3:] == ["upgrade", "backfill", "backfill"]
    assert "is encoded by all-minilm-l6-v2 throughout" in " ".join((r.stdout + r.stderr).split())
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # again: nothing left to do
    assert r.returncode == 0 and d.manifest().version == final.version, r.stderr[-2000:]
