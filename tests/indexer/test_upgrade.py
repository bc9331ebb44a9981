"""Model upgrades without re-encoding first (issue 16), on two real text encoders: an index of wordllama-256 (OLD,
static embeddings) moved to MiniLM (NEW). Checked against exact search computed here from each model's own vectors:
NEW queries projected through the adapter onto OLD segments, scores mapped onto NEW's scale, OLD and NEW segments
merged, deletions landing mid-backfill, a crash mid-backfill, and no version that misses an item."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.build import add_items, build_index
from indexer.corpus import CorpusItem
from indexer.layout import IndexDir, ModelRef
from indexer.lifecycle import compact, delete_items
from indexer.search import LoadedIndex
from indexer.upgrade import backfill, pending, start_upgrade
from indexer.verify import verify_index
from models.adapter import adapter_dir, load_adapter
from models.align import align
from models.encoder import Encoder
from models.errors import AdapterMismatch, BundleError, InvalidInput
from models.mini.prepare import TEXT_MODEL
from models.registry import WORDLLAMA_MODEL, prepare

pytest.importorskip("wordllama", reason="the wordllama-256 bundle comes from the `wordllama` package")
pytest.importorskip("onnx", reason="writing the adapter graph needs onnx (the `export` extra)")
pytestmark = pytest.mark.slow

SUBJECTS = ["a dog", "two cats", "a red bus", "an old airplane", "a wooden boat", "a small bird", "a horse", "a child"]
PLACES = ["in the snow", "on a beach", "in a city street", "near a river", "in a kitchen", "under a bridge"]
ACTIONS = ["running", "sleeping", "waiting", "playing", "standing still"]
TEXTS = [f"{s} {a} {p}" for s in SUBJECTS for p in PLACES for a in ACTIONS][:150]
QUERIES = ["a puppy playing in snow", "a bus on a busy road", "boats on the water", "a bird by the river"]


def items(texts: list[str], start: int = 0) -> list[CorpusItem]:
    return [CorpusItem(id=f"t{start + i:03d}", text=t, metadata={"n": start + i}) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upgrade-models")
    shutil.copytree(models_dir / TEXT_MODEL, folder / TEXT_MODEL)
    prepare(folder, WORDLLAMA_MODEL)
    align(folder, TEXT_MODEL, WORDLLAMA_MODEL, texts=TEXTS, texts_label="the test's texts")
    return folder


@pytest.fixture(scope="module")
def old(models: Path) -> Encoder:
    return Encoder(models / WORDLLAMA_MODEL, device="cpu")


@pytest.fixture(scope="module")
def new(models: Path) -> Encoder:
    return Encoder(models / TEXT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def adapter(models: Path, new: Encoder, old: Encoder):  # noqa: ANN201
    return load_adapter(adapter_dir(models, f"{TEXT_MODEL}-to-{WORDLLAMA_MODEL}"), new.fingerprint, old.fingerprint)


def old_index(root: Path, old: Encoder) -> Path:
    """An OLD index of two segments (a build of 90 texts, an add of 60)."""
    indexes = root / "indexes"
    build_index(indexes_dir=indexes, name="docs", items=items(TEXTS[:90]), encoder=old, checkpoint=False)
    add_items(indexes_dir=indexes, name="docs", items=items(TEXTS[90:], 90), encoder=old, checkpoint=False)
    return indexes


def ref(enc: Encoder) -> ModelRef:
    return ModelRef(name=enc.name, fingerprint=enc.fingerprint, dim=enc.dim)


def expected(query: str, ids_new: set[str], live: set[str], new: Encoder, old: Encoder, adapter, k: int) -> list:  # noqa: ANN001
    """Exact search computed here: NEW-encoded items by NEW's cosine; OLD-encoded items by the projected query's
    cosine to OLD's vectors, mapped by the adapter's score map."""
    by_id = {it.id: it.text for it in items(TEXTS)}
    q_new = new.encode_text([query])[0]
    q_old = adapter.project(q_new[None, :])[0]
    sm = adapter.manifest.score_map
    scores = {}
    for item_id in sorted(live):
        if item_id in ids_new:
            scores[item_id] = float(new.encode_text([by_id[item_id]])[0] @ q_new)
        else:
            scores[item_id] = float(old.encode_text([by_id[item_id]])[0] @ q_old) * sm["slope"] + sm["intercept"]
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]


def check_search(indexes: Path, query: str, new, old, adapter, k: int = 8) -> None:  # noqa: ANN001
    d = IndexDir(indexes, "docs")
    m = d.manifest()
    ids_new, live = set(), set()
    index = LoadedIndex(indexes, "docs", m.version, adapter=adapter if m.upgrade else None)
    for view in index.segments:
        dead = set(np.flatnonzero(view.dead).tolist())
        rows = [r for r in range(len(view.dead)) if r not in dead]
        ids = {rec["id"] for rec in view.data.items.get(rows).values()}
        live |= ids
        if view.data.manifest.model.fingerprint == new.fingerprint:
            ids_new |= ids
    want = expected(query, ids_new, live, new, old, adapter, k)
    got = index.search(new.encode_text([query])[0], k)
    assert [h.id for h in got] == [i for i, _ in want]
    np.testing.assert_allclose([h.score for h in got], [s for _, s in want], atol=2e-4)
    index.close()


def test_upgrade_serves_new_queries_at_once_then_backfills_to_pure_new(
    tmp_path: Path,
    new: Encoder,
    old: Encoder,
    adapter,  # noqa: ANN001
) -> None:
    indexes = old_index(tmp_path, old)
    d = IndexDir(indexes, "docs")
    before = d.manifest()

    other = ModelRef(name="other", fingerprint="0" * 64, dim=new.dim)
    with pytest.raises(AdapterMismatch):  # an adapter fitted for another NEW model is refused
        start_upgrade(indexes, "docs", other, adapter.manifest)
    with pytest.raises(InvalidInput, match="already encoded"):
        start_upgrade(indexes, "docs", ref(old), adapter.manifest)
    m = start_upgrade(indexes, "docs", ref(new), adapter.manifest)
    assert m.model == ref(new) and m.dim == new.dim and m.upgrade.from_model == before.model
    assert [s.id for s in m.segments] == [s.id for s in before.segments] and m.counts == before.counts
    assert start_upgrade(indexes, "docs", ref(new), adapter.manifest).version == m.version  # again: the same
    assert len(pending(d, m)) == 2

    # the OLD segments are refused without the adapter, searched through it with NEW's queries
    with pytest.raises(BundleError, match="need adapter"):
        LoadedIndex(indexes, "docs")
    for q in QUERIES:
        check_search(indexes, q, new, old, adapter)

    # half the backfill: one NEW segment beside one OLD; an id deleted while the segment is being encoded
    victim = "t005"

    def delete_midway(done: int, total: int) -> None:
        if done and victim not in deleted:
            delete_items(indexes, "docs", [victim])
            deleted.add(victim)

    deleted: set[str] = set()
    half = backfill(indexes, "docs", new, progress=delete_midway, max_segments=1, batch_size=16, use_gpu=False)
    assert half.upgrade is not None and len(pending(d, half)) == 1 and deleted == {victim}
    assert half.operation == "backfill" and half.build["deleted_meanwhile"] == 1  # carried onto the NEW segment
    assert sum(half.counts.values()) == len(TEXTS) - 1
    for q in QUERIES:
        check_search(indexes, q, new, old, adapter)
    index = LoadedIndex(indexes, "docs", adapter=adapter)
    assert victim not in {h.id for h in index.search(new.encode_text([TEXTS[5]])[0], 20)}
    index.close()

    assert verify_index(indexes, "docs")["version"] == half.version  # a mixed version verifies segment by segment

    # no version published since the switch missed an item: 150, then 149 once the delete landed
    held = [sum(d.manifest(v).counts.values()) for v in d.versions() if v >= m.version]
    assert held == [len(TEXTS), len(TEXTS) - 1, len(TEXTS) - 1], held

    # pruning during an upgrade keeps the version it started from (the way back)
    assert half.upgrade.from_version == before.version
    with d.writing():
        d.prune(1)
    assert d.versions() == [before.version, half.version]

    # a compaction while upgrading never mixes models in a segment
    with pytest.raises(InvalidInput, match="being upgraded"):
        compact(indexes, "docs", use_gpu=False)

    # a crash in the middle of the last segment: run again, it resumes and ends pure NEW
    def crash(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backfill(indexes, "docs", new, progress=crash, batch_size=16, use_gpu=False)
    assert d.manifest().upgrade is not None
    final = backfill(indexes, "docs", new, batch_size=16, use_gpu=False)
    assert final.upgrade is None and final.model == ref(new) and not pending(d, final)
    assert sum(final.counts.values()) == len(TEXTS) - 1
    for q in QUERIES:
        check_search(indexes, q, new, old, adapter)
    with pytest.raises(InvalidInput, match="not being upgraded"):
        backfill(indexes, "docs", new)

    # no version published since the prune missed an item
    assert all(sum(d.manifest(v).counts.values()) == len(TEXTS) - 1 for v in d.versions() if v > half.version)
