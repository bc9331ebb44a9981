"""`--engine ray` against the local engine, on a real local Ray (started once for the module; one test starts the
engine's own from the CLI): the same vectors and token vectors, the same failure records for files that cannot be
decoded, the same segment files and search results, checkpoints of a local build reused, and the CLI options."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indexer.build import add_items, build_index
from indexer.corpus import CorpusItem, read_corpus
from indexer.encode import Encoded, encode_items
from indexer.layout import IndexDir
from indexer.search import LoadedIndex
from models.encoder import Encoder
from models.errors import InvalidInput, MissingDependency
from service.cli import app
from service.index_ops import encode_engine
from service.settings import Settings
from tests.conftest import SHARED_DATA, write_corpus

ray = pytest.importorskip("ray", reason="Ray is not installed (the `ray` extra; `make test` installs it with `dev`)")
pytestmark = pytest.mark.slow
COCO = SHARED_DATA / "coco-mini"
BATCH = 8  # chunks of 64 (indexer.encode.CHUNK_BATCHES): several per corpus below, so both actors get work


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting one costs seconds); the engine uses it as it finds it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def items(media_corpus: Path) -> list[CorpusItem]:
    """48 pictures and 48 sounds, each with its caption: 192 rows, 4 chunks."""
    every = read_corpus(media_corpus)
    return [it for it in every if it.image is not None][:48] + [it for it in every if it.audio is not None][:48]


def engine(actors: int = 2):  # noqa: ANN201
    from indexer.ray_engine import RayEngine

    return RayEngine(actors=actors, device="cpu")


def with_bad_files(items: list[CorpusItem], folder: Path) -> list[CorpusItem]:
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return [
        *items,
        CorpusItem(id="broken", image=broken, text="a broken picture"),
        CorpusItem(id="missing", audio=folder / "no-such.flac"),
    ]


def assert_same_encoding(ours: Encoded, reference: Encoded) -> None:
    assert [(r.item.id, r.modality) for r in ours.rows] == [(r.item.id, r.modality) for r in reference.rows]
    assert ours.failures == reference.failures
    assert ours.vectors.shape == reference.vectors.shape
    assert np.abs(ours.vectors - reference.vectors).max() < 1e-5
    if reference.tokens is not None:
        assert [t.shape for t in ours.tokens] == [t.shape for t in reference.tokens]
        pairs = zip(ours.tokens, reference.tokens, strict=True)
        assert max(np.abs(a.astype(np.float32) - b.astype(np.float32)).max() for a, b in pairs) < 2e-3


def test_vectors_tokens_and_failures_equal_the_local_engines(
    local_ray, encoder: Encoder, items: list[CorpusItem], tmp_path: Path
) -> None:
    """Text, pictures and sounds, with token vectors; a file that cannot be decoded is a failure record (the
    actor that met it goes on encoding its chunk)."""
    items = with_bad_files(items, tmp_path)
    reference = encode_items(encoder, items, BATCH, None, with_tokens=True)
    ray_engine = engine()
    ours = encode_items(encoder, items, BATCH, None, with_tokens=True, engine=ray_engine)
    assert_same_encoding(ours, reference)
    assert sorted(f["id"] for f in ours.failures) == ["broken", "missing"]
    assert ray_engine.describe() == {
        "name": "ray",
        "address": "existing",
        "startup_seconds": 0.0,
        "actors": 2,
        "cpus_per_actor": 1,
        "cluster_cpus": 2,
    }


def test_real_photos_and_captions_encode_the_same(local_ray, encoder: Encoder) -> None:
    if not (COCO / "captions.jsonl").is_file():
        pytest.skip(f"the COCO sample is not at {COCO} (../shared/data is absent on this machine)")
    lines = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines() if line.strip()]
    items = [CorpusItem(id=c["id"], text=c["captions"][0], image=COCO / c["image"]) for c in lines[:96]]
    reference = encode_items(encoder, items, BATCH, None)
    assert_same_encoding(encode_items(encoder, items, BATCH, None, engine=engine()), reference)
    assert len(reference.rows) == 2 * len(items) and not reference.failures


def test_an_index_built_with_ray_is_the_local_engines(
    local_ray, encoder: Encoder, models_dir: Path, items: list[CorpusItem], tmp_path: Path
) -> None:
    """The same segment files and manifests (but for times and the engine); then `xmodal index add --engine ray`
    against a local add: the same vectors and search results."""
    first, more = items[:-16], items[-16:]
    common = dict(name="m", encoder=encoder, use_gpu=False, batch_size=BATCH)
    indexes = {name: tmp_path / name / "indexes" for name in ("local", "ray")}
    built = {
        name: build_index(indexes_dir=indexes[name], items=first, engine=e, **common).manifest
        for name, e in (("local", None), ("ray", engine()))
    }
    assert built["ray"].build["engine"]["name"] == "ray" and built["local"].build["engine"] == {"name": "local"}
    segments = []
    for name in ("local", "ray"):
        index = IndexDir(indexes[name], "m")
        (ref,) = built[name].segments
        folder = index.segment_dir(ref.id)
        segments.append((sorted(str(p.relative_to(folder)) for p in folder.rglob("*")), index.segment_manifest(ref.id)))
    (files_l, seg_l), (files_r, seg_r) = segments
    assert files_l == files_r and set(seg_l.checksums) == set(seg_r.checksums)
    same = ("format", "model", "dim", "counts", "rows", "files", "tokens")
    assert [getattr(seg_l, f) for f in same] == [getattr(seg_r, f) for f in same]
    assert (seg_l.faiss.key, seg_l.faiss.params) == (seg_r.faiss.key, seg_r.faiss.params)
    assert set(seg_l.build) == set(seg_r.build)

    add_items(indexes_dir=indexes["local"], items=more, **common)
    (tmp_path / "ray" / "models").symlink_to(models_dir, target_is_directory=True)
    rows = [{"id": it.id, "text": it.text, "image": it.image, "audio": it.audio} for it in more]
    corpus = write_corpus(tmp_path / "more.jsonl", [{k: str(v) for k, v in r.items() if v is not None} for r in rows])
    r = CliRunner().invoke(
        app,
        [
            "index",
            "add",
            "m",
            "--corpus",
            str(corpus),
            "--engine",
            "ray",
            "--ray-actors",
            "1",
            "--batch-size",
            str(BATCH),
        ],
        env={"XMODAL_DATA_DIR": str(tmp_path / "ray"), "XMODAL_DEVICE": "cpu"},
    )
    assert r.exit_code == 0, r.output
    assert "encoded over Ray (existing): 1 actor(s)" in r.output
    a, b = LoadedIndex(indexes["local"], "m", use_gpu=False), LoadedIndex(indexes["ray"], "m", use_gpu=False)
    assert len(b.manifest.segments) == 2 and a.manifest.counts == b.manifest.counts and a.size == b.size
    assert np.abs(a.vectors(list(range(a.size))) - b.vectors(list(range(b.size)))).max() < 1e-5
    texts = ["two red circles", "a low hum", "a blue square on the left", "three short high beeps"]
    for q in encoder.encode_text(texts):
        for target in a.modalities:
            hits_a, hits_b = a.search(q, 10, [target]), b.search(q, 10, [target])
            assert [h.id for h in hits_a] == [h.id for h in hits_b]
            assert np.allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-5)


def test_ray_reuses_the_checkpoints_of_an_interrupted_local_build(
    local_ray, encoder: Encoder, items: list[CorpusItem], tmp_path: Path
) -> None:
    common = dict(name="m", items=items, encoder=encoder, use_gpu=False, batch_size=BATCH)
    done_at = []

    def crash_after_two_chunks(done: int, total: int) -> None:
        done_at.append(done)
        if len(done_at) == 2:
            raise Crash(f"interrupted at {done} of {total}")

    with pytest.raises(Crash):
        build_index(indexes_dir=tmp_path / "a", progress=crash_after_two_chunks, **common)
    resumed = build_index(indexes_dir=tmp_path / "a", engine=engine(), **common).manifest
    saved = done_at[-1]  # the chunks the local build finished (texts: every one encodes)
    assert resumed.build["resumed_vectors"] == saved and resumed.build["engine"]["name"] == "ray"
    assert resumed.build["encoded_vectors"] == resumed.build["vectors"] - saved > 0
    clean = build_index(indexes_dir=tmp_path / "b", checkpoint=False, **common).manifest
    a, b = LoadedIndex(tmp_path / "a", "m", use_gpu=False), LoadedIndex(tmp_path / "b", "m", use_gpu=False)
    assert resumed.counts == clean.counts
    assert np.abs(a.vectors(list(range(a.size))) - b.vectors(list(range(b.size)))).max() < 1e-5


def test_cli_build_starts_and_stops_its_own_local_ray(
    tmp_path: Path, models_dir: Path, items: list[CorpusItem]
) -> None:
    """`xmodal index build --engine ray` in a fresh process: no Ray there, so the engine starts a local one for the
    build and stops it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(models_dir, target_is_directory=True)
    corpus = write_corpus(
        tmp_path / "c.jsonl", [{"id": it.id, "text": it.text, "image": str(it.image)} for it in items[:20]]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XMODAL_", "RAY_"))}
    env |= {"XMODAL_DATA_DIR": str(data), "XMODAL_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "service", "index", "build", "--name", "m", "--corpus", str(corpus)]
    r = subprocess.run(
        [*cmd, "--engine", "ray", "--batch-size", "2"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "encoded over Ray (local): 2 actor(s), 1 CPU each of" in r.stderr
    m = IndexDir(data / "indexes", "m").manifest()
    assert m.build["engine"]["address"] == "local" and m.build["engine"]["startup_seconds"] > 0
    assert m.counts == {"text": 20, "image": 20}


def test_cli_documents_the_engine_and_refuses_what_it_cannot_do(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    for command in (["index", "build"], ["index", "add"]):
        r = runner.invoke(app, [*command, "--engine", "ray", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert r.exit_code == 0, r.output
        for text in ("--engine", "local|ray", "Ray Data", "--ray-address", "ray.init(address=...)", "--ray-actors"):
            assert text in r.output, (command, text)
        assert "--engine ray" in r.output  # the example
    with pytest.raises(InvalidInput, match="go with --engine ray"):
        encode_engine(Settings(), "local", ray_actors=2)
    assert encode_engine(Settings(), "ray").describe() == {"name": "ray"}
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the `ray` extra were not installed
    with pytest.raises(MissingDependency, match=r"pip install 'xmodal\[ray\]'"):
        encode_engine(Settings(), "ray")
