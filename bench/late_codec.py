"""What 2-bit token compression can keep of recall@10 on bench/late.py's synthetic data: xmodal's residual codec
against an ideal coder that is told each token's term for free (issue 5's "recall cost under 1 point" target).

Usage:
    python bench/late_codec.py [--items 10000] [--rates 2,3,4] [--codecs 2:0,4:0] [--cache-dir DIR]

Every synthetic token is unit(term + NOISE * jitter), the jitter Gaussian with a known covariance
(``bench/late.py``'s ``Topics``). A coder given the term (a genie: a real coder also has to say which term, from
its centroid and its bits) and R bits a dimension for the jitter can do no better, in squared error, than the
Gaussian rate-distortion function: reverse water-filling over the jitter's eigenvalues. This simulates that
coder's test channel (each principal coordinate z becomes a·z + Gaussian noise, a = 1 - d/λ, so that the error
has variance d = min(λ, θ)), rebuilds the tokens, scores every query against every item exhaustively and takes
recall@10 against exhaustive MaxSim over the float16 tokens (ties counted as in bench/late.py). The same is done
with xmodal's residual stores (``indexer.late.store.write_token_store``, decoded with ``TokenStore.take``): the
storage's own recall cost, before any candidate generation. ``--codecs nbits:centroids`` (0: the default count).

The data is bench/late.py's (same generator, seed and cache folder, made if absent); the terms and jitter are
drawn again with the same draws, and checked against the cached vectors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import late as bench  # bench/late.py (this script's folder is on sys.path); pins the BLAS threads first
import numpy as np
from common import table

from indexer.late.store import TokenStore, write_token_store


def parts(data: bench.DataSet, seed: int) -> tuple[np.ndarray, np.ndarray, bench.Topics]:
    """The terms and jitter of every cached synthetic token, drawn again in bench/late.py's order."""
    n, tokens = data.items, len(data.vectors) // data.items
    world = bench.Topics(n, bench.DIM, seed)
    rng = np.random.default_rng([seed, 1])
    base = np.empty((n * tokens, bench.DIM), dtype=np.float32)
    jitter = np.empty_like(base)
    for start in range(0, n, bench.SYNTHETIC_CHUNK):
        m = min(bench.SYNTHETIC_CHUNK, n - start)
        b, j = world.parts(m, tokens, rng)
        base[start * tokens : (start + m) * tokens] = b.reshape(-1, bench.DIM)
        jitter[start * tokens : (start + m) * tokens] = j.reshape(-1, bench.DIM)
    drift = float(np.abs(bench.unit(base + world.NOISE * jitter) - data.vectors).max())
    if drift > 1e-3:  # float16 rounding is ~5e-4 at most
        raise SystemExit(f"the regenerated tokens differ from the cached ones by {drift}: generator changed?")
    return base, jitter, world


def water_filling(eigenvalues: np.ndarray, bits: float) -> np.ndarray:
    """Per-coordinate distortion min(λ, θ) with θ chosen so that sum max(0, ½ log2(λ/θ)) = ``bits``."""
    lam = np.maximum(eigenvalues, 1e-30)
    lo, hi = 1e-30, float(lam.max())
    for _ in range(200):
        theta = np.sqrt(lo * hi)
        rate = np.sum(np.maximum(0.0, 0.5 * np.log2(lam / theta)))
        lo, hi = (theta, hi) if rate > bits else (lo, theta)
    return np.minimum(lam, theta)


def score(name: str, decoded: np.ndarray, data: bench.DataSet, truth: np.ndarray, rows: list, bpt: str) -> None:
    tokens = len(data.vectors) // data.items
    err = float(np.mean(np.sum((decoded - np.asarray(data.vectors, dtype=np.float32)) ** 2, axis=1)))
    scores = bench.maxsim_all(decoded, data.queries, tokens)
    top = np.argpartition(-scores, bench.K - 1, axis=1)[:, : bench.K]
    rows.append([name, bpt, f"{err:.4f}", f"{bench.recall_at_k(list(top), truth):.3f}"])
    bench.log(" | ".join(rows[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--query-tokens", type=int, default=16)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", default="2,3,4", help="bits a dimension for the genie coder")
    parser.add_argument("--codecs", default="2:0,4:0", help="nbits:centroids of xmodal residual stores (0: default)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "xmodal-late-bench")
    args = parser.parse_args(argv)

    data = bench.synthetic(args.cache_dir, args.items, args.tokens, args.queries, args.query_tokens, args.seed)
    truth = bench.truth_scores(data, args.tokens)
    t0 = time.perf_counter()
    base, jitter, world = parts(data, args.seed)
    bench.log(f"terms and jitter drawn again in {time.perf_counter() - t0:.0f} s")
    lam, vecs = np.linalg.eigh(world.jitter_covariance())
    rng = np.random.default_rng(args.seed + 5)
    rows: list[list[str]] = []
    fp16 = 2 * bench.DIM
    for rate in [float(r) for r in args.rates.split(",") if r]:
        d = water_filling(lam, rate * bench.DIM)
        a = 1.0 - d / np.maximum(lam, 1e-30)
        z = jitter @ vecs
        z = a * z + np.sqrt(a * d) * rng.standard_normal(z.shape)
        decoded = bench.unit(base + world.NOISE * (z @ vecs.T))
        coded = f"{rate * bench.DIM / 8:.0f} + the term for free"
        score(f"genie: the term given, the jitter at {rate:g} bits a dimension", decoded, data, truth, rows, coded)
    del base, jitter
    for spec in [s for s in args.codecs.split(",") if s]:
        nbits, k = (int(v) for v in spec.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            meta = write_token_store(
                Path(tmp), data.vectors, data.offsets, np.arange(data.items), storage="residual", nbits=nbits,
                centroids=k or None, seed=args.seed,
            )  # fmt: skip
            store = TokenStore(Path(tmp))
            step = 1 << 16
            n = len(data.vectors)
            decoded = np.concatenate([store.take(np.arange(s, min(s + step, n))) for s in range(0, n, step)])
            name = f"xmodal residual {nbits}-bit, {meta['centroids']} centroids"
            score(name, decoded, data, truth, rows, f"{meta['bytes_per_token']:.1f}")
    bench.say(f"# 2-bit compression on the synthetic data: {data.title}\n")
    bench.say(f"- command: `python bench/late_codec.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    bench.say(f"- fp16 tokens take {fp16} B (+ ~6 B of offsets and ids); one seventh is {fp16 / 7:.0f} B")
    bench.say("- recall@10: exhaustive MaxSim over the decoded tokens against that over the float16 ones\n")
    bench.say(table(["coder", "bytes/token", "mean squared token error", "recall@10"], rows))


if __name__ == "__main__":
    main()
