"""Crash-safe builds (issue 13): `kill -9` of an `xmodal index build` at about half way, then the same command again.

Usage:
    python bench/resume.py [--items 20000] [--batch-size 32] [--kill-at 0.5]

Writes a text corpus of ``--items`` demo captions (``indexer.demo.write_demo_corpus``, numbered past its
templates), prepares xmodal-mini in a temporary data folder, then times three runs of the real CLI, each a fresh
process: an uninterrupted build; a build killed with SIGKILL once ``--kill-at`` of its chunks are checkpointed; and
the same command again, which resumes. Reports the chunks saved before the kill, the vectors read back and encoded
on the resume (from its manifest: ``build.resumed_vectors``, ``build.encoded_vectors``), the work lost to the kill
(vectors encoded before it but not saved: at most one chunk) and whether the resumed index holds exactly the
uninterrupted build's vectors.

Prints a markdown table (progress on stderr). About 2 minutes at 20,000 items on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table  # noqa: E402
from indexer.demo import write_demo_corpus  # noqa: E402
from indexer.encode import CHUNK_BATCHES  # noqa: E402
from indexer.layout import IndexDir  # noqa: E402
from indexer.search import LoadedIndex  # noqa: E402
from indexer.shards import SHARDS  # noqa: E402
from models.registry import prepare  # noqa: E402


def build_command(corpus: Path, name: str, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "service", "index", "build", "--name", name, "--corpus", str(corpus)] + [
        "--batch-size",
        str(batch_size),
    ]


def text_corpus(folder: Path, n: int) -> Path:
    """``n`` distinct captions: the demo's texts, numbered past the templates' 6,912 combinations."""
    base = [json.loads(line)["text"] for line in write_demo_corpus(folder / "base.jsonl").read_text().splitlines()]
    path = folder / "corpus.jsonl"
    lines = (json.dumps({"id": f"t{i}", "text": f"{base[i % len(base)]}, take {i // len(base) + 1}"}) for i in range(n))
    path.write_text("\n".join(lines) + "\n")
    return path


def vectors(indexes: Path, name: str) -> np.ndarray:
    index = LoadedIndex(indexes, name, use_gpu=False)
    return index.vectors(list(range(index.size)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of the chunks checkpointed at the kill")
    args = parser.parse_args()
    chunk = args.batch_size * CHUNK_BATCHES
    chunks = -(-args.items // chunk)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        print("preparing xmodal-mini ...", file=sys.stderr)
        prepare(data / "models")
        corpus = text_corpus(Path(tmp), args.items)
        env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_") and k != "REDIS_URL"}
        env["XMODAL_DATA_DIR"] = str(data)
        quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}

        print("uninterrupted build ...", file=sys.stderr)
        t0 = time.perf_counter()
        subprocess.run(build_command(corpus, "whole", args.batch_size), check=True, **quiet)
        whole_s = time.perf_counter() - t0

        print("build killed part way ...", file=sys.stderr)
        shards = data / "indexes" / "resumed" / SHARDS
        t0 = time.perf_counter()
        proc = subprocess.Popen(build_command(corpus, "resumed", args.batch_size), **quiet)
        while len(list(shards.glob("*/*.npz"))) < max(1, int(chunks * args.kill_at)):
            if proc.poll() is not None:
                raise SystemExit("the build finished before it could be killed: use more --items")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_s = time.perf_counter() - t0
        saved = len(list(shards.glob("*/*.npz")))

        print("the same command again ...", file=sys.stderr)
        t0 = time.perf_counter()
        subprocess.run(build_command(corpus, "resumed", args.batch_size), check=True, **quiet)
        resume_s = time.perf_counter() - t0
        build = IndexDir(data / "indexes", "resumed").manifest().build
        same = np.array_equal(vectors(data / "indexes", "whole"), vectors(data / "indexes", "resumed"))

    unsaved = args.items - saved * chunk
    print(
        table(
            [
                "items",
                "chunk",
                "whole build s",
                "killed after s",
                "chunks saved",
                "resume s",
                "resumed vectors",
                "encoded on resume",
                "encoded twice (at most)",
                "same vectors",
            ],
            [
                [
                    args.items,
                    chunk,
                    f"{whole_s:.1f}",
                    f"{killed_s:.1f}",
                    f"{saved} of {chunks}",
                    f"{resume_s:.1f}",
                    build["resumed_vectors"],
                    build["encoded_vectors"],
                    f"{min(chunk, unsaved)} (one chunk)",
                    "yes" if same and build["encoded_vectors"] == unsaved else "NO",
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
