"""Index versions an operator can trust: what a service does with a damaged, copied or inconsistent version, done for
real to files of real indexes (two of them, so one's trouble can be seen not to hold up the other)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.build import build_index
from indexer.corpus import read_jsonl
from indexer.layout import ITEMS, IndexDir
from indexer.verify import verify_index
from models.encoder import Encoder
from models.errors import BundleError
from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, encoder: Encoder, demo_corpus: Path):
    """Indexes `a` (two versions, the second published) and `b` (one), small."""
    data = tmp_path_factory.mktemp("integrity")
    shutil.copytree(models_dir, data / "models")
    items = read_jsonl(demo_corpus)
    for name, chunk in (("a", items[:60]), ("a", items[:80]), ("b", items[100:160])):
        build_index(indexes_dir=data / "indexes", name=name, items=chunk, encoder=encoder, use_gpu=False)
    return data


@pytest.fixture
def data(two_indexes: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(two_indexes, copy)
    return copy


def client(data: Path) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data, reload_interval_s=0)))


def versions(data: Path, name: str = "a") -> list[str]:
    """[older, ..., published]: the fixture publishes its last build of each index."""
    d = IndexDir(data / "indexes", name)
    current = d.current()
    return [v for v in d.versions() if v != current] + [current]


def path_of(data: Path, version: str, name: str = "a") -> Path:
    """The folder of the (one) segment of ``version``."""
    d = IndexDir(data / "indexes", name)
    (ref,) = d.manifest(version).segments
    return d.segment_dir(ref.id)


def publish(c: TestClient, data: Path, version: str, name: str = "a") -> None:
    IndexDir(data / "indexes", name).publish(version)
    c.app.state.xmodal.registry.refresh()  # what the watcher and the Redis announcement do


def served(c: TestClient, name: str = "a") -> str:
    r = c.post("/v1/search", json={"index": name, "query": {"text": "a storm at sea"}, "k": 3})
    assert r.status_code == 200, r.text
    return r.json()["index_version"]


def damage_bytes(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_damaged_faiss_file_is_refused_and_the_old_version_keeps_serving(data: Path) -> None:
    old, new = versions(data)
    with client(data) as c:
        assert served(c) == new
        publish(c, data, old)
        assert served(c) == old
        size = (path_of(data, new) / "dense.text.faiss").stat().st_size
        damage_bytes(path_of(data, new) / "dense.text.faiss", size // 4, os.urandom(min(20_000, size // 2)))
        publish(c, data, new)
        assert served(c) == old  # the damaged version is never answered from
        listing = c.get("/v1/indexes").json()
        assert "dense.text.faiss is damaged" in listing["refused"]["a"] and new in listing["refused"]["a"]
        assert c.get("/readyz").status_code == 200  # degraded, but every index serves a version
        # a rollback to the version being served clears the refusal
        publish(c, data, old)
        assert "a" not in c.get("/v1/indexes").json()["refused"]
    with pytest.raises(BundleError, match="dense.text.faiss is damaged"):
        verify_index(data / "indexes", "a", new)


def test_one_flipped_byte_in_the_items_store_is_refused(data: Path) -> None:
    old, new = versions(data)
    items = path_of(data, new) / ITEMS
    con = sqlite3.connect(items)
    row = con.execute("SELECT row, metadata FROM items LIMIT 1").fetchone()
    con.close()
    raw = items.read_bytes()
    at = raw.index(row[1].encode())
    damage_bytes(items, at, b"\x00")  # the JSON of one row's metadata is no longer JSON
    with pytest.raises(BundleError, match="items.sqlite is damaged"):
        verify_index(data / "indexes", "a", new)
    with client(data) as c:
        assert "items.sqlite is damaged" in c.get("/v1/indexes").json()["refused"]["a"]


def test_a_fresh_replica_starts_serves_the_other_indexes_and_is_not_ready(data: Path) -> None:
    _, new = versions(data)
    damage_bytes(path_of(data, new) / "dense.text.faiss", 100, os.urandom(4000))
    with client(data) as c:  # starts, rather than exiting
        assert served(c, "b")  # the other index serves
        r = c.post("/v1/search", json={"index": "a", "query": {"text": "x"}})
        assert r.status_code == 503 and "damaged" in r.json()["error"]["message"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "a" in ready.json()["refused_indexes"]


def test_with_checksums_off_a_garbage_faiss_file_is_still_refused(data: Path) -> None:
    """XMODAL_VERIFY_CHECKSUMS=false (a fast start over large indexes): the damage shows when FAISS reads the file."""
    _, new = versions(data)
    (path_of(data, new) / "dense.text.faiss").write_bytes(os.urandom(5000))
    with TestClient(create_app(Settings(data_dir=data, reload_interval_s=0, verify_checksums=False))) as c:
        assert served(c, "b")
        refused = c.get("/v1/indexes").json()["refused"]["a"]
        assert "dense.text.faiss cannot be read" in refused


def test_a_copied_version_file_is_not_another_version(data: Path) -> None:
    old, new = versions(data)
    versions_dir = data / "indexes" / "a" / "versions"
    copy = "20990101T000000000-c0ffee"
    shutil.copy(versions_dir / f"{old}.json", versions_dir / f"{copy}.json")
    with client(data) as c:
        publish(c, data, copy)
        assert served(c) == new
        assert "copied or moved file" in c.get("/v1/indexes").json()["refused"]["a"]
    with pytest.raises(BundleError, match="copied or moved file"):
        verify_index(data / "indexes", "a", copy)


def test_a_manifest_whose_dim_disagrees_with_its_faiss_file_is_refused(data: Path) -> None:
    old, new = versions(data)
    manifest_path = path_of(data, new) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "dim": 128}))
    with client(data) as c:
        r = c.post("/v1/search", json={"index": "a", "query": {"text": "x"}})
        assert r.status_code == 503  # the index's fault, said as such: not a 400 that blames the client
        assert "FAISS dimension 384, manifest dim 128" in r.json()["error"]["message"]


def test_a_killed_builds_staging_folder_is_removed_and_a_live_ones_kept(data: Path, encoder: Encoder) -> None:
    segments_dir = data / "indexes" / "a" / "segments"
    dead = segments_dir / ".tmp-20260101T000000-abcdef-pid999999999-x1y2"
    live = segments_dir / f".tmp-20260101T000000-fedcba-pid{os.getpid()}-z3"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "dense.text.faiss").write_bytes(b"\0" * 1000)
    build_index(indexes_dir=data / "indexes", name="a", items=tiny_items(), encoder=encoder, use_gpu=False)
    assert not dead.exists() and live.exists()
    assert len(versions(data)) == 3  # staging folders are never listed


def tiny_items():
    from indexer.corpus import CorpusItem

    return [CorpusItem(id=f"x{i}", text=f"item number {i}") for i in range(12)]


def test_builds_keep_the_newest_versions_and_never_the_published_one_goes(data: Path, encoder: Encoder) -> None:
    d = IndexDir(data / "indexes", "a")
    first = d.versions()[0]
    d.publish(first)  # an operator rolled back to the oldest version
    for _ in range(5):
        build_index(
            indexes_dir=data / "indexes",
            name="a",
            items=tiny_items(),
            encoder=encoder,
            use_gpu=False,
            publish=False,
            keep_versions=3,
        )
    kept = d.versions()
    assert len(kept) == 4 and first in kept and d.current() == first  # the newest 3, and the published one
    assert not [p for p in (data / "indexes" / "a" / "versions").iterdir() if p.name.startswith(".")]
    listed = {ref.id for v in kept for ref in d.manifest(v).segments}
    assert {p.name for p in d.segments_dir.iterdir()} == listed  # the segments of removed versions went too
    with pytest.raises(Exception, match="keep at least one"):
        d.prune(0)


def test_refusals_are_forgotten_once_served_or_unpublished_and_readers_keep_their_snapshot(data: Path) -> None:
    """A refused index's reason goes once it serves, or once it is no longer published (its folder removed), so a
    replica becomes ready again; a reader holds one snapshot of models, indexes and refusals that a refresh (in
    another thread) replaces, never changes."""
    _, new = versions(data)
    faiss = path_of(data, new) / "dense.text.faiss"
    good = faiss.read_bytes()
    damage_bytes(faiss, 100, os.urandom(4000))
    gone = data / "indexes" / "gone"
    gone.mkdir()
    (gone / "CURRENT").write_text("v-that-was-never-written\n")  # published, but nothing to serve
    with client(data) as c:
        registry = c.app.state.xmodal.registry
        ready = c.get("/readyz")
        assert ready.status_code == 503 and set(ready.json()["refused_indexes"]) == {"a", "gone"}
        held = registry.served
        faiss.write_bytes(good)
        shutil.rmtree(gone)
        registry.refresh()
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["refused_indexes"] == {}, ready.json()
        assert c.get("/v1/indexes").json()["refused"] == {} and served(c) == new
        # what a reader held is as it was: the refresh published a new snapshot
        assert set(held.index_errors) == {"a", "gone"} and set(held.indexes) == {"b"} and not held.ready()
        assert registry.served is not held and set(registry.served.indexes) == {"a", "b"}
