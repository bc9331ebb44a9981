"""Rebuild jobs for real: through a real redis-server and real `xmodal worker` processes (one of them killed with
SIGKILL mid-job), and without Redis in the service's background process; the admin key and the corpora root."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.build import build_index
from indexer.corpus import read_jsonl
from indexer.layout import IndexDir
from models.encoder import Encoder
from service.app import create_app
from service.settings import Settings

KEY = "s3cret-admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
XMODAL = [sys.executable, "-m", "service"]


@pytest.fixture
def data(tmp_path: Path, models_dir: Path, encoder: Encoder, demo_corpus: Path) -> Path:
    """A data folder with the model, a published `news` index (30 items) and a corpora root holding a 40-item corpus
    and a corpus with a malformed line."""
    data = tmp_path / "data"
    shutil.copytree(models_dir, data / "models")
    lines = demo_corpus.read_text().splitlines(keepends=True)
    corpora = data / "corpora"
    corpora.mkdir()
    (corpora / "first.jsonl").write_text("".join(lines[:30]))
    (corpora / "more.jsonl").write_text("".join(lines[:40]))
    (corpora / "bad.jsonl").write_text(lines[0] + '{"id": "no-content"}\n')
    first = corpora / "first.jsonl"
    build_index(indexes_dir=data / "indexes", name="news", items=read_jsonl(first), encoder=encoder, use_gpu=False)
    return data


def app_client(data: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data, reload_interval_s=0, admin_keys=KEY, **settings)))


def wait_for(client: TestClient, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/jobs/{job_id}", headers=ADMIN)
        assert r.status_code == 200, r.text
        status = r.json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, f"job still {status}"
        time.sleep(0.05)


def served_version(client: TestClient, version: str, timeout: float = 30) -> dict:
    """Search until the service answers from ``version`` (it swaps by announcement or when the job ends)."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.post("/v1/search", json={"index": "news", "query": {"text": "a football match"}, "k": 3})
        assert r.status_code == 200, r.text
        if r.json()["index_version"] == version:
            return r.json()
        assert time.monotonic() < deadline, f"still serving {r.json()['index_version']}, not {version}"
        time.sleep(0.1)


def submit(client: TestClient, body: dict, name: str = "news") -> dict:
    r = client.post(f"/v1/indexes/{name}/rebuild", json=body, headers=ADMIN)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] == "queued"
    return job


