"""Late interaction: exact MaxSim against an independent numpy reference, the PLAID-like fast path against
exhaustive MaxSim, residual compression and token pooling, on real FAISS k-means and real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.late.maxsim import Segments, exact_scores, maxsim_scores
from indexer.late.pipeline import LateParams, late_search
from indexer.late.store import TokenStore, write_token_store


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def reference(query: np.ndarray, item: np.ndarray, symmetric: bool = False) -> float:
    """FILIP written plainly: a padded item, padding masked with -inf."""
    if len(item) == 0:
        return -np.inf
    width = 64
    padded = np.zeros((width, query.shape[1]), dtype=np.float64)
    padded[: len(item)] = item
    mask = np.arange(width) < len(item)
    sim = query.astype(np.float64) @ padded.T
    forward = np.where(mask[None, :], sim, -np.inf).max(axis=1).mean()
    if not symmetric:
        return forward
    backward = sim[:, mask].max(axis=0).mean()
    return (forward + backward) / 2


def clustered(n: int, tokens: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n // 4, dim)))
    topics = rng.integers(0, len(centres), size=(n, 3))
    pick = topics[np.arange(n)[:, None], rng.integers(0, 3, size=(n, tokens))]
    vectors = unit(centres[pick] + 0.08 * rng.standard_normal((n, tokens, dim))).reshape(-1, dim)
    return vectors.astype(np.float16), np.arange(n + 1, dtype=np.int64) * tokens


def noisy_queries(vectors: np.ndarray, offsets: np.ndarray, count: int, length: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(offsets) - 1, size=count, replace=False)
    picks = offsets[rows][:, None] + rng.integers(0, offsets[1] - offsets[0], size=(count, length))
    return unit(vectors[picks].astype(np.float32) + 0.05 * rng.standard_normal((count, length, vectors.shape[1])))


@pytest.mark.parametrize("lq", [1, 5, 16])
def test_exact_scores_equal_reference_with_ragged_rows(lq: int) -> None:
    rng = np.random.default_rng(lq)
    lengths = rng.integers(0, 40, size=300)
    lengths[[0, 17, 299]] = 0  # empty rows, also at both ends
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    vectors = unit(rng.standard_normal((offsets[-1], 48)))
    query = unit(rng.standard_normal((lq, 48)))
    got = exact_scores(query, vectors, offsets)
    want = np.array([reference(query, vectors[offsets[r] : offsets[r + 1]]) for r in range(300)])
    assert np.all(np.isneginf(got[lengths == 0]))
    np.testing.assert_allclose(got[lengths > 0], want[lengths > 0], atol=1e-4)
    # FILIP's other direction, averaged with the first
    sym = maxsim_scores(query, lambda i: vectors[i], offsets, Segments.single(np.arange(300)), symmetric=True)
    want_sym = np.array([reference(query, vectors[offsets[r] : offsets[r + 1]], True) for r in range(300)])
    np.testing.assert_allclose(sym[lengths > 0], want_sym[lengths > 0], atol=1e-4)


def test_both_directions_text_over_image_and_image_over_text() -> None:
    """A short 'text' token set querying long 'image' token sets, and the reverse: not symmetric scores."""
    rng = np.random.default_rng(3)
    texts = [unit(rng.standard_normal((int(n), 32))) for n in rng.integers(3, 12, size=50)]
    images = [unit(rng.standard_normal((49, 32))) for _ in range(50)]
    for queries, items in ((texts, images), (images, texts)):
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in items])]).astype(np.int64)
        vectors = np.concatenate(items)
        for q in queries[:5]:
            np.testing.assert_allclose(exact_scores(q, vectors, offsets), [reference(q, t) for t in items], atol=1e-4)


def test_slabs_split_without_changing_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.late.maxsim as late

    vectors, offsets = clustered(200, 20, 32)
    query = unit(np.random.default_rng(0).standard_normal((8, 32)))
    whole = exact_scores(query, vectors, offsets)
    monkeypatch.setattr(late, "SLAB_TOKENS", 50)
    np.testing.assert_allclose(exact_scores(query, vectors, offsets), whole, atol=1e-6)


@pytest.fixture(scope="module")
def store_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    vectors, offsets = clustered(4000, 32, 64)
    path = tmp_path_factory.mktemp("late") / "tokens"
    write_token_store(path, vectors, offsets, np.arange(4000))
    return path, vectors, offsets


def recall_at_10(store: TokenStore, vectors: np.ndarray, offsets: np.ndarray, params: LateParams) -> float:
    queries = noisy_queries(vectors, offsets, 40, 16)
    allowed = np.ones(len(offsets) - 1, dtype=bool)
    hits = 0
    for q in queries:
        truth = np.argsort(-exact_scores(q, vectors, offsets), kind="stable")[:10]
        found = late_search(store, q, 10, allowed, params).items
        hits += len(set(truth.tolist()) & set(found.tolist()))
    return hits / (10 * len(queries))


def test_fast_path_recall_against_exhaustive_maxsim(store_data) -> None:  # noqa: ANN001
    path, vectors, offsets = store_data
    store = TokenStore(path)
    assert recall_at_10(store, vectors, offsets, LateParams()) >= 0.95
    # the exhaustive reference path is the truth itself
    assert recall_at_10(store, vectors, offsets, LateParams(exhaustive=True)) == 1.0


def test_scores_reported_are_exact(store_data) -> None:  # noqa: ANN001
    path, vectors, offsets = store_data
    store = TokenStore(path)
    q = noisy_queries(vectors, offsets, 1, 16, seed=5)[0]
    hits = late_search(store, q, 10, np.ones(4000, dtype=bool), LateParams())
    np.testing.assert_allclose(hits.scores, exact_scores(q, vectors, offsets, hits.items), atol=1e-5)
    assert np.all(np.diff(hits.scores) <= 0)


def test_modality_targets_and_scopes(tmp_path: Path) -> None:
    """Items with two rows (two modalities): per-modality max versus all tokens, and row restriction."""
    rng = np.random.default_rng(9)
    n = 300
    rows = [unit(rng.standard_normal((int(m), 16))) for m in rng.integers(2, 9, size=2 * n)]
    row_item = np.r_[np.arange(n), np.arange(n)]  # rows 0..n-1 "text", n..2n-1 "image"
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    vectors = np.concatenate(rows)
    write_token_store(tmp_path / "t", vectors, offsets, row_item)
    store = TokenStore(tmp_path / "t")
    q = unit(rng.standard_normal((6, 16)))
    both = np.ones(2 * n, dtype=bool)
    ref_mod = np.maximum([reference(q, rows[i]) for i in range(n)], [reference(q, rows[n + i]) for i in range(n)])
    ref_all = np.array([reference(q, np.concatenate([rows[i], rows[n + i]])) for i in range(n)])
    for scope, ref in (("modality", ref_mod), ("all", ref_all)):
        hits = late_search(store, q, 5, both, LateParams(scope=scope, exhaustive=True))
        np.testing.assert_array_equal(hits.items, np.argsort(-ref, kind="stable")[:5])
        np.testing.assert_allclose(hits.scores, np.sort(ref)[::-1][:5], atol=1e-3)  # fp16 storage
    images_only = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    hits = late_search(store, q, 5, images_only, LateParams(exhaustive=True))
    assert np.all(hits.rows >= n)


def test_residual_compression_is_small_and_keeps_recall(store_data, tmp_path: Path) -> None:  # noqa: ANN001
    _, vectors, offsets = store_data
    meta = write_token_store(tmp_path / "r", vectors, offsets, np.arange(4000), storage="residual", nbits=2)
    store = TokenStore(tmp_path / "r")
    assert np.load(tmp_path / "r" / "residuals.npy", mmap_mode="r").shape == (vectors.shape[0], 64 * 2 // 8)
    assert not (tmp_path / "r" / "vectors.npy").exists()
    decoded = store.take(np.arange(1000))
    cos = np.sum(decoded * vectors[:1000].astype(np.float32), axis=1)
    assert cos.mean() > 0.9, cos.mean()
    assert meta["bytes_per_token"] < 0.35 * 2 * 64  # fp16 alone is 128 bytes a token here
    assert recall_at_10(store, vectors, offsets, LateParams()) >= 0.85


def test_pooling_halves_tokens(store_data, tmp_path: Path) -> None:  # noqa: ANN001
    _, vectors, offsets = store_data
    meta = write_token_store(tmp_path / "p", vectors[: 32 * 500], offsets[:501], np.arange(500), pool_factor=2)
    store = TokenStore(tmp_path / "p")
    assert meta["tokens"] == 500 * 16 and meta["tokens_before_pooling"] == 500 * 32
    assert np.allclose(np.linalg.norm(store.row_tokens(0), axis=1), 1, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_token_product_equals_numpy_in_blocks_on_threads(dtype, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The ONNX Runtime product (cast + GEMM in one session) against float64 numpy, on its one-thread and
    multi-thread sessions and on the numpy fallback (no onnxruntime)."""
    import indexer.late.kernels as late

    rng = np.random.default_rng(4)
    q = unit(rng.standard_normal((16, 96)))
    x = unit(rng.standard_normal((3000, 96))).astype(dtype)
    want = q.astype(np.float64) @ x.astype(np.float64).T
    np.testing.assert_allclose(late.token_product(q, x), want, atol=1e-5)
    monkeypatch.setattr(late, "PRODUCT_BLOCK", 256)  # 12 blocks (the last one short) over two threads
    monkeypatch.setenv("XMODAL_LATE_THREADS", "2")
    np.testing.assert_allclose(late.token_product(q, x), want, atol=1e-5)
    idx = np.random.default_rng(5).permutation(len(x))[:2500]
    np.testing.assert_allclose(late.gathered_product(q, x, idx), want[:, idx], atol=1e-5)
    monkeypatch.setattr(late, "_ORT", [None])
    np.testing.assert_allclose(late.token_product(q, x), want, atol=1e-5)
    np.testing.assert_allclose(late.gathered_product(q, x, idx), want[:, idx], atol=1e-5)
    assert late.token_product(q, x[:0]).shape == (16, 0)


