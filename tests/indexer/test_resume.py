"""Crash-safe builds: encoded chunks are checkpointed as they are done; a build interrupted (an exception, a real
`kill -9` of the `xmodal index build` process) and run again encodes only what was not saved, and ends with exactly
the vectors of a build that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.build import build_index
from indexer.corpus import CorpusItem, read_corpus, read_jsonl
from indexer.demo import write_demo_corpus
from indexer.encode import CHUNK_BATCHES
from indexer.layout import IndexDir
from indexer.search import LoadedIndex
from indexer.shards import SHARDS
from models.encoder import Encoder


class Crash(Exception):
    pass


def crash_after(chunks: int):
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == chunks:
            raise Crash(f"interrupted at {done} of {total}")

    return progress


def stored_vectors(indexes: Path, name: str) -> np.ndarray:
    """Every row's stored vector, in row order."""
    index = LoadedIndex(indexes, name, use_gpu=False)
    return index.vectors(list(range(index.size)))


def segment_of(indexes: Path, name: str, version: str) -> Path:
    d = IndexDir(indexes, name)
    (ref,) = d.manifest(version).segments
    return d.segment_dir(ref.id)


def test_an_interrupted_build_resumes_from_its_checkpoints(
    tmp_path: Path, encoder: Encoder, media_corpus: Path
) -> None:
    items = read_corpus(media_corpus)[:200]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items.append(CorpusItem(id="broken", image=broken, text="a broken picture"))
    kwargs = dict(items=items, encoder=encoder, use_gpu=False, batch_size=4, late=None)
    chunk = 4 * CHUNK_BATCHES
    with pytest.raises(Crash):
        build_index(indexes_dir=tmp_path / "a", name="m", progress=crash_after(4), **kwargs)
    shards = list((tmp_path / "a" / "m" / SHARDS).glob("*/*.npz"))
    assert len(shards) == 4 and not IndexDir(tmp_path / "a", "m").exists()  # nothing published
    resumed = build_index(indexes_dir=tmp_path / "a", name="m", **kwargs).manifest
    total = resumed.build["vectors"]
    assert resumed.build["resumed_vectors"] == 4 * chunk  # every saved chunk read back ...
    assert resumed.build["encoded_vectors"] == total - 4 * chunk  # ... and only the rest encoded
    assert resumed.build["failed"] == 1 and resumed.build["failures"][0]["id"] == "broken"
    assert not (tmp_path / "a" / "m" / SHARDS).exists()  # checkpoints go once the version is written

    clean = build_index(indexes_dir=tmp_path / "b", name="m", checkpoint=False, **kwargs).manifest
    assert clean.counts == resumed.counts and clean.build["failed"] == 1
    assert np.array_equal(stored_vectors(tmp_path / "a", "m"), stored_vectors(tmp_path / "b", "m"))


def test_token_vectors_survive_a_resume(tmp_path: Path, encoder: Encoder, media_corpus: Path) -> None:
    from indexer.build import LateBuild

    items = read_corpus(media_corpus)[:60]
    kwargs = dict(items=items, encoder=encoder, use_gpu=False, batch_size=4, late=LateBuild())
    with pytest.raises(Crash):
        build_index(indexes_dir=tmp_path / "a", name="m", progress=crash_after(3), **kwargs)
    resumed = build_index(indexes_dir=tmp_path / "a", name="m", **kwargs).manifest
    clean = build_index(indexes_dir=tmp_path / "b", name="m", checkpoint=False, **kwargs).manifest
    assert resumed.build["resumed_vectors"] > 0
    assert resumed.tokens["tokens"] == clean.tokens["tokens"]
    for name in ("vectors.npy", "offsets.npy"):  # the fp16 token store, byte for byte
        a = segment_of(tmp_path / "a", "m", resumed.version) / "tokens" / name
        b = segment_of(tmp_path / "b", "m", clean.version) / "tokens" / name
        if a.exists() or b.exists():
            assert np.array_equal(np.load(a), np.load(b)), name


def test_other_builds_stale_checkpoints_are_removed(tmp_path: Path, encoder: Encoder) -> None:
    root = tmp_path / "idx" / "t" / SHARDS
    stale, fresh = root / ("0" * 32), root / ("1" * 32)
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "text-0000000000.npz").write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale / "text-0000000000.npz", (hours_ago, hours_ago))
    items = [CorpusItem(id=f"i{i}", text=f"item {i}") for i in range(5)]
    build_index(indexes_dir=tmp_path / "idx", name="t", items=items, encoder=encoder, use_gpu=False)
    assert not stale.exists() and fresh.exists()  # a build that may still be running keeps its checkpoints


@pytest.mark.slow
def test_kill_9_of_a_build_then_the_same_command_resumes(tmp_path: Path, models_dir: Path, encoder: Encoder) -> None:
    corpus = write_demo_corpus(tmp_path / "corpus.jsonl", n=2400)
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_") and k != "REDIS_URL"}
    env["XMODAL_DATA_DIR"] = str(data)
    cmd = [sys.executable, "-m", "service", "index", "build", "--name", "big", "--corpus", str(corpus)]
    cmd += ["--batch-size", "16"]
    chunk, total = 16 * CHUNK_BATCHES, 2400
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = data / "indexes" / "big" / SHARDS
    deadline = time.monotonic() + 240
    while len(list(shards.glob("*/*.npz"))) < (total // chunk) // 2:  # about half way
        assert proc.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    saved = len(list(shards.glob("*/*.npz")))
    assert (total // chunk) // 2 <= saved < -(-total // chunk)  # killed about half way, not after the last chunk
    assert not IndexDir(data / "indexes", "big").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    manifest = IndexDir(data / "indexes", "big").manifest()
    assert manifest.build["resumed_vectors"] == saved * chunk  # every chunk finished before the kill, reused
    assert manifest.build["encoded_vectors"] == total - saved * chunk  # at most the chunk it was in, again
    reference = encoder.encode_text([it.text for it in read_jsonl(corpus)], batch_size=16)
    stored = stored_vectors(data / "indexes", "big")
    assert stored.shape == reference.shape and np.abs(stored - reference).max() < 1e-5