@pytest.mark.slow
def test_admin_routes_need_the_key_and_keep_to_the_corpora_root(data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"id": "x", "text": "secret"}\n')
    (data / "corpora" / "link.jsonl").symlink_to(outside)
    (data / "corpora" / "sneaky.jsonl").write_text(json.dumps({"id": "x", "image": str(outside)}) + "\n")
    with app_client(data) as c:
        body = {"corpus": "more.jsonl"}
        for headers in ({}, {"Authorization": KEY}):  # no key sent (a bare Authorization value is no bearer key)
            r = c.post("/v1/indexes/news/rebuild", json=body, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            error = r.json()["error"]
            assert error["code"] == "unauthorized" and KEY not in r.text
            assert r.headers["www-authenticate"] == "Bearer"
        for headers in ({"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):  # a key, not an admin key
            r = c.post("/v1/indexes/news/rebuild", json=body, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (headers, r.text)
            assert KEY not in r.text and "wrong" not in r.text
        assert c.get("/v1/jobs/abc").status_code == 401
        for corpus in ("../outside.jsonl", str(outside), "link.jsonl", "../../../../etc/passwd"):
            r = c.post("/v1/indexes/news/rebuild", json={"corpus": corpus}, headers=ADMIN)
            assert r.status_code == 400 and "outside the corpora root" in r.json()["error"]["message"], r.text
        r = c.post("/v1/indexes/news/rebuild", json={"corpus": "absent.jsonl"}, headers=ADMIN)
        assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
        r = c.post("/v1/indexes/news/rebuild", json={"corpus": "more.jsonl", "from": "current"}, headers=ADMIN)
        assert r.status_code == 422 and "exactly one" in r.json()["error"]["message"]
        r = c.post("/v1/indexes/nothing/rebuild", json={"from": "current"}, headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found"
        r = c.get("/v1/jobs/0123abcd", headers={"X-API-Key": KEY})
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"

        # A JSONL corpus below the root whose media point outside it: the job fails, saying which item and why.
        job = submit(c, {"corpus": "sneaky.jsonl"})
        failed = wait_for(c, job["id"], ("succeeded", "failed"))
        assert failed["state"] == "failed" and "outside the corpora root" in failed["error"]
    # A job the service had queued but never finished (the service was killed): failed when it starts again.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = json.loads((data / "jobs" / f"{job['id']}.json").read_text())
    orphan |= {"id": "0" * 32, "state": "running", "runner": {**orphan["runner"], "pid": dead.pid}}
    (data / "jobs" / f"{orphan['id']}.json").write_text(json.dumps(orphan))
    with app_client(data) as c:
        status = c.get(f"/v1/jobs/{orphan['id']}", headers=ADMIN).json()
        assert status["state"] == "failed" and "service stopped" in status["error"]
    with TestClient(create_app(Settings(data_dir=data, reload_interval_s=0))) as c:  # no admin keys configured
        r = c.post("/v1/indexes/news/rebuild", json={"corpus": "more.jsonl"}, headers=ADMIN)
        assert r.status_code == 403 and "XMODAL_ADMIN_KEYS" in r.json()["error"]["message"]


def test_admin_input_the_file_system_cannot_take_is_a_4xx_not_a_500(tmp_path: Path) -> None:
    """Found by tests/service/test_openapi_fuzz.py: a corpus path or a job id longer than a file name may be, or a
    lone surrogate that no path can be encoded from, reached the file system and came back as 500s."""
    (tmp_path / "corpora").mkdir()
    with app_client(tmp_path) as c:  # no model needed: nothing here gets as far as a job
        raw = b'{"corpus": "\\ud800.jsonl"}'  # valid JSON, not Unicode
        r = c.post("/v1/indexes/news/rebuild", content=raw, headers={**ADMIN, "content-type": "application/json"})
        assert r.status_code == 422 and "surrogate" in r.json()["error"]["message"], r.text
        r = c.post("/v1/indexes/news/rebuild", json={"corpus": "x" * 5000 + ".jsonl"}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input", r.text
        r = c.get(f"/v1/jobs/{'0' * 300}", headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.text
        r = c.post("/v1/indexes/news/rebuild", json={"from": "previous"}, headers=ADMIN)
        assert r.status_code == 422 and r.json()["error"]["param"] == "from", r.text


@pytest.mark.slow
def test_rebuild_jobs_without_redis_run_in_a_background_process(data: Path) -> None:
    before = IndexDir(data / "indexes", "news").current()
    with app_client(data) as c:
        assert served_version(c, before)["results"]
        job = submit(c, {"corpus": "more.jsonl"})
        done = wait_for(c, job["id"], ("succeeded", "failed"))
        assert done["state"] == "succeeded", done
        assert done["version"] != before and done["attempt"] == 1
        assert done["progress"] == {"done": 40, "total": 40}
        assert IndexDir(data / "indexes", "news").manifest().counts == {"text": 40}
        served_version(c, done["version"])

        # From the published version's own items (a re-encode), then a corpus with a malformed line.
        again = wait_for(c, submit(c, {"from": "current"})["id"], ("succeeded", "failed"))
        assert again["state"] == "succeeded" and again["version"] != done["version"], again
        assert IndexDir(data / "indexes", "news").manifest().counts == {"text": 40}
        served_version(c, again["version"])
        bad = wait_for(c, submit(c, {"corpus": "bad.jsonl"})["id"], ("succeeded", "failed"))
        assert bad["state"] == "failed" and "bad.jsonl:2" in bad["error"] and "Traceback" not in bad["error"]
        assert IndexDir(data / "indexes", "news").current() == again["version"]  # nothing published
        fresh = wait_for(
            c, submit(c, {"corpus": "first.jsonl", "late": True}, name="fresh")["id"], ("succeeded", "failed")
        )
        assert fresh["state"] == "succeeded" and IndexDir(data / "indexes", "fresh").manifest().tokens is not None
        listed = c.get("/v1/jobs", headers=ADMIN).json()
        assert [j["id"] for j in listed] == [fresh["id"], bad["id"], again["id"], job["id"]]

    # Stopping the service stops its background process: the job it ran ends failed, saying why; nothing published.
    (data / "corpora" / "big.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": f"item {i}"}) + "\n" for i in range(2000))
    )
    with app_client(data) as c:
        stopped = submit(c, {"corpus": "big.jsonl", "late": True})
        wait_for(c, stopped["id"], ("running",))
    status = json.loads((data / "jobs" / f"{stopped['id']}.json").read_text())
    assert status["state"] == "failed" and "service stopped" in status["error"], status
    assert IndexDir(data / "indexes", "news").current() == again["version"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_") and k != "REDIS_URL"}
    env["XMODAL_DATA_DIR"] = str(data)
    shown = subprocess.run([*XMODAL, "jobs", "show", bad["id"]], capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0 and json.loads(shown.stdout) == bad, shown.stderr
    listing = subprocess.run([*XMODAL, "jobs", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(listing.stdout)[1:] == listed


def start_worker(data: Path, redis_url: str, log: Path, max_tries: int = 3) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_") and k != "REDIS_URL"}
    env |= {"XMODAL_DATA_DIR": str(data), "XMODAL_REDIS_URL": redis_url, "XMODAL_JOB_LEASE_S": "3"}
    env["XMODAL_JOB_MAX_TRIES"] = str(max_tries)
    return subprocess.Popen([*XMODAL, "worker"], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_rebuild_job_through_redis_and_a_worker_process(data: Path, redis_server, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    worker = start_worker(data, redis_server.url, log)
    try:
        with app_client(data, redis_url=redis_server.url) as c:
            job = submit(c, {"corpus": "more.jsonl"})
            done = wait_for(c, job["id"], ("succeeded", "failed"))
            assert done["state"] == "succeeded" and done["progress"] == {"done": 40, "total": 40}, (
                done,
                log.read_text(),
            )
            served_version(c, done["version"])  # swapped by the worker's announcement (this app does not poll)
            bad = wait_for(c, submit(c, {"corpus": "bad.jsonl"})["id"], ("succeeded", "failed"))
            assert bad["state"] == "failed" and "bad.jsonl:2" in bad["error"]
            assert worker.poll() is None  # a failed job fails the job, not the worker
    finally:
        stop(worker)


def kill_worker_mid_job(data: Path, redis_url: str, client: TestClient, log: Path, sig: int = signal.SIGKILL) -> dict:
    """Queue a rebuild of 400 items, send the worker running it ``sig``; the job's status then: still `running`
    after SIGKILL, `queued` again after SIGTERM (the build stopped at its next batch)."""
    lines = (data / "corpora" / "more.jsonl").read_text().splitlines()
    (data / "corpora" / "big.jsonl").write_text(
        "".join(
            json.dumps({**json.loads(line), "id": f"{json.loads(line)['id']}-{i}"}) + "\n"
            for i in range(10)
            for line in lines
        )
    )
    first = start_worker(data, redis_url, log)
    try:
        job = submit(client, {"corpus": "big.jsonl", "late": True})
        running = wait_for(client, job["id"], ("running", "succeeded", "failed"))
        assert running["state"] == "running" and running["attempt"] == 1, running
        first.send_signal(sig)
        first.wait(timeout=30)
    finally:
        stop(first)
    status = wait_for(client, job["id"], ("running", "queued", "succeeded", "failed"))
    assert status["state"] == ("running" if sig == signal.SIGKILL else "queued"), (status, log.read_text())
    return status


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_job_whose_worker_is_killed_is_run_again_by_another(
    data: Path, redis_server, tmp_path: Path, sig: int
) -> None:
    log = tmp_path / "worker.log"
    with app_client(data, redis_url=redis_server.url) as c:
        job = kill_worker_mid_job(data, redis_server.url, c, log, sig)
        second = start_worker(data, redis_server.url, log)
        try:
            done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=180)
            assert done["state"] == "succeeded" and done["attempt"] == 2, (done, log.read_text())
            assert IndexDir(data / "indexes", "news").manifest().counts == {"text": 400}
            served_version(c, done["version"])
        finally:
            stop(second)


@pytest.mark.slow
def test_a_job_whose_workers_keep_dying_ends_failed(data: Path, redis_server, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with app_client(data, redis_url=redis_server.url) as c:
        job = kill_worker_mid_job(data, redis_server.url, c, log)
        last = start_worker(data, redis_server.url, log, max_tries=1)  # the killed run was the only one allowed
        try:
            done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=60)
            assert done["state"] == "failed" and "max 1 retries exceeded" in done["error"], done
        finally:
            stop(last)


def test_a_versions_own_items_come_back_as_its_corpus(late_data: Path, media_corpus: Path) -> None:
    from indexer.corpus import read_corpus
    from indexer.reencode import items_of_version

    def fields(item) -> tuple:  # noqa: ANN001
        media = tuple(None if p is None else Path(p).resolve() for p in (item.image, item.audio))
        return item.id, item.text, *media, item.metadata

    again = items_of_version(late_data / "indexes", "media")
    assert sorted(map(fields, again)) == sorted(map(fields, read_corpus(media_corpus)))
    assert all(Path(p).is_file() for it in again for p in (it.image, it.audio) if p is not None)


def png_base64() -> str:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (40, 40), (220, 20, 20)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def search_ids(client: TestClient, text: str, k: int = 50, **body) -> list[str]:
    r = client.post("/v1/search", json={"index": "news", "query": {"text": text}, "k": k, **body})
    assert r.status_code == 200, r.text
    return [hit["id"] for hit in r.json()["results"]]


def run_job(client: TestClient, method: str, path: str, body: dict | None = None) -> dict:
    r = client.request(method, path, json=body, headers=ADMIN)
    assert r.status_code == 202, r.text
    done = wait_for(client, r.json()["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    client.app.state.xmodal.registry.refresh()  # what the watcher does (this app does not poll)
    return done


@pytest.mark.slow
def test_items_are_added_replaced_deleted_and_compacted_over_http(data: Path) -> None:
    new = {"id": "giraffe", "text": "a purple giraffe reads the morning newspaper", "metadata": {"topic": "zoo"}}
    with app_client(data) as c:
        for method, path, body in (
            ("POST", "/v1/indexes/news/items", {"items": [new]}),
            ("DELETE", "/v1/indexes/news/items", {"ids": ["giraffe"]}),
            ("POST", "/v1/indexes/news/compact", None),
        ):
            assert c.request(method, path, json=body).status_code == 401
            assert c.request(method, path.replace("news", "absent"), json=body, headers=ADMIN).status_code == 404
        r = c.post("/v1/indexes/news/items", json={"items": [{"id": "empty"}]}, headers=ADMIN)
        assert r.status_code == 400 and "no text, image or audio" in r.text
        r = c.post("/v1/indexes/news/items", json={"items": [new, new]}, headers=ADMIN)
        assert r.status_code == 400 and "once" in r.text
        fake = base64.b64encode(b"not a picture at all").decode()
        r = c.post("/v1/indexes/news/items", json={"items": [new, {"id": "p", "image": fake}]}, headers=ADMIN)
        assert r.status_code == 400 and "items[1].image is not an image file" in r.text
        assert not (data / "media").exists()  # a refused request leaves nothing behind

        added = run_job(c, "POST", "/v1/indexes/news/items", {"items": [new]})
        assert added["kind"] == "add" and served_version(c, added["version"])
        assert search_ids(c, new["text"], k=1) == ["giraffe"]
        assert search_ids(c, "anything", filter={"topic": "zoo"}) == ["giraffe"]
        changed = {**new, "text": "a steam train crosses an old stone bridge"}
        run_job(c, "POST", "/v1/indexes/news/items", {"items": [changed]})
        assert search_ids(c, changed["text"], k=1) == ["giraffe"]
        listing = c.get("/v1/indexes").json()["indexes"][0]
        assert listing["items"] == 31 and listing["segments"] == 3  # replaced, not added twice

        first_two = search_ids(c, "a football match", k=2)
        deleted = run_job(c, "DELETE", "/v1/indexes/news/items", {"ids": [*first_two, "giraffe"]})
        assert deleted["kind"] == "delete"
        assert not {*first_two, "giraffe"} & set(search_ids(c, "a football match", k=30))
        assert search_ids(c, "anything", filter={"topic": "zoo"}) == []

        # an item with a picture: its file is kept, and the media routes show it
        picture = {"id": "pic", "text": "a small red square", "image": "data:image/png;base64," + png_base64()}
        run_job(c, "POST", "/v1/indexes/news/items", {"items": [picture]})
        assert c.get("/v1/indexes/news/media", params={"id": "pic", "modality": "image"}).content[:4] == b"\x89PNG"
        r = c.post("/v1/search", json={"index": "news", "query": {"text": "x"}, "k": 1, "filter": {"topic": "zoo"}})
        assert r.status_code == 200
        deleted_too = run_job(c, "DELETE", "/v1/indexes/news/items", {"ids": ["pic"]})
        assert deleted_too["state"] == "succeeded"
        assert c.get("/v1/indexes/news/media", params={"id": "pic", "modality": "image"}).status_code == 404

        compacted = run_job(c, "POST", "/v1/indexes/news/compact")
        manifest = IndexDir(data / "indexes", "news").manifest()
        assert manifest.version == compacted["version"] and len(manifest.segments) == 1
        assert sum(manifest.counts.values()) == 28 and not manifest.segments[0].tombstones
        assert not {*first_two, "giraffe"} & set(search_ids(c, "a football match", k=30))


@pytest.mark.slow
def test_an_add_job_through_redis_and_a_worker_process(data: Path, redis_server, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    worker = start_worker(data, redis_server.url, log)
    try:
        with app_client(data, redis_url=redis_server.url) as c:
            item = {"id": "kite", "text": "a red kite flies over the windy beach"}
            r = c.post("/v1/indexes/news/items", json={"items": [item]}, headers=ADMIN)
            assert r.status_code == 202, r.text
            done = wait_for(c, r.json()["id"], ("succeeded", "failed"))
            assert done["state"] == "succeeded", (done, log.read_text())
            served_version(c, done["version"])  # swapped by the worker's announcement
            assert search_ids(c, item["text"], k=1) == ["kite"]
    finally:
        stop(worker)