def test_residual_similarity_decodes_like_take(store_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The residual store's similarity (in the codec's rotated coordinates, from the centroid similarities and the
    coded coordinates, no token decoded in full) equals the product with the tokens ``take`` decodes, for
    unsorted token numbers; also without onnxruntime, and with the centroid similarities handed in."""
    import indexer.late.kernels as late

    _, vectors, offsets = store_data
    write_token_store(tmp_path / "r4", vectors, offsets, np.arange(4000), storage="residual", nbits=4)
    store = TokenStore(tmp_path / "r4")
    idx = np.random.default_rng(2).choice(len(vectors), size=5000, replace=False)
    q = noisy_queries(vectors, offsets, 1, 16, seed=3)[0]
    want = q.astype(np.float64) @ store.take(idx).astype(np.float64).T
    np.testing.assert_allclose(store.similarity(q)(idx), want, atol=1e-5)
    np.testing.assert_allclose(store.similarity(q, q @ store.centroids.T)(idx), want, atol=1e-5)
    monkeypatch.setattr(late, "_ORT", [None])
    store = TokenStore(tmp_path / "r4")
    np.testing.assert_allclose(store.similarity(q)(idx), want, atol=1e-5)


def test_lloyd_max_quantiser_beats_equal_probability_buckets() -> None:
    from indexer.late.codec import lloyd_max

    rng = np.random.default_rng(6)
    gauss = rng.standard_normal(60000)
    edges, values = lloyd_max(gauss, 4)
    mse = np.mean((gauss - values[np.searchsorted(edges, gauss)]) ** 2)
    assert abs(mse - 0.1175) < 0.003  # the Lloyd-Max error of a 2-bit Gaussian quantiser
    heavy = rng.laplace(size=60000) ** 3  # heavy tails, as real residual coordinates have
    edges, values = lloyd_max(heavy, 256)
    mse = np.mean((heavy - values[np.searchsorted(edges, heavy)]) ** 2)
    cut = np.quantile(heavy, np.arange(1, 256) / 256)
    bucket = np.searchsorted(cut, heavy)
    means = np.bincount(bucket, heavy, 256) / np.maximum(np.bincount(bucket, minlength=256), 1)
    assert mse < 0.5 * np.mean((heavy - means[bucket]) ** 2)


def test_transform_coding_spends_bits_where_the_variance_is(tmp_path: Path) -> None:
    """Tokens near a 12-dimensional subspace of 64 dimensions: the rotated codec gives the flat directions no
    bits and decodes far better than per-dimension buckets in the same bytes."""
    from indexer.late.codec import ResidualCodec

    rng = np.random.default_rng(8)
    basis = np.linalg.qr(rng.standard_normal((64, 64)))[0][:12]
    centres = unit(rng.standard_normal((50, 12)) @ basis)
    tokens = unit(centres[rng.integers(0, 50, 20000)] + 0.3 * rng.standard_normal((20000, 12)) @ basis)
    tokens = unit(tokens + 0.002 * rng.standard_normal(tokens.shape))
    offsets = np.arange(0, 20001, 20, dtype=np.int64)
    meta = write_token_store(tmp_path / "t", tokens, offsets, np.arange(1000), storage="residual", nbits=2)
    assert meta["bits_histogram"]["0"] >= 16 and meta["bits_histogram"]["8"] > 0
    store = TokenStore(tmp_path / "t")
    err = 1 - np.sum(store.take(np.arange(20000)) * tokens.astype(np.float16).astype(np.float32), axis=1)
    residual = tokens - store.centroids[store.codes]
    flat = ResidualCodec.fit(residual, 2, rotate=False)
    plain = unit(store.centroids[store.codes] + flat.decode(flat.encode(residual)))
    flat_err = 1 - np.sum(plain * tokens, axis=1)
    assert err.mean() < 0.2 * flat_err.mean(), (err.mean(), flat_err.mean())
    assert np.load(tmp_path / "t" / "residuals.npy", mmap_mode="r").shape == (20000, 64 * 2 // 8)


def test_stores_written_before_transform_coding_still_read(tmp_path: Path) -> None:
    """The older residual format (per-dimension buckets.npy, no rotation) decodes as it always did."""
    import json

    from indexer.late.codec import ResidualCodec

    rng = np.random.default_rng(10)
    tokens = unit(rng.standard_normal((3000, 32)))
    offsets = np.arange(0, 3001, 30, dtype=np.int64)
    write_token_store(tmp_path / "old", tokens, offsets, np.arange(100), storage="residual", nbits=2)
    path = tmp_path / "old"
    store = TokenStore(path)
    residual = tokens - store.centroids[store.codes]
    codec = ResidualCodec.fit(residual, 2, rotate=False)  # what the old writer did: buckets per dimension
    np.save(path / "residuals.npy", codec.encode(residual))
    np.save(path / "buckets.npy", codec.values[:, :4])
    for name in ("rotation", "bits", "levels", "cutoffs"):
        (path / f"{name}.npy").unlink()
    meta = json.loads((path / "meta.json").read_text())
    del meta["codec"]
    (path / "meta.json").write_text(json.dumps(meta))
    old = TokenStore(path)
    want = unit(old.centroids[old.codes] + codec.decode(codec.encode(residual)))
    np.testing.assert_allclose(old.take(np.arange(3000)), want, atol=1e-5)
    q = unit(rng.standard_normal((5, 32)))
    np.testing.assert_allclose(old.similarity(q)(np.arange(3000)), q @ want.T, atol=1e-5)
